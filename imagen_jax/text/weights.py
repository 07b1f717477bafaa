"""T5 v1.1 weights from Hugging Face and t5x checkpoints, and our converted Orbax form.

All readers return `(T5Config, params)`, where params is a nested dict of NumPy arrays in the
layout of `t5.T5Encoder` (t5x names; kernels [in, out]):

    token_embedder/embedding             [vocab, d_model]   HF shared.weight
    relpos_bias/rel_embedding            [heads, buckets]   HF block.0...relative_attention_bias.weight^T
    layers_i/attention/{query,key,value}/kernel  [d_model, heads*d_kv]  HF SelfAttention.{q,k,v}.weight^T
    layers_i/attention/out/kernel        [heads*d_kv, d_model]          HF SelfAttention.o.weight^T
    layers_i/mlp/{wi_0,wi_1}/kernel      [d_model, d_ff]   HF DenseReluDense.{wi_0,wi_1}.weight^T
    layers_i/mlp/wo/kernel               [d_ff, d_model]   HF DenseReluDense.wo.weight^T
    layers_i/{pre_attention,pre_mlp}_layer_norm/scale  [d_model]  HF layer.{0,1}.layer_norm.weight
    encoder_norm/scale                   [d_model]          HF encoder.final_layer_norm.weight

Decoder tensors (full T5 checkpoints) are ignored; any other difference from the expected set
raises `WeightMismatchError` listing the missing and unexpected tensors and the shape conflicts.

Directory layouts:
- Hugging Face: config.json, model.safetensors or model.safetensors.index.json + shards, and
  spiece.model.
- t5x: a `checkpoint_N/` directory (or its parent: the latest step) holding the msgpack file
  `checkpoint` whose leaves are arrays or TensorStore specs of zarr arrays stored beside it.
- converted: `imagen_t5.json`, spiece.model and an Orbax checkpoint `params/` (`convert`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from flax import serialization
import numpy as np
from safetensors import numpy as st_numpy

from imagen_jax.core import fileio
from imagen_jax.text import t5

CONVERTED_MARKER = "imagen_t5.json"
ORBAX_PARAMS = "params"
VOCAB_FILE = "spiece.model"


class WeightMismatchError(ValueError):
  """The checkpoint's tensors do not fit the encoder; the message lists every difference."""

  def __init__(self, source: str, missing: list[str], unexpected: list[str],
               shape_conflicts: list[tuple[str, tuple, tuple]]):
    self.missing, self.unexpected, self.shape_conflicts = missing, unexpected, shape_conflicts
    lines = [f"weights in {source} do not match the T5 v1.1 encoder:"]
    if missing:
      lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
    for name, want, got in shape_conflicts:
      lines.append(f"  shape conflict: {name} is {tuple(got)}, expected {tuple(want)}")
    super().__init__("\n".join(lines))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def expected_shapes(config: t5.T5Config) -> dict[str, tuple[int, ...]]:
  """Our flat parameter names and shapes for `config` (no arrays are made)."""
  c = config
  inner = c.num_heads * c.d_kv
  shapes = {"token_embedder/embedding": (c.vocab_size, c.d_model),
            "relpos_bias/rel_embedding": (c.num_heads, c.relative_attention_num_buckets),
            "encoder_norm/scale": (c.d_model,)}
  for i in range(c.num_layers):
    p = f"layers_{i}"
    shapes.update({
        f"{p}/pre_attention_layer_norm/scale": (c.d_model,),
        f"{p}/attention/query/kernel": (c.d_model, inner),
        f"{p}/attention/key/kernel": (c.d_model, inner),
        f"{p}/attention/value/kernel": (c.d_model, inner),
        f"{p}/attention/out/kernel": (inner, c.d_model),
        f"{p}/pre_mlp_layer_norm/scale": (c.d_model,),
        f"{p}/mlp/wi_0/kernel": (c.d_model, c.d_ff),
        f"{p}/mlp/wi_1/kernel": (c.d_model, c.d_ff),
        f"{p}/mlp/wo/kernel": (c.d_ff, c.d_model),
    })
  return shapes


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
  return np.asarray(array) if dtype is None else np.asarray(array).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- Hugging Face

