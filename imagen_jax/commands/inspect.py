"""`imagen-jax inspect`: the resolved config and the model's parameter table, without training.

Parameters are shaped with `jax.eval_shape`, so the paper-size models cost no memory:

    imagen-jax inspect --config=configs/base64.py:paper
"""

from __future__ import annotations

from typing import Sequence

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib

shared_flags.use("config")


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("config")
  config = shared_flags.CONFIG.value
  print(config_lib.to_json(config))
  if "model" in config and config.model:
    from imagen_jax import models  # pylint: disable=g-import-not-at-top
    table, total = models.parameter_table(config)
    print(table)
    print(f"total_params: {total}")
