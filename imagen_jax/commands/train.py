"""`imagen-jax train`: train one cascade stage, sharded over a device mesh, resumable.

    imagen-jax train --config=configs/base64.py:tiny --workdir=/tmp/base64_tiny

Running the same command again resumes from the latest complete checkpoint; SIGTERM
(preemption) saves and exits 0. On a pod, every host runs the same command (see
core/distributed.py for how the processes find each other). The loop: train/train.py.
"""

from __future__ import annotations

from typing import Sequence

from imagen_jax.commands import shared_flags
from imagen_jax.train import train

shared_flags.use("config", "workdir", *shared_flags.DISTRIBUTED)


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("config", "workdir")
  shared_flags.initialize_distributed()  # before anything touches a device
  train.train_and_evaluate(shared_flags.CONFIG.value, shared_flags.WORKDIR.value)
