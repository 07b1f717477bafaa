"""`imagen-jax finetune`: adapt a trained stage to a few images of a subject or style.

    imagen-jax finetune --config=configs/demo_base.py:finetune --base=demo_run/base \
        --workdir=blicket --config.data.source=folder:subject \
        --config.finetune.prior_class="a triangle"

`--config` is the base stage's own config file with its `finetune` variant (after the stage's
size variant, if any: `configs/base64.py:500m,finetune`); the subject folder holds 3-20 images
with captions that name the subject with a new word ("a blicket at the top"). The variant trains
LoRA adapters (rank 8 on the attention and dense layers) for 400 steps at a constant 1e-3 with
the base frozen (`--config.total_steps`, `--config.optimizer.lr` change them);
`--config.finetune.method=full` trains every parameter instead. `--config.finetune.prior_class`
adds DreamBooth's class-prior preservation: the command first samples `finetune.prior_images`
images of the class from the base stage into WORKDIR/prior, then trains on subject and class
images half and half. The run is the ordinary training loop: the same command resumes it.
Sample the result with the LoRA workdir in place of the stage:

    imagen-jax sample --stages=blicket,demo_run/sr --prompt="a blicket at the center" \
        --outdir=out [--lora_scale=1.0]
"""

from __future__ import annotations

from typing import Sequence

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.data import sources
from imagen_jax.train import plan as plan_lib
from imagen_jax.workflows import finetune

BASE = config_lib.DEFINE_path("base", None, "The trained stage's workdir to start from "
                              "(sets config.finetune.base).")
shared_flags.use("config", "workdir", *shared_flags.DISTRIBUTED)

INPUT_ERRORS = (plan_lib.FinetuneError, config_lib.ConfigError, sources.SourceError)


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("config", "workdir")
  config = shared_flags.CONFIG.value
  if BASE.value:
    config.finetune.base = BASE.value
  shared_flags.initialize_distributed()  # before anything touches a device
  finetune.run(config, shared_flags.WORKDIR.value)
