"""`imagen-jax sample`: sample a cascade stitched from stage workdirs into PNGs.

    imagen-jax sample --stages=gs://b/base64,gs://b/sr256,gs://b/sr1024 \
        --prompt="a corgi wearing a red bow tie" --num_samples=4 --outdir=out \
        --guidance=5,8,8 --steps=256,128,64 --sampler=ddpm

Writes OUT/00000.png ... (the last stage), OUT/grid.png and OUT/samples.jsonl (one line per
image: file, prompt, seed, index and every stage's settings). With --save_stages, every
stage's output goes to OUT/stages/. Re-running into the same outdir with more prompts samples
only the new images; a finished image is never redone or overwritten.
"""

from __future__ import annotations

from typing import Sequence

from imagen_jax.commands import shared_flags
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib

shared_flags.use(*shared_flags.SAMPLING, "prompt", "prompts_file", "save_stages")

INPUT_ERRORS = (outdir_lib.SampleError, cascade_lib.ChainError, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("stages", "outdir")
  if shared_flags.NUM_SAMPLES.value < 1:
    raise outdir_lib.SampleError(
        f"--num_samples must be >= 1, got {shared_flags.NUM_SAMPLES.value}")
  prompts = outdir_lib.read_prompts(shared_flags.PROMPT.value, shared_flags.PROMPTS_FILE.value)
  cascade, settings = outdir_lib.load_cascade(shared_flags.STAGES.value,
                                              **shared_flags.sampling_options())
  records = outdir_lib.sample_to_outdir(
      cascade, prompts, shared_flags.OUTDIR.value, num_samples=shared_flags.NUM_SAMPLES.value,
      seed=shared_flags.SEED.value, settings=settings, batch_size=shared_flags.BATCH_SIZE.value,
      save_stages=shared_flags.SAVE_STAGES.value)
  print(f"{len(records)} images in {shared_flags.OUTDIR.value} (grid.png, samples.jsonl)")
