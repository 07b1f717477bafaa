"""`load_text_encoder`: a frozen T5 v1.1 encoder from any supported directory, ready to encode.

    encoder = load_text_encoder("/ckpt/t5-v1_1-xxl", max_length=128, dtype="bfloat16", mesh=mesh)
    emb, mask = encoder.encode(["a corgi", "a red circle"])  # [2, 128, 4096] float32, [2, 128] bool

`path` is a Hugging Face directory, a t5x checkpoint directory, a directory converted with
`imagen-jax encode --convert` (local or gs://), or "builtin:shapes-tiny". Inside a jitted train
step, `encoder.apply(encoder.params, ids, mask)` encodes token ids on the fly.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.text import builtin
from imagen_jax.text import t5
from imagen_jax.text import tokenizer as tokenizer_lib
from imagen_jax.text import weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


PAD_OUTPUTS = ("zero", "keep")


def _dtype(dtype: Any) -> Any:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
  return jnp.dtype(dtype).type


class TextEncoder:
  """A T5 encoder with its tokenizer and parameters.

  Attributes:
    config: the T5Config.   width: d_model.   max_length: tokens per caption (EOS included).
    params: the parameter pytree (sharded over `mesh` when one was given).
    tokenizer: the `Tokenizer`.   spec: a JSON-able description (see `describe`).
  """

  def __init__(self, config: t5.T5Config, params: Any, tokenizer: tokenizer_lib.Tokenizer,
               dtype: Any = "float32", path: str = "", mesh: jax.sharding.Mesh | None = None,
               output_layer: int = -1, pad_outputs: str = "zero",
               append_token_embeddings: bool = False):
    if pad_outputs not in PAD_OUTPUTS:
      raise ValueError(f"text.pad_outputs must be one of {PAD_OUTPUTS}, got {pad_outputs!r}")
    self.config = config
    self.dtype = _dtype(dtype)
    t5.check_output_layer(output_layer, config)
    # The parameters stay whole (layers past `output_layer` unused): one tree, one sharding.
    self.module = t5.T5Encoder(config, dtype=self.dtype, param_dtype=self.dtype,
                               output_layer=output_layer,
                               keep_padding=pad_outputs == "keep",
                               append_token_embeddings=append_token_embeddings)
    self.params = params
    self.tokenizer = tokenizer
    self.max_length = tokenizer.max_length
    self.width = config.d_model * (2 if append_token_embeddings else 1)
    self.path = path
    self.mesh = mesh
    self.spec = describe(config, tokenizer, path, self.dtype, output_layer, pad_outputs,
                         append_token_embeddings)
    self._batch_multiple = 1
    if mesh is not None:
      self._batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]

  def apply(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Pure encoder: ids int32 [B, L], mask bool [B, L] -> float32 [B, L, width].

    Zero at masked positions (unless `pad_outputs` "keep"). Jit-able; under a mesh context (`jax.set_mesh`) activations get
    the logical sharding constraints of `core/partitioning.py`.
    """
    with partitioning.axis_rules_context():
      return self.module.apply({"params": params}, ids, mask)

  def tokenize(self, captions: Sequence[Any], keys: Sequence[Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, max_length], mask bool [B, max_length]); see `tokenizer.Tokenizer`."""
    batch = self.tokenizer(captions, keys)
    return batch.ids, batch.mask

  def encode(self, captions: Sequence[Any], keys: Sequence[Any] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [B, max_length, width], mask bool [B, max_length]).

    Embeddings are zero at masked positions. The batch is padded to a power of two (and to a
    multiple of the mesh's batch shards) so that a few compiled shapes serve every size.
    """
    ids, mask = self.tokenize(captions, keys)
    return np.asarray(self.encode_ids(ids, mask)), mask

  def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Encodes already tokenized captions: float32 [B, L, width] on the host."""
    n = ids.shape[0]
    if n == 0:
      return np.zeros((0, ids.shape[1], self.width), np.float32)
    padded = max(self._batch_multiple, 1 << (n - 1).bit_length())
    padded = -(-padded // self._batch_multiple) * self._batch_multiple
    ids = np.pad(ids, ((0, padded - n), (0, 0)))
    mask = np.pad(mask, ((0, padded - n), (0, 0)))
    return np.asarray(self._jitted()(self.params, ids, mask))[:n]

  @functools.cache  # pylint: disable=method-cache-max-size-none  (one per encoder)
  def _jitted(self):
    if self.mesh is None:
      return jax.jit(self.apply)
    batch = partitioning.batch_sharding(self.mesh, 2)
    fn = jax.jit(self.apply, in_shardings=(self.param_shardings(), batch, batch),
                 out_shardings=partitioning.batch_sharding(self.mesh, 3))

    def run(params, ids, mask):
      with jax.set_mesh(self.mesh):
        return fn(params, ids, mask)
    return run

  def param_shardings(self) -> Any:
    """NamedShardings of the parameters on `mesh` by their logical axis names."""
    return param_shardings(self.config, self.dtype, self.max_length, self.mesh)


def param_shardings(config: t5.T5Config, dtype: Any, max_length: int, mesh: jax.sharding.Mesh
                    ) -> Any:
  return partitioning.tree_shardings(boxed_param_shapes(config, dtype, max_length), mesh)


def boxed_param_shapes(config: t5.T5Config, dtype: Any = jnp.float32, max_length: int = 8) -> Any:
  """`jax.eval_shape` of the parameters, boxed with their logical names (no memory used)."""
  module = t5.T5Encoder(config, dtype=_dtype(dtype), param_dtype=_dtype(dtype))
  ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, max_length), jnp.bool_)
  return jax.eval_shape(lambda i, m: module.init(jax.random.PRNGKey(0), i, m), ids, mask)["params"]


def describe(config: t5.T5Config, tokenizer: tokenizer_lib.Tokenizer, path: str,
             dtype: Any, output_layer: int = -1, pad_outputs: str = "zero",
             append_token_embeddings: bool = False) -> dict[str, Any]:
  """What identifies an encoder: cascade stages must agree on all but `path` and `dtype`.

  `output_layer`, `pad_outputs` and `append_token_embeddings` are named only when they are not
  the defaults (-1, "zero", False), so the specs stored with earlier embedding caches still
  match."""
  spec = {"path": path, "size": t5.size_name(config), "config": config.to_dict(),
          "vocab_size": tokenizer.vocab_size, "vocab_sha256": tokenizer.sha256,
          "d_model": config.d_model, "max_length": tokenizer.max_length,
          "dtype": jnp.dtype(dtype).name}
  if output_layer != -1:
    spec["output_layer"] = output_layer
  if pad_outputs != "zero":
    spec["pad_outputs"] = pad_outputs
  if append_token_embeddings:
    spec["append_token_embeddings"] = True
  return spec


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Whether two `spec`s describe the same encoder (ignoring where it was loaded from)."""
  drop = ("path", "dtype")
  return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items()
                                                           if k not in drop}


