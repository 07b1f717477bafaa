"""What a text encoder's tokens carry about each object of a shapes caption, held-out pairs too.

    python -m studies.text_probe [--pretrain_seeds=0,1,2] [--objectives=span,span+identity]

For each encoder (the random builtin one, and copies pretrained on the grammar's text with each
seed and objective) and each reading (token embeddings, the final layer), a linear probe (ridge
regression onto one-hot targets) reads an object's color and shape off the vector at its shape
word and off the vector at its color word. The probe is fit on the objects of captions whose
color-shape pairs are all seen in training images, and scored on the objects with a held-out
pair (`shapes_grammar.HELDOUT_PAIRS`), which the text holds but no image does: an encoder whose
held-out nouns still read as their shape, bound to their own color, hands the U-Net what it
learned from seen pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np
import sentencepiece as spm

from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.text import builtin
from imagen_jax.text import pretrain
from imagen_jax.text import t5
from imagen_jax.text import weights

_SEEDS = flags.DEFINE_list("pretrain_seeds", ["0", "1", "2"], "Pretraining seeds.")
_OBJECTIVES = flags.DEFINE_list("objectives", ["span"], "Pretraining objectives "
                                "(text.pretrain.OBJECTIVES).")
_STEPS = flags.DEFINE_integer("steps", 0, "Pretraining steps (0: the default).")
_ENCODER_DIRS = flags.DEFINE_list("encoder_dirs", [], "Shapes encoder directories to probe too "
                                  "(e.g. those studies.encoder_table wrote), as NAME=DIR.")


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


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top  # run from the repository
  vocab = builtin.shapes_vocabulary()
  processor = spm.SentencePieceProcessor(model_proto=vocab)
  config = builtin.shapes_tiny_config(processor.get_piece_size())
  corpus = grammar.vocabulary_corpus()
  ids = np.zeros((len(corpus), 16), np.int32)
  for i, text in enumerate(corpus):
    pieces = processor.encode(text) + [pretrain.EOS_ID]
    ids[i, :len(pieces)] = pieces
  mask = ids != pretrain.PAD_ID
  word_ids = {w: processor.piece_to_id("\u2581" + w) for w in (*grammar.COLORS, *grammar.SHAPES)}
  rows = {w: caption_rows(corpus, ids, word_ids, w) for w in ("shape", "color")}
  random = weights.hf_to_params(builtin.random_params(config), config)
  captions = [np.asarray(processor.encode(c)) for c in corpus]
  table = []

  def probe_encoder(name: str, seed: str, params) -> None:
    for layer in (0, -1):
      features = encoder_features(config, params, ids, mask, layer)
      row = {"encoder": name, "seed": seed, "layer": "tokens" if layer == 0 else "final"}
      for word in ("shape", "color"):
        for attribute in ("shape", "color"):
          scores = probe(features, rows[word], attribute)
          row[f"{attribute}@{word} seen"] = round(scores["seen"], 3)
          row[f"{attribute}@{word} heldout"] = round(scores["heldout"], 3)
      print(row, flush=True)
      table.append(row)

  probe_encoder("random", "-", random)
  for item in _ENCODER_DIRS.value:
    name, _, path = item.partition("=")
    probe_encoder(name, "-", weights.load_hf(path)[1])
  for objective in _OBJECTIVES.value:
    for seed in _SEEDS.value:
      settings = pretrain.PretrainConfig(seed=int(seed), objective=objective)
      if _STEPS.value:
        settings = dataclasses.replace(settings, steps=_STEPS.value)
      trained, metrics = pretrain.pretrain(config, random, captions, settings)
      print(f"pretrained {objective} seed {seed}: {metrics}", flush=True)
      probe_encoder(objective, seed, trained)
  harness.report("text_probe", table)


if __name__ == "__main__":
  app.run(main)
