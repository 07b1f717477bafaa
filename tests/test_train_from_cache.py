"""Training from a real embedding cache: `imagen-jax encode` on the shapes captions, then a tiny
base stage trained with `config.data.embed_cache`, killed after a checkpoint and resumed.

The cache is keyed by position in its caption source and the pipeline looks embeddings up by
the example's index in the data split, so the captions are written to a text file in split
order (line i = record i): the test checks both that the pipeline's batches are the encoder's
output for their own captions and that a resumed run is bitwise the uninterrupted one.
"""

import logging
import os
import signal

import ml_dtypes
import numpy as np
import pytest

from helpers import (  # pylint: disable=g-bad-import-order
    assert_trees_equal, config_flags, run_cli, short_run_settings, start_stopping_after_checkpoint)
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import sources
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import load_text_encoder
from imagen_jax.train import train as train_lib

STEPS, STOP_AT = 4, 2
MAX_LENGTH = 16  # configs/encode.py:tiny and configs/base64.py:tiny agree on it


def overrides(data_dir, cache):
  """base64:tiny for a short run (helpers.short_run_settings), reading text from `cache`."""
  return short_run_settings(data_dir, **{"data.embed_cache": cache, "text.max_length": MAX_LENGTH,
                                         "total_steps": STEPS, "checkpoint_every": STOP_AT})


def encode_split_captions(data_dir, tmp_path, env):
  """`imagen-jax encode` over the train split's captions in split order: (captions, cache)."""
  captions = list(sources.get_captions(config_lib.load_config(
      "configs/base64.py:tiny", {"data.data_dir": data_dir}).data))
  # One caption per line: a newline inside one would shift every later index.
  assert captions and all(c and "\n" not in c and "\r" not in c for c in captions)
  text = tmp_path / "captions.txt"
  text.write_text("\n".join(captions) + "\n")
  cache = str(tmp_path / "cache")
  out = run_cli("encode", "--config=configs/encode.py:tiny", f"--config.source=text:{text}",
                f"--config.output={cache}", f"--config.text.max_length={MAX_LENGTH}",
                "--config.progress=False", env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert cache_lib.verify(cache).ok
  return captions, cache


def run_until_killed(workdir, config_overrides, env):
  """Trains in a subprocess; SIGKILLs it once its step-STOP_AT checkpoint is complete."""
  flags = [f"--workdir={workdir}", "--config=configs/base64.py:tiny",
           *config_flags(config_overrides)]
  proc, = start_stopping_after_checkpoint([flags], workdir, STOP_AT, env)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL


def stored(workdir, step):
  restored = checkpoints.Checkpointer(workdir, read_only=True).restore_as_stored(step)
  return restored["state"], restored["data"]


def assert_batches_are_the_encoders_output(config, captions):
  """The pipeline's text_emb / text_mask are the encoder's own output for each example's caption."""
  data = pipeline_lib.make_pipeline(config, embedding_lookup=train_lib.open_embedding_cache(config))
  encoder = load_text_encoder("builtin:shapes-tiny", max_length=MAX_LENGTH)
  try:
    batches = [next(data) for _ in range(2)]
  finally:
    data.close()
  indices = np.concatenate([b["index"] for b in batches])
  assert len(set(indices.tolist())) == len(indices) > 1
  fresh, fresh_mask = encoder.encode([captions[i] for i in indices])
  emb = np.concatenate([b["text_emb"] for b in batches])
  mask = np.concatenate([b["text_mask"] for b in batches])
  np.testing.assert_array_equal(mask, fresh_mask)
  # The cache stores bf16: the fresh f32 encoding rounded to bf16, one ulp of leeway for a
  # different batch composition.
  want = fresh.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_allclose(emb, want, rtol=2 ** -7, atol=1e-6)
  assert not emb[~mask].any() and emb[mask].std() > 0.1


@pytest.mark.slow
def test_train_from_the_encode_cache_and_resume_exactly(tmp_path, shapes_data_dir, monkeypatch,
                                                        caplog):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "models"))  # builtin:shapes-tiny's files
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # 8 fake devices, as in this process (conftest)
  captions, cache = encode_split_captions(shapes_data_dir, tmp_path, env)
  settings = overrides(shapes_data_dir, cache)
  config = config_lib.load_config("configs/base64.py:tiny", settings)
  assert_batches_are_the_encoders_output(config, captions)

  # The uninterrupted run saves only its last step (a save costs seconds on 2 cores); how often
  # a run saves does not change what it trains.
  straight = str(tmp_path / "straight")
  train_lib.train_and_evaluate(config_lib.load_config(
      "configs/base64.py:tiny", {**settings, "checkpoint_every": STEPS}), straight)
  killed = str(tmp_path / "killed")
  run_until_killed(killed, settings, env)
  assert checkpoints.Checkpointer(killed, read_only=True).all_steps() == [STOP_AT]
  with caplog.at_level(logging.INFO, logger="absl"):
    train_lib.train_and_evaluate(config, killed)
  assert f"Resuming from the checkpoint at step {STOP_AT}" in caplog.text

  state_a, data_a = stored(straight, STEPS)
  state_b, data_b = stored(killed, STEPS)
  assert_trees_equal(state_a, state_b)  # params, EMA params, optimizer state, step: bitwise
  assert data_a == data_b  # the input iterator stands at the same example
  assert int(np.asarray(state_b["step"])) == STEPS
