"""Text pretraining of the builtin encoder (`text.pretrain`, builtin:shapes-tiny-pretrained)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from imagen_jax.eval import text_probe
from imagen_jax.text import builtin
from imagen_jax.text import pretrain
from imagen_jax.text import weights

VOCAB = 128  # a vocabulary size for span corruption alone


def restore(inputs, targets):
  """The caption that span corruption's (inputs, targets) came from."""
  spans, current = {}, None
  for token in targets[:-1]:
    if token >= VOCAB:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs[:-1]:
    out += spans[token] if token >= VOCAB else [token]
  return out


@pytest.mark.parametrize("length", [3, 8, 13])
def test_span_corruption_hides_spans_that_the_targets_restore(length):
  rng = np.random.default_rng(0)
  ids = np.arange(10, 10 + length)
  for _ in range(50):
    inputs, targets = pretrain.corrupt(ids, VOCAB, rng)
    assert inputs[-1] == targets[-1] == pretrain.EOS_ID
    assert restore(inputs, targets) == list(ids)
    hidden = sum(1 for t in targets[:-1] if t < VOCAB)
    assert hidden == int(np.clip(round(length * pretrain.NOISE_DENSITY), 1, length - 1))
    sentinels = [t for t in inputs if t >= VOCAB]
    assert sentinels == list(range(VOCAB, VOCAB + len(sentinels)))  # one per span, in order
    assert targets[0] == VOCAB  # the targets start with the first sentinel


def test_the_shipped_pretrained_encoder_binds_each_noun_to_its_own_color(monkeypatch, tmp_path):
  """builtin:shapes-tiny-pretrained is the shipped asset (nothing pretrains at run time), and its
  final layer carries each object's color at its shape word and its shape at its color word,
  for color-shape pairs no image holds too: a probe fit on seen pairs reads the held-out ones.
  The random encoder's final layer does not (the check can fail)."""
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained at run time"))
  path = builtin.materialize("builtin:shapes-tiny-pretrained")
  record = json.load(open(os.path.join(path, "pretraining.json")))
  assert {k: record[k] for k in dataclasses.asdict(builtin.PRETRAINING)} == dataclasses.asdict(
      builtin.PRETRAINING)
  assert record["last_loss"] < 0.2 * record["first_loss"]
  scores = {}
  for name in ("builtin:shapes-tiny-pretrained", "builtin:shapes-tiny"):
    config, params = weights.load_hf(builtin.materialize(name))
    probed = text_probe.binding_scores(config, params, builtin.shapes_vocabulary())
    scores[name] = (probed["color@shape"]["heldout"], probed["shape@color"]["heldout"])
  assert min(scores["builtin:shapes-tiny-pretrained"]) > 0.95, scores
  assert max(scores["builtin:shapes-tiny"]) < 0.5, scores


@pytest.mark.slow
def test_pretraining_learns_the_grammar_and_keeps_the_encoder_shapes(monkeypatch, tmp_path):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path))
  out = str(tmp_path / "asset.safetensors")
  builtin.remake_pretrained_asset(out, dataclasses.replace(builtin.PRETRAINING, steps=300))
  path = str(tmp_path / "remade")
  builtin.write_shipped_pretrained(path, asset=out)
  metrics = json.load(open(os.path.join(path, "pretraining.json")))
  assert metrics["objective"] == "span+neighbors" and metrics["steps"] == 300
  assert metrics["last_loss"] < 0.7 * metrics["first_loss"]
  # Half the hidden words are colors and shapes the context cannot tell (every pair is in the
  # text); a quarter of the others is what chance would give.
  assert metrics["fresh_corruption_accuracy"] > 0.3
  config, trained = weights.load_hf(path)
  _, random = weights.load_hf(builtin.materialize("builtin:shapes-tiny"))
  flat_trained, flat_random = weights.flatten(trained), weights.flatten(random)
  assert flat_trained.keys() == flat_random.keys()
  for name, value in flat_trained.items():
    assert value.shape == flat_random[name].shape, name
  embedding = "token_embedder/embedding"
  assert flat_trained[embedding].shape[0] == config.vocab_size == builtin.GRAMMAR_PIECES + 256
  assert np.abs(flat_trained[embedding] - flat_random[embedding]).max() > 1e-3
