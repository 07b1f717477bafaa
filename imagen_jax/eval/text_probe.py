"""What a shapes encoder's tokens carry about each object of a caption, held-out pairs too.

A linear probe (ridge regression onto one-hot targets) reads an object's color and shape off the
vector at its shape word and off the vector at its color word. It is fit on the objects of
captions whose color-shape pairs are all seen in training images and scored on the objects with
a held-out pair (`shapes_grammar.HELDOUT_PAIRS`), which the text holds but no image does: an
encoder whose held-out nouns still read as their shape, bound to their own color, hands the
U-Net what it learned from seen pairs. `studies/text_probe.py` runs it over encoders and
pretraining objectives; the tests check the shipped pretrained encoder with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
import sentencepiece as spm

from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.text import pretrain
from imagen_jax.text import t5

LENGTH = 16  # the demo's text.max_length: every grammar caption fits


@dataclasses.dataclass(frozen=True)
class Row:
  caption: int     # index into the captions
  position: int    # the token of the probed word
  color: int
  shape: int
  heldout: bool    # the object's pair is held out of every image


def caption_rows(captions: Sequence[str], ids: np.ndarray, word_ids: dict[str, int],
                 word: str) -> list[Row]:
  """One row per object of every caption: the position of its shape (word="shape") or color
  word; each grammar word is one piece of the builtin vocabulary."""
  rows = []
  colors, shapes = list(grammar.COLORS), list(grammar.SHAPES)
  for i, text in enumerate(captions):
    prompt = grammar.parse(text)
    seen: dict[int, int] = {}
    for obj in prompt.objects:
      piece = word_ids[obj.shape if word == "shape" else obj.color]
      hits = [p for p in np.flatnonzero(ids[i] == piece) if p not in seen]
      position = int(hits[0])
      seen[position] = 1
      rows.append(Row(i, position, colors.index(obj.color), shapes.index(obj.shape),
                      (obj.color, obj.shape) in grammar.HELDOUT_PAIRS))
  return rows


def probe(features: np.ndarray, rows: list[Row], attribute: str, ridge: float = 1e-2
          ) -> dict[str, float]:
  """Accuracy of a ridge probe for `attribute` fit on seen objects: on seen and held-out ones."""
  x = np.stack([features[r.caption, r.position] for r in rows]).astype(np.float64)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  y = np.asarray([getattr(r, attribute) for r in rows])
  classes = int(y.max()) + 1
  train = np.asarray([not r.heldout for r in rows])
  onehot = np.eye(classes)[y[train]]
  w = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ onehot)
  correct = np.argmax(x @ w, axis=1) == y
  return {"seen": float(correct[train].mean()), "heldout": float(correct[~train].mean())}


def encoder_features(config: t5.T5Config, params, ids: np.ndarray, mask: np.ndarray,
                     output_layer: int) -> np.ndarray:
  module = t5.T5Encoder(config, output_layer=output_layer)
  return np.asarray(jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, ids, mask))


def grammar_ids(vocab: bytes) -> tuple[list[str], np.ndarray, dict[str, int]]:
  """Every grammar caption (`vocabulary_corpus`), their ids with EOS [N, LENGTH] (0-padded) and
  the id of each color and shape word (each one piece of the builtin vocabulary)."""
  processor = spm.SentencePieceProcessor(model_proto=vocab)
  corpus = grammar.vocabulary_corpus()
  ids = np.zeros((len(corpus), LENGTH), np.int32)
  for i, text in enumerate(corpus):
    pieces = processor.encode(text) + [pretrain.EOS_ID]
    ids[i, :len(pieces)] = pieces
  word_ids = {w: processor.piece_to_id("\u2581" + w) for w in (*grammar.COLORS, *grammar.SHAPES)}
  return corpus, ids, word_ids


def binding_scores(config: t5.T5Config, params: Any, vocab: bytes, output_layer: int = -1
                   ) -> dict[str, dict[str, float]]:
  """The probe's accuracy on seen and held-out objects for each (attribute, word) pair:
  {"color@shape": {"seen": .., "heldout": ..}, "shape@color": .., "shape@shape": ..,
  "color@color": ..} for the encoder's layer `output_layer`."""
  corpus, ids, word_ids = grammar_ids(vocab)
  features = encoder_features(config, params, ids, ids != pretrain.PAD_ID, output_layer)
  out = {}
  for word in ("shape", "color"):
    rows = caption_rows(corpus, ids, word_ids, word)
    for attribute in ("shape", "color"):
      out[f"{attribute}@{word}"] = probe(features, rows, attribute)
  return out
