"""`builtin:shapes-tiny`: a tiny random T5 v1.1 with a vocabulary of the shapes captions, and
`builtin:shapes-tiny-pretrained`: the same encoder trained on the grammar's text alone (T5's span
corruption plus a neighbor objective, `pretrain`), shipped as package data like a released T5.

The demo and the tiny configs condition on them (text.width 64, max_length 16). The vocabulary
is the grammar's 128 pieces (each grammar word one piece) plus SentencePiece's 256 byte pieces:
a word the grammar never used ("blicket", a name, any script) is spelled in known pieces and
bytes, never collapsed into the one unknown id, so fine-tuning can teach it (`finetune`). Each is written
once as a real Hugging Face directory (config.json, model.safetensors, spiece.model) under
`$IMAGEN_JAX_CACHE` (default ~/.cache/imagen_jax) and loaded through the Hugging Face path like
any user checkpoint.

Reproducible bytes on every machine: the weights come from NumPy's legacy `RandomState`, whose
stream NumPy keeps fixed across versions and platforms (NEP 19), and the safetensors header is
written with sorted keys. SentencePiece training is deterministic on one machine but its bytes
are not promised across versions, so the trained model ships as package data
(`assets/shapes_spiece.model`); `train_shapes_vocabulary()` is how it was made. Pretraining's
floats are not promised across CPUs either (XLA compiles other kernels for each), and it costs
minutes, so the pretrained encoder ships too (`assets/shapes_tiny_pretrained.safetensors`, its
pretraining settings and metrics in the file's metadata); `remake_pretrained_asset()` is how it
was made, and `write_encoder` pretrains other seeds and objectives for studies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import importlib.resources.abc
import io
import json
import os
import shutil
import tempfile
import uuid

from absl import logging
import numpy as np
import safetensors
from safetensors import numpy as st_numpy
import sentencepiece as spm

from imagen_jax.data import shapes_grammar
from imagen_jax.text import pretrain
from imagen_jax.text import t5
from imagen_jax.text import weights

PREFIX = "builtin:"
SEED = 20220523  # Imagen's arXiv date
# v2: byte fallback (ids 128-383). The grammar's ids and the rows of every weight they reach
# are v1's, so a cascade trained with v1 sees the same embeddings for every grammar caption.
# v3: the pretrained encoder's objective (`PRETRAINING`); shapes-tiny's bytes are v2's.
# v4: the pretrained encoder is the shipped asset, not pretrained on each machine.
VERSION = 4
VOCAB_ASSET = "shapes_spiece.model"
PRETRAINED_ASSET = "shapes_tiny_pretrained.safetensors"
GRAMMAR_PIECES = 128  # pieces of the trained vocabulary; the byte pieces follow them


def shapes_tiny_config(vocab_size: int) -> t5.T5Config:
  return t5.T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                     num_layers=2)


def train_shapes_vocabulary() -> bytes:
  """Trains the BPE vocabulary of the shape captions (128 pieces: each grammar word is one),
  then appends the 256 byte pieces (`with_byte_fallback`).

  pad 0, EOS 1, unk 2, no BOS: T5's special ids. Normalisation is nmt_nfkc, as T5's.
  """
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(shapes_grammar.vocabulary_corpus()), model_writer=out,
      vocab_size=128, model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
  return with_byte_fallback(out.getvalue())


def with_byte_fallback(model_proto: bytes) -> bytes:
  """The SentencePiece model with the 256 byte pieces <0x00>..<0xFF> appended and byte fallback
  on: a character outside the pieces becomes its UTF-8 bytes instead of the unknown id.

  Appended, not trained in (`byte_fallback=True` at training puts them at ids 3-258): every
  existing piece keeps its id. Needs protobuf (only to remake the shipped asset).
  """
  from sentencepiece import sentencepiece_model_pb2 as model_pb2  # pylint: disable=g-import-not-at-top  # optional: protobuf, only to remake the shipped asset
  proto = model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  if proto.trainer_spec.byte_fallback:
    return model_proto
  for byte in range(256):
    proto.pieces.add(piece=f"<0x{byte:02X}>", score=0.0,
                     type=model_pb2.ModelProto.SentencePiece.BYTE)
  proto.trainer_spec.byte_fallback = True
  return proto.SerializeToString()


def _asset(name: str) -> importlib.resources.abc.Traversable:
  return importlib.resources.files("imagen_jax.text").joinpath("assets", name)


def shapes_vocabulary() -> bytes:
  return _asset(VOCAB_ASSET).read_bytes()


def random_params(config: t5.T5Config, seed: int = SEED,
                  stream_vocab: int = GRAMMAR_PIECES) -> dict[str, np.ndarray]:
  """Float32 weights with T5's initialisation scales, from a stream fixed by `seed`.

  The first `stream_vocab` embedding rows come from the main stream (so every other weight is
  the same for any vocabulary size: v1's weights); rows past them from a stream of their own.
  Returns flat Hugging Face names in HF layout, in a fixed order.
  """
  rng = np.random.RandomState(seed)
  c = config
  inner = c.num_heads * c.d_kv
  std = {"query": (c.d_model * c.d_kv) ** -0.5, "key": c.d_model ** -0.5,
         "value": c.d_model ** -0.5, "out": inner ** -0.5, "wi_0": c.d_model ** -0.5,
         "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5, "rel_embedding": c.d_model ** -0.5,
         "embedding": 1.0}
  flat = {}
  for name, shape in weights.expected_shapes(c).items():  # insertion order is fixed
    leaf = name.split("/")[-2 if name.endswith("kernel") else -1]
    if name.endswith("scale"):
      flat[name] = np.ones(shape, np.float32)
    elif leaf == "embedding" and shape[0] > stream_vocab:
      extra = np.random.RandomState(seed + 1).standard_normal((shape[0] - stream_vocab,) + shape[1:])
      flat[name] = np.concatenate([rng.standard_normal((stream_vocab,) + shape[1:]), extra]
                                  ).astype(np.float32)
    else:
      flat[name] = (rng.standard_normal(shape) * std[leaf]).astype(np.float32)
  return weights.params_to_hf(weights.unflatten(flat), c)


def cache_root() -> str:
  return os.environ.get("IMAGEN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "imagen_jax")


def write_hf_dir(path: str, config: t5.T5Config, tensors: dict[str, np.ndarray],
                 vocab: bytes) -> None:
  """A Hugging Face T5EncoderModel directory with deterministic bytes."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(weights.config_to_hf(config), f, indent=2, sort_keys=True)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(st_numpy.save({k: tensors[k] for k in sorted(tensors)}, metadata={"format": "pt"}))
  with open(os.path.join(path, weights.VOCAB_FILE), "wb") as f:
    f.write(vocab)


MODELS = ("shapes-tiny", "shapes-tiny-pretrained")


# The pretraining of `builtin:shapes-tiny-pretrained`. Span corruption alone leaves a noun's output
# vector without its adjective for pairs held out of the images, where the neighbor heads make
# every noun carry its color (studies/text_probe.py measures both).
PRETRAINING = pretrain.PretrainConfig(objective="span+neighbors")


def pretrained_params(config: t5.T5Config, vocab: bytes,
                      settings: pretrain.PretrainConfig = PRETRAINING, init_seed: int = SEED
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """The random weights of `init_seed` trained on every caption of the grammar with `settings`
  (HF layout), and the pretraining's metrics."""
  processor = spm.SentencePieceProcessor(model_proto=vocab)
  captions = [np.asarray(processor.encode(c)) for c in shapes_grammar.vocabulary_corpus()]
  start = weights.hf_to_params(random_params(config, init_seed), config)
  logging.info("Pretraining a shapes encoder on %d captions (%s, seed %d)", len(captions),
               settings.objective, settings.seed)
  trained, metrics = pretrain.pretrain(config, start, captions, settings)
  logging.info("Pretraining: loss %.3f -> %.3f, span-token accuracy on fresh corruptions %.3f",
               metrics["first_loss"], metrics["last_loss"], metrics["fresh_corruption_accuracy"])
  return weights.params_to_hf(trained, config), metrics


def materialize(name: str) -> str:
  """The directory of builtin model `name` (`MODELS`, with or without "builtin:"), written
  once, atomically."""
  short = name[len(PREFIX):] if name.startswith(PREFIX) else name
  if short not in MODELS:
    raise ValueError(f"unknown builtin text encoder {name!r}; available: "
                     f"{', '.join(PREFIX + m for m in MODELS)}")
  target = os.path.join(cache_root(), "builtin", f"{short}-v{VERSION}")
  if os.path.exists(os.path.join(target, "model.safetensors")):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{short}-{uuid.uuid4().hex[:8]}-",
                         dir=os.path.dirname(target))
  try:
    if short == "shapes-tiny":
      write_encoder(tmp)
    else:
      write_shipped_pretrained(tmp)
    try:
      os.rename(tmp, target)  # atomic; fails if another process got there first
    except OSError:
      if not os.path.exists(os.path.join(target, "model.safetensors")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def write_encoder(path: str, settings: pretrain.PretrainConfig | None = None,
                  init_seed: int = SEED) -> None:
  """Writes a shapes encoder directory at `path`: the random tiny T5 of `init_seed`, pretrained
  on the grammar's text with `settings` unless they are None (with its pretraining.json)."""
  vocab = shapes_vocabulary()
  config = shapes_tiny_config(spm.SentencePieceProcessor(model_proto=vocab).get_piece_size())
  if settings is None:
    write_hf_dir(path, config, random_params(config, init_seed), vocab)
    return
  tensors, metrics = pretrained_params(config, vocab, settings, init_seed)
  write_hf_dir(path, config, tensors, vocab)
  with open(os.path.join(path, "pretraining.json"), "w", encoding="utf-8") as f:
    json.dump({**metrics, **dataclasses.asdict(settings), "init_seed": init_seed}, f, indent=2,
              sort_keys=True)


def write_shipped_pretrained(path: str, asset: str | None = None) -> None:
  """Writes `builtin:shapes-tiny-pretrained`'s directory at `path` from the shipped asset (or
  the file `asset`, as `remake_pretrained_asset` writes it), with its pretraining.json."""
  with importlib.resources.as_file(_asset(PRETRAINED_ASSET)) as shipped:
    with safetensors.safe_open(asset or shipped, "np") as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}
      record = json.loads(f.metadata()["pretraining"])
  vocab = shapes_vocabulary()
  config = shapes_tiny_config(spm.SentencePieceProcessor(model_proto=vocab).get_piece_size())
  write_hf_dir(path, config, tensors, vocab)
  with open(os.path.join(path, "pretraining.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)


def remake_pretrained_asset(out: str, settings: pretrain.PretrainConfig = PRETRAINING) -> None:
  """Pretrains the shipped encoder again (minutes on a CPU) and writes it to `out` as the asset
  is stored: HF-layout tensors with sorted keys, the pretraining record as metadata."""
  with tempfile.TemporaryDirectory() as tmp:
    write_encoder(tmp, settings)
    with open(os.path.join(tmp, "pretraining.json"), encoding="utf-8") as f:
      record = f.read()
    tensors = st_numpy.load_file(os.path.join(tmp, "model.safetensors"))
  with open(out, "wb") as f:
    f.write(st_numpy.save({k: tensors[k] for k in sorted(tensors)},
                          metadata={"format": "pt", "pretraining": record}))


def resolve(path: str) -> str:
  """The directory of an encoder `path`: a builtin name's, written once (`materialize`); any
  other path as given."""
  return materialize(path) if path.startswith(PREFIX) else path


def directory_digest(path: str) -> str:
  """sha256 over the builtin directory's files (a reproducibility check)."""
  h = hashlib.sha256()
  for fname in ("config.json", "model.safetensors", weights.VOCAB_FILE):
    with open(os.path.join(path, fname), "rb") as f:
      h.update(fname.encode() + b"\0" + f.read())
  return h.hexdigest()
