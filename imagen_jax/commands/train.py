"""`imagen-jax train`: train one cascade stage, sharded over a device mesh, resumable.

    imagen-jax train --config=configs/base64.py:tiny --workdir=/tmp/base64_tiny

Running the same command again resumes from the latest complete checkpoint; SIGTERM
(preemption) saves and exits 0. On a pod, every host runs the same command (see
core/distributed.py for how the processes find each other). The loop: train/train.py.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from imagen_jax.commands import shared_flags
from imagen_jax.train import train

shared_flags.use("config", "workdir", *shared_flags.DISTRIBUTED)
STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Save a checkpoint at this step and exit; the learning-rate and EMA "
    "schedules stay those of config.total_steps, so running the command again without it (on "
    "any number of devices) continues the same run.")


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("config", "workdir")
  shared_flags.initialize_distributed()  # before anything touches a device
  train.train_and_evaluate(shared_flags.CONFIG.value, shared_flags.WORKDIR.value,
                           stop_at_step=STOP_AT_STEP.value)