def _find_vocab(path: str, vocab: str | None) -> str:
  """`vocab`, else spiece.model in `path`, else (t5x checkpoints carry none) in its parent, else
  in the `tokenizer/` beside it (a diffusers pipeline's `text_encoder/`)."""
  candidates = [vocab] if vocab else [fileio.join(path, weights.VOCAB_FILE)]
  if not vocab and not fileio.is_remote(path):
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer",
                                   weights.VOCAB_FILE))
  if not vocab and weights.is_t5x_dir(path):
    parent = path.rstrip("/").rsplit("/", 1)[0] if fileio.is_remote(path) else \
        os.path.dirname(os.path.abspath(path))
    candidates.append(fileio.join(parent, weights.VOCAB_FILE))
  for candidate in candidates:
    if fileio.exists(candidate):
      return candidate
  raise FileNotFoundError(f"no SentencePiece vocabulary for {path}: looked for "
                          f"{', '.join(candidates)}. Put T5's spiece.model there or pass vocab=.")


def read_weights(path: str, dtype: Any = None) -> tuple[str, t5.T5Config, Any]:
  """(kind, config, numpy params) from a Hugging Face or t5x directory."""
  if weights.is_hf_dir(path):
    return "hf", *weights.load_hf(path, dtype=dtype)
  if weights.is_t5x_dir(path):
    return "t5x", *weights.load_t5x(path, dtype=dtype)
  raise FileNotFoundError(_not_found_message(path))


def _not_found_message(path: str) -> str:
  hint = ""
  if "/" not in path and not fileio.exists(path):
    hint = (f" {path!r} looks like a model name: imagen-jax loads weights offline. Download the "
            "Hugging Face directory (config.json, model.safetensors, spiece.model) or a t5x "
            "checkpoint and give its path, or use builtin:shapes-tiny.")
  return (f"no T5 encoder at {path!r}: expected a Hugging Face directory (config.json + "
          f"model.safetensors[.index.json]), a t5x checkpoint directory, or a directory "
          f"converted by `imagen-jax encode --convert`.{hint}")


