"""T5's tokenization: a SentencePiece model, EOS appended, truncation and right padding.

    tokenizer = Tokenizer.from_file("spiece.model", max_length=128)
    batch = tokenizer(["a red circle", ""])   # batch.ids [2, 128] int32, batch.mask [2, 128] bool

A caption longer than `max_length - 1` pieces keeps its first `max_length - 1` pieces and the
EOS (as Hugging Face's tokenizer with truncation and seqio's append_eos_after_trim do); each
one is counted and logged. With the `tf` extra, `backend="seqio"` encodes with seqio's
`SentencePieceVocabulary` instead (same ids; seqio is imported only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from imagen_jax.core import fileio
from imagen_jax.data.preprocess import CaptionError

PAD_ID = 0  # T5 pads with id 0 and gives padding a zero mask


@dataclasses.dataclass
class TokenizedBatch:
  ids: np.ndarray      # int32 [B, max_length], PAD_ID after the EOS
  mask: np.ndarray     # bool [B, max_length], True on real tokens (EOS included)
  lengths: np.ndarray  # int32 [B], real tokens per caption (>= 1: the EOS)
  truncated: int       # how many captions lost pieces to max_length


def caption_text(caption: Any, key: Any) -> str:
  """The caption as str (bytes are UTF-8 decoded); anything else raises naming `key`."""
  if isinstance(caption, str):
    return caption
  if isinstance(caption, (bytes, np.bytes_)):
    return bytes(caption).decode("utf-8")
  if isinstance(caption, np.str_):
    return str(caption)
  if isinstance(caption, np.ndarray) and caption.ndim == 0:
    return caption_text(caption.item(), key)
  raise CaptionError(f"caption of example {key!r} is not text: {type(caption).__name__} "
                     f"{caption!r:.80}")


class Tokenizer:
  """SentencePiece ids with EOS, truncated and right-padded to `max_length`."""

  def __init__(self, model_proto: bytes, max_length: int = 128, backend: str = "sentencepiece",
               model_path: str | None = None):
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    self.model_proto = model_proto
    self.max_length = max_length
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError("the SentencePiece model has no EOS piece; T5 vocabularies have </s> = 1")
    self.vocab_size = self._sp.get_piece_size()
    self.truncated_total = 0
    self.backend = backend
    self._seqio_vocab = None
    if backend == "seqio":
      self._seqio_vocab = _seqio_vocabulary(model_proto, model_path)
    elif backend != "sentencepiece":
      raise ValueError(f"unknown tokenizer backend {backend!r}: use sentencepiece or seqio")

  @classmethod
  def from_file(cls, path: str, max_length: int = 128, backend: str = "sentencepiece") -> "Tokenizer":
    return cls(fileio.read_bytes(path), max_length, backend, model_path=path)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sp"] = state["_seqio_vocab"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    if self.backend == "seqio":
      self._seqio_vocab = _seqio_vocabulary(self.model_proto, None)

  def pieces(self, text: str) -> list[int]:
    """The caption's piece ids without EOS."""
    if self._seqio_vocab is not None:
      return [int(i) for i in self._seqio_vocab.encode(text)]
    return self._sp.encode(text)

  def __call__(self, captions: Sequence[Any], keys: Sequence[Any] | None = None) -> TokenizedBatch:
    """Tokenizes a batch; `keys` name the examples in errors (default: their positions)."""
    keys = list(range(len(captions))) if keys is None else keys
    n = len(captions)
    ids = np.full((n, self.max_length), PAD_ID, np.int32)
    lengths = np.zeros((n,), np.int32)
    truncated = 0
    for row, (caption, key) in enumerate(zip(captions, keys)):
      pieces = self.pieces(caption_text(caption, key))
      if len(pieces) > self.max_length - 1:
        pieces = pieces[:self.max_length - 1]
        truncated += 1
      pieces.append(self.eos_id)
      ids[row, :len(pieces)] = pieces
      lengths[row] = len(pieces)
    if truncated:
      self.truncated_total += truncated
      logging.warning("%d of %d captions were longer than max_length=%d tokens and were "
                      "truncated (%d so far)", truncated, n, self.max_length,
                      self.truncated_total)
    mask = np.arange(self.max_length)[None, :] < lengths[:, None]
    return TokenizedBatch(ids, mask, lengths, truncated)


def _seqio_vocabulary(model_proto: bytes, model_path: str | None):
  """seqio's SentencePieceVocabulary over the same model (needs the `tf` extra)."""
  try:
    import seqio  # pylint: disable=g-import-not-at-top  # optional: the tf extra
  except ImportError as e:
    raise ImportError("backend='seqio' needs the tf extra: pip install 'imagen-jax[tf]'") from e
  if model_path is None or fileio.is_remote(model_path) and not model_path.startswith("gs://"):
    fd, model_path = tempfile.mkstemp(suffix=".model")
    with os.fdopen(fd, "wb") as f:
      f.write(model_proto)
  return seqio.SentencePieceVocabulary(model_path)