_HF_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def hf_name_map(config: t5.T5Config) -> dict[str, tuple[str, bool]]:
  """HF tensor name -> (our name, transpose?) for every encoder tensor."""
  names = {"shared.weight": ("token_embedder/embedding", False),
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               ("relpos_bias/rel_embedding", True),
           "encoder.final_layer_norm.weight": ("encoder_norm/scale", False)}
  for i in range(config.num_layers):
    hf, ours = f"encoder.block.{i}.layer", f"layers_{i}"
    for short, long in _HF_ATTENTION.items():
      names[f"{hf}.0.SelfAttention.{short}.weight"] = (f"{ours}/attention/{long}/kernel", True)
    names[f"{hf}.0.layer_norm.weight"] = (f"{ours}/pre_attention_layer_norm/scale", False)
    for w in ("wi_0", "wi_1", "wo"):
      names[f"{hf}.1.DenseReluDense.{w}.weight"] = (f"{ours}/mlp/{w}/kernel", True)
    names[f"{hf}.1.layer_norm.weight"] = (f"{ours}/pre_mlp_layer_norm/scale", False)
  return names


def config_from_hf(values: Mapping[str, Any], source: str = "config.json") -> t5.T5Config:
  """Our T5Config from a Hugging Face T5 config.json (only T5 v1.1's gated-GELU is supported)."""
  proj = values.get("feed_forward_proj", "relu")
  if proj != "gated-gelu":
    raise ValueError(f"{source}: feed_forward_proj is {proj!r}; this encoder is T5 v1.1 "
                     "(gated-gelu). Original T5 (relu) and other variants are not supported.")
  missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
             if k not in values]
  if missing:
    raise ValueError(f"{source} lacks {missing}")
  return t5.T5Config(
      vocab_size=int(values["vocab_size"]), d_model=int(values["d_model"]),
      d_kv=int(values["d_kv"]), d_ff=int(values["d_ff"]), num_heads=int(values["num_heads"]),
      num_layers=int(values["num_layers"]),
      relative_attention_num_buckets=int(values.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(values.get("relative_attention_max_distance", 128)),
      layer_norm_epsilon=float(values.get("layer_norm_epsilon", 1e-6)))


def config_to_hf(config: t5.T5Config) -> dict[str, Any]:
  """A Hugging Face config.json for an encoder of this shape (used by the builtin model)."""
  return {
      "architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": True,
      "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv,
      "d_ff": config.d_ff, "num_heads": config.num_heads, "num_layers": config.num_layers,
      "num_decoder_layers": config.num_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "layer_norm_epsilon": config.layer_norm_epsilon, "feed_forward_proj": "gated-gelu",
      "dense_act_fn": "gelu_new", "is_gated_act": True, "dropout_rate": 0.0,
      "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
      "decoder_start_token_id": 0,
  }


def _hf_ignored(name: str) -> bool:
  # A full T5 checkpoint also holds the decoder and LM head: not ours to check.
  return name.startswith(("decoder.", "lm_head.")) or name == "encoder.embed_tokens.weight"


def hf_to_params(tensors: Mapping[str, np.ndarray], config: t5.T5Config, source: str = "",
                 dtype: Any = None) -> dict[str, Any]:
  """Maps HF tensors (names -> arrays in HF layout) to our nested params; checks everything."""
  tensors = dict(tensors)
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]  # untied export
  names = hf_name_map(config)
  want = expected_shapes(config)
  missing = [n for n in names if n not in tensors]
  unexpected = sorted(n for n in tensors if n not in names and not _hf_ignored(n))
  conflicts = []
  flat = {}
  for hf, (ours, transpose) in names.items():
    if hf not in tensors:
      continue
    shape = tuple(tensors[hf].shape)
    expect = tuple(reversed(want[ours])) if transpose else want[ours]
    if shape != expect:
      conflicts.append((hf, expect, shape))
      continue
    array = tensors[hf]
    flat[ours] = _cast(np.ascontiguousarray(array.T) if transpose else array, dtype)
  if missing or unexpected or conflicts:
    raise WeightMismatchError(source or "Hugging Face tensors", missing, unexpected, conflicts)
  return unflatten(flat)


