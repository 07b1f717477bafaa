"""Tiny stage configs and settings the tests share, loaded by the CLI's rules."""

import os
from typing import Any, Mapping, Sequence

import ml_collections

# The one `shapes` dataset of the test session (64x64; conftest.py's `shapes_data_dir`).
SHAPES_SIZES = {"train": 512, "validation": 64, "heldout": 64}

# A run of a few steps: no preview samples, a log line and a scalar every step.
SHORT_RUN = {"batch_size": 8, "total_steps": 4, "checkpoint_every": 2, "log_every": 1,
             "sample_every": 0, "optimizer.warmup_steps": 2}
# base64:tiny at 16x16 with a narrower U-Net: it compiles twice as fast; the loop is the same.
SMALL_BASE_NET = {"image_size": 16, "model.channel_mult": (1, 2), "model.model_dim": 16,
                  "model.emb_dim": 32, "model.pool_width": 32}

# Fine-tuning the tiny cascade's 16x16 base (`configs/base64.py:tiny,finetune`): a few LoRA steps.
FINETUNE_RUN = {"image_size": 16, "total_steps": 4, "batch_size": 8,
                "optimizer.warmup_steps": 1, "finetune.lora_rank": 2, "checkpoint_every": 2}
FINETUNE_PRIOR = {"finetune.prior_class": "a triangle", "finetune.prior_images": 3,
                  "finetune.prior_weight": 0.5}


def tiny_config(stage: str = "base64", variant: str = "tiny",
                **settings: Any) -> ml_collections.ConfigDict:
  """`configs/<stage>.py:<variant>` with `settings` ({"optimizer.lr": 3e-4, ...}) applied by the
  CLI's rules: one loader for every test, so a renamed config field is fixed in one place."""
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top  # after conftest's environment
  return config_lib.load_config(f"configs/{stage}.py:{variant}", settings)


def short_run_settings(data_dir: str | None = None, *, small_net: bool = True,
                       **overrides: Any) -> dict[str, Any]:
  """Settings of base64:tiny for a short training run (SHORT_RUN, and SMALL_BASE_NET unless
  `small_net` is False) reading `data_dir`, then `overrides`: for tiny_config or config_flags."""
  settings = {**SHORT_RUN, **(SMALL_BASE_NET if small_net else {})}
  if data_dir is not None:
    settings["data.data_dir"] = data_dir
  return {**settings, **overrides}


def short_run_config(data_dir: str | None = None, *, small_net: bool = True,
                     **overrides: Any) -> ml_collections.ConfigDict:
  """The config of short_run_settings: a tiny base stage that trains a few steps in seconds."""
  return tiny_config("base64", **short_run_settings(data_dir, small_net=small_net, **overrides))


def config_flags(settings: Mapping[str, Any]) -> list[str]:
  """The `--config.KEY=VALUE` flags that apply `settings` on the command line."""
  return [f"--config.{key}={value}" for key, value in settings.items()]


def train_tiny_stage(workdir: str | os.PathLike, stage: str, data_dir: str,
                     **overrides: Any) -> str:
  """Trains `configs/<stage>.py:tiny` a few steps into `workdir` (a stage for sampling tests)."""
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top  # after conftest's environment
  settings = {"data.data_dir": data_dir, "batch_size": 8, "total_steps": 2, "log_every": 2,
              "checkpoint_every": 2, "sample_every": 0, **overrides}
  train.train_and_evaluate(tiny_config(stage, **settings), str(workdir))
  return str(workdir)


def stage_config(name: str = "base64", **overrides: Any) -> ml_collections.ConfigDict:
  """A tiny stage as the data tests read it: batches of 16, 2 prefetched (pinned here, so that a
  change to the tiny configs does not move what these tests count)."""
  return tiny_config(name, **{"batch_size": 16, "data.prefetch": 2, **overrides})


def data_config(source: str, data_dir: str, **fields: Any) -> ml_collections.ConfigDict:
  """The `data` part of stage_config() reading `source`, set as given (not resolved: the source
  tests pass malformed strings)."""
  config = stage_config()
  config.data.source, config.data.data_dir = source, data_dir
  for key, value in fields.items():
    config.data[key] = value
  return config.data


def fake_tokenize(captions: Sequence[str], length: int = 16):
  """A tokenizer without a vocabulary: the caption's UTF-8 bytes as ids, 0 for padding."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = np.zeros((len(captions), length), np.int32)
  for i, caption in enumerate(captions):
    codes = np.frombuffer(caption.encode()[:length], np.uint8)
    ids[i, :len(codes)] = codes
  return ids, ids > 0
