"""What a text encoder's tokens carry about each object of a shapes caption, held-out pairs too.

    python -m studies.text_probe [--pretrain_seeds=0,1,2] [--objectives=span,span+identity]

For each encoder (the random builtin one, and copies pretrained on the grammar's text with each
seed and objective) and each reading (token embeddings, the final layer), a linear probe
(`imagen_jax.eval.text_probe`) (ridge
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
import numpy as np
import sentencepiece as spm

from imagen_jax.eval import text_probe
from imagen_jax.text import builtin
from imagen_jax.text import pretrain
from imagen_jax.text import weights

_SEEDS = flags.DEFINE_list("pretrain_seeds", ["0", "1", "2"], "Pretraining seeds.")
_OBJECTIVES = flags.DEFINE_list("objectives", ["span"], "Pretraining objectives "
                                "(text.pretrain.OBJECTIVES).")
_STEPS = flags.DEFINE_integer("steps", 0, "Pretraining steps (0: the default).")
_ENCODER_DIRS = flags.DEFINE_list("encoder_dirs", [], "Shapes encoder directories to probe too "
                                  "(e.g. those studies.encoder_table wrote), as NAME=DIR.")


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top  # run from the repository
  vocab = builtin.shapes_vocabulary()
  processor = spm.SentencePieceProcessor(model_proto=vocab)
  config = builtin.shapes_tiny_config(processor.get_piece_size())
  random = weights.hf_to_params(builtin.random_params(config), config)
  captions = [np.asarray(processor.encode(c)) for c in text_probe.grammar_ids(vocab)[0]]
  table = []

  def probe_encoder(name: str, seed: str, params) -> None:
    for layer in (0, -1):
      row = {"encoder": name, "seed": seed, "layer": "tokens" if layer == 0 else "final"}
      for key, scores in text_probe.binding_scores(config, params, vocab, layer).items():
        row[f"{key} seen"] = round(scores["seen"], 3)
        row[f"{key} heldout"] = round(scores["heldout"], 3)
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