def load_text_encoder(path: str, max_length: int = 128, dtype: Any = "float32", *,
                      mesh: jax.sharding.Mesh | None = None, vocab: str | None = None,
                      tokenizer_backend: str = "sentencepiece",
                      output_layer: int = -1, pad_outputs: str = "zero",
                      append_token_embeddings: bool = False) -> TextEncoder:
  """Loads a frozen T5 v1.1 encoder (see the module docstring for `path`).

  Args:
    path: a directory (local or gs://) or "builtin:shapes-tiny".
    max_length: tokens per caption including EOS; longer captions are truncated and counted.
    dtype: compute dtype, "float32" or "bfloat16"; parameters are kept in the same dtype.
    mesh: place the parameters sharded by their logical axes on this mesh (XXL needs it);
      None puts them on the default device.
    vocab: the SentencePiece model file if it is not `spiece.model` in (or next to) `path`.
    tokenizer_backend: "sentencepiece", or "seqio" with the tf extra.
    output_layer: the output is the residual stream after this many layers, through T5's final
      norm (-1: all, T5's own output; 0: each token's embedding alone, no context).
    pad_outputs: "zero" zeroes padding positions; "keep" keeps T5's values there (IF's).
    append_token_embeddings: each token's output is followed by its own embedding through the
      final norm (no context), so the width is 2 * d_model.
  """
  compute = _dtype(dtype)
  source = path
  path = builtin.resolve(path)
  if not (weights.is_converted_dir(path) or weights.is_hf_dir(path) or weights.is_t5x_dir(path)):
    raise FileNotFoundError(_not_found_message(path))
  tok = tokenizer_lib.Tokenizer.from_file(_find_vocab(path, vocab), max_length,
                                          tokenizer_backend)
  if weights.is_converted_dir(path):
    marker_config = weights.load_converted_config(path)
    target = None
    if mesh is not None:
      shardings = param_shardings(marker_config, compute, max_length, mesh)
      shapes = jax.tree_util.tree_map(
          lambda box: box.value if hasattr(box, "value") else box,
          boxed_param_shapes(marker_config, compute, max_length),
          is_leaf=lambda x: hasattr(x, "names"))
      target = jax.tree_util.tree_map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, compute, sharding=sh), shapes, shardings)
    config, params = weights.load_converted(path, target)
    if target is None:
      params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, compute), params)
  else:
    _, config, params = read_weights(path, dtype=jnp.dtype(compute))
    params = place(params, config, compute, max_length, mesh)
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f"the vocabulary has {tok.vocab_size} pieces but the embedding only "
                     f"{config.vocab_size} rows: {path} and its spiece.model do not belong together")
  return TextEncoder(config, params, tok, compute, source, mesh, output_layer, pad_outputs,
                     append_token_embeddings)


def output_layer_of(text_config: Any) -> int:
  """A config's `text.output_layer`, or an encoder spec's (-1 where it is not named: configs
  saved before the key existed, specs of T5's own output)."""
  return int(text_config.get("output_layer", -1))


def reading_of(text_config: Any) -> tuple[int, bool]:
  """(output_layer, append_token_embeddings) of a config's `text` section or an encoder spec:
  which of the encoder's outputs the U-Nets read."""
  return output_layer_of(text_config), bool(text_config.get("append_token_embeddings", False))


def text_difference(a: Any, b: Any) -> tuple[str, Any, Any] | None:
  """The first of (encoder, width, max_length, output_layer, append_token_embeddings,
  pad_outputs, null) in which two configs' `text` sections differ, with both values; None when
  the U-Nets would read the same embeddings."""
  defaults = {"pad_outputs": "zero", "null": "zeros", "append_token_embeddings": False}
  for key in ("encoder", "width", "max_length", "output_layer", "append_token_embeddings",
              "pad_outputs", "null"):
    va, vb = ((output_layer_of(t) if key == "output_layer" else t.get(key, defaults.get(key)))
              for t in (a, b))
    if va != vb:
      return key, va, vb
  return None


def load_configured(text_config: Any, dtype: Any = "float32", **kwargs) -> TextEncoder:
  """`load_text_encoder` for a config's `text` section (encoder, max_length, output_layer,
  append_token_embeddings, pad_outputs)."""
  output_layer, append = reading_of(text_config)
  return load_text_encoder(text_config.encoder, max_length=text_config.max_length, dtype=dtype,
                           output_layer=output_layer, append_token_embeddings=append,
                           pad_outputs=text_config.get("pad_outputs", "zero"), **kwargs)


def place(params: Any, config: t5.T5Config, dtype: Any, max_length: int,
          mesh: jax.sharding.Mesh | None) -> Any:
  """Host arrays -> device arrays, sharded by logical axes when `mesh` is given.

  Each device receives only its slice (`make_array_from_callback`), so this also works when
  the mesh spans several processes that each hold the full host copy.
  """
  if mesh is None:
    return jax.tree_util.tree_map(jnp.asarray, params)
  return put_sharded(params, param_shardings(config, dtype, max_length, mesh))


def put_sharded(params: Any, shardings: Any) -> Any:
  """Host arrays that every process holds in full -> global arrays on `shardings`, each device
  receiving only its slice. (`jax.device_put` onto a multi-process mesh first checks that every
  process passed the same values: one compiled all-gather per array, slow for many leaves.)"""
  return jax.tree_util.tree_map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]),
      params, shardings)