def params_to_hf(params: Mapping[str, Any], config: t5.T5Config) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_params` (encoder tensors in HF layout)."""
  flat = flatten(params)
  out = {}
  for hf, (ours, transpose) in hf_name_map(config).items():
    array = np.asarray(flat[ours])
    out[hf] = np.ascontiguousarray(array.T) if transpose else array
  return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  if fileio.is_remote(path):
    return st_numpy.load(fileio.read_bytes(path))
  return st_numpy.load_file(path)


def is_hf_dir(path: str) -> bool:
  return fileio.exists(fileio.join(path, "config.json")) and (
      fileio.exists(fileio.join(path, "model.safetensors"))
      or fileio.exists(fileio.join(path, "model.safetensors.index.json")))


def load_hf(path: str, dtype: Any = None) -> tuple[t5.T5Config, dict[str, Any]]:
  """Reads a Hugging Face T5 / T5EncoderModel directory (safetensors, single or sharded)."""
  config_path = fileio.join(path, "config.json")
  config = config_from_hf(json.loads(fileio.read_text(config_path)), config_path)
  index_path = fileio.join(path, "model.safetensors.index.json")
  tensors: dict[str, np.ndarray] = {}
  if fileio.exists(index_path):
    weight_map = json.loads(fileio.read_text(index_path))["weight_map"]
    for shard in sorted(set(weight_map.values())):
      for name, array in _read_safetensors(fileio.join(path, shard)).items():
        if not _hf_ignored(name) or name == "encoder.embed_tokens.weight":
          tensors[name] = array
  else:
    tensors = {name: array for name, array in
               _read_safetensors(fileio.join(path, "model.safetensors")).items()
               if not _hf_ignored(name) or name == "encoder.embed_tokens.weight"}
  return config, hf_to_params(tensors, config, source=path, dtype=dtype)


# ----------------------------------------------------------------------------------- t5x

_T5X_LAYER = re.compile(r"^layers_(\d+)/")


def find_t5x_checkpoint(path: str) -> str:
  """The `checkpoint_N` directory: `path` itself, or the highest step inside it."""
  if fileio.exists(fileio.join(path, "checkpoint")):
    return path
  steps = [(int(m.group(1)), name) for name in fileio.listdir(path)
           if (m := re.fullmatch(r"checkpoint_(\d+)", name))]
  if not steps:
    raise FileNotFoundError(f"no t5x checkpoint in {path}: expected a 'checkpoint' msgpack file "
                            "or checkpoint_<step> directories")
  return fileio.join(path, max(steps)[1])


def is_t5x_dir(path: str) -> bool:
  try:
    find_t5x_checkpoint(path)
    return True
  except FileNotFoundError:
    return False


def _read_tensorstore(checkpoint_dir: str, spec: Mapping[str, Any]) -> np.ndarray:
  """Reads a zarr array that t5x stored next to its msgpack file (the spec's path is relative)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top  # heavy: only t5x checkpoints need it
  spec = json.loads(json.dumps(spec))  # a private, JSON-plain copy
  kvstore = spec.get("kvstore")
  relative = kvstore.get("path") if isinstance(kvstore, dict) and "path" in kvstore else spec.pop("path")
  spec["kvstore"] = _kvstore_spec(fileio.join(checkpoint_dir, relative))
  spec.pop("path", None)
  return ts.open(spec, open=True, read=True).result().read().result()


def _kvstore_spec(path: str) -> dict[str, Any]:
  m = re.fullmatch(r"gs://([^/]+)/?(.*)", path)
  if m:
    return {"driver": "gcs", "bucket": m.group(1), "path": m.group(2)}
  return {"driver": "file", "path": path}


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and "driver" in value and (
      "kvstore" in value or "path" in value)


def read_t5x_target(path: str) -> dict[str, np.ndarray]:
  """Flat `{name: array}` of the model parameters (`target`) of a t5x checkpoint."""
  checkpoint_dir = find_t5x_checkpoint(path)
  contents = serialization.msgpack_restore(fileio.read_bytes(fileio.join(checkpoint_dir, "checkpoint")))
  # Legacy t5x: {"version": 3, "optimizer": {"target": ..., "state": ...}}; later: {"target": ...}.
  node = contents.get("optimizer", contents)
  if "target" not in node:
    raise ValueError(f"{checkpoint_dir}/checkpoint has no 'target' (model parameters); "
                     f"top-level keys: {sorted(contents)}")

  def leaves(tree, prefix):
    for key, value in tree.items():
      name = f"{prefix}/{key}" if prefix else key
      if _is_ts_spec(value):
        yield name, _read_tensorstore(checkpoint_dir, value)
      elif isinstance(value, Mapping):
        yield from leaves(value, name)
      elif isinstance(value, str) and value.startswith("PLACEHOLDER://"):
        # Orbax-written t5x checkpoints: the array is a zarr directory named by its path.
        spec = {"driver": "zarr", "kvstore": {"path": value[len("PLACEHOLDER://"):]}}
        yield name, _read_tensorstore(checkpoint_dir, spec)
      else:
        yield name, np.asarray(value)

  return dict(leaves(node["target"], ""))


def config_from_t5x(flat: Mapping[str, np.ndarray],
                    overrides: Mapping[str, Any] | None = None) -> t5.T5Config:
  """Infers the shape from the tensors (t5x checkpoints carry no config); `overrides` wins."""
  try:
    vocab, d_model = flat["token_embedder/embedding"].shape
    heads, buckets = flat["encoder/relpos_bias/rel_embedding"].shape
    inner = flat["encoder/layers_0/attention/query/kernel"].shape[1]
    d_ff = flat["encoder/layers_0/mlp/wi_0/kernel"].shape[1]
  except KeyError as e:
    raise WeightMismatchError("t5x checkpoint", [str(e.args[0])], [], []) from None
  layers = {int(m.group(1)) for name in flat
            if name.startswith("encoder/") and (m := _T5X_LAYER.match(name[len("encoder/"):]))}
  values = dict(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner) // int(heads),
                d_ff=int(d_ff), num_heads=int(heads), num_layers=len(layers),
                relative_attention_num_buckets=int(buckets))
  values.update(overrides or {})
  return t5.T5Config(**values)


def t5x_to_params(flat: Mapping[str, np.ndarray], config: t5.T5Config, source: str = "",
                  dtype: Any = None) -> dict[str, Any]:
  """Maps a flat t5x target (`encoder/...`, `token_embedder/...`) to our params; checks it."""
  want = expected_shapes(config)
  ours = {}
  unexpected = []
  for name, array in flat.items():
    if name.startswith("decoder/"):
      continue
    key = name[len("encoder/"):] if name.startswith("encoder/") else name
    if key in want:
      ours[key] = array
    else:
      unexpected.append(name)
  missing = [("" if n.startswith("token_embedder") else "encoder/") + n
             for n in want if n not in ours]
  conflicts = [(n, want[n], tuple(a.shape)) for n, a in ours.items()
               if tuple(a.shape) != want[n]]
  if missing or unexpected or conflicts:
    raise WeightMismatchError(source or "t5x checkpoint", missing, sorted(unexpected), conflicts)
  return unflatten({n: _cast(a, dtype) for n, a in ours.items()})


def load_t5x(path: str, dtype: Any = None,
             config_overrides: Mapping[str, Any] | None = None) -> tuple[t5.T5Config, dict[str, Any]]:
  """Reads a t5x T5 v1.1 checkpoint directory.

  The relative-attention max distance is not in the tensors: 128 (T5 v1.1's) unless a
  `config.json` (Hugging Face style) next to the checkpoint or `config_overrides` says otherwise.
  """
  flat = read_t5x_target(path)
  overrides = {}
  for candidate in (fileio.join(path, "config.json"),):
    if fileio.exists(candidate):
      overrides = config_from_hf(json.loads(fileio.read_text(candidate)), candidate).to_dict()
  overrides.update(config_overrides or {})
  config = config_from_t5x(flat, overrides)
  return config, t5x_to_params(flat, config, source=path, dtype=dtype)


# ------------------------------------------------------------------------ converted (Orbax)

def is_converted_dir(path: str) -> bool:
  return fileio.exists(fileio.join(path, CONVERTED_MARKER))


def save_converted(path: str, config: t5.T5Config, params: Mapping[str, Any], vocab: bytes,
                   source: str) -> None:
  """Writes params as an Orbax checkpoint plus the config and vocabulary; loads shard-wise."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  # heavy: only converted weights need it
  fileio.makedirs(path)
  params_path = fileio.join(path, ORBAX_PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_path if fileio.is_remote(path) else os.path.abspath(params_path), params,
                    force=True)
  checkpointer.wait_until_finished()
  fileio.write_bytes(fileio.join(path, VOCAB_FILE), vocab)
  dtypes = sorted({str(np.asarray(a).dtype) for a in flatten(params).values()})
  marker = {"format": "imagen-jax T5 v1.1 encoder", "version": 1, "config": config.to_dict(),
            "param_dtypes": dtypes, "source": source}
  # The marker goes last: a directory without it is an unfinished conversion.
  fileio.write_bytes(fileio.join(path, CONVERTED_MARKER), json.dumps(marker, indent=2).encode())


def load_converted_config(path: str) -> t5.T5Config:
  marker = json.loads(fileio.read_text(fileio.join(path, CONVERTED_MARKER)))
  return t5.T5Config.from_dict(marker["config"])


def load_converted(path: str, target: Any = None) -> tuple[t5.T5Config, dict[str, Any]]:
  """Restores a converted encoder. `target`: a tree of jax.ShapeDtypeStruct with shardings
  (each host then reads only its shards); None restores plain arrays on the default device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  # heavy: only converted weights need it
  config = load_converted_config(path)
  params_path = fileio.join(path, ORBAX_PARAMS)
  params_path = params_path if fileio.is_remote(path) else os.path.abspath(params_path)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(params_path, target) if target is not None else \
      checkpointer.restore(params_path)
  return config, params
