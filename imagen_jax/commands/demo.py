"""`imagen-jax demo`: train, sample and score a tiny shapes cascade on a CPU (the README's main job).

    imagen-jax demo --workdir=demo_run          # tens of minutes on a small CPU
    imagen-jax demo --workdir=demo_run --quick  # a few minutes; the scores then mean little

Builds the shapes data, trains the base and SR stages, samples the validation and held-out
prompts and judges every image from its pixels; WORKDIR/report.html shows them. A second run
reuses what is done. What each step does: imagen_jax/workflows/demo.py.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from imagen_jax.workflows import demo
from imagen_jax.commands import shared_flags

shared_flags.use("workdir")
_QUICK = flags.DEFINE_bool("quick", False, "A short run for tests: few steps, few prompts.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None,
                                    "Prompts sampled per split (default 100; --quick 8); "
                                    "another count samples into WORKDIR/samples_N, reusing the "
                                    "trained stages.")


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("workdir")
  demo.run(shared_flags.WORKDIR.value, _QUICK.value, _NUM_PROMPTS.value)
