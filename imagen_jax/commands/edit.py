"""`imagen-jax edit`: inpaint, change or upscale your image with a trained cascade.

    imagen-jax edit --mode=inpaint --stages=base64,sr256 --image=in.png --mask=mask.png \
        --prompt="a red circle at the top" --outdir=out          # mask: white = regenerate
    imagen-jax edit --mode=img2img --strength=0.6 --stages=base64,sr256 --image=in.png \
        --prompt="a blue circle at the top" --outdir=out
    imagen-jax edit --mode=upscale --stages=sr256 --image=small.png --prompt="..." --outdir=out

inpaint keeps the image outside the mask at every stage's resolution and regenerates the rest
(RePaint; --resample=N --jump=J add its resampling jumps, for ddpm, ddim and edm_heun);
img2img starts every stage from the image noised to time --strength (0 returns it, 1 ignores
it; the --steps run below that level); upscale runs SR stages alone on the image, resized to
the first one's low-res size. A non-square image needs --fit=pad or --fit=crop. Every input is
checked before any compute. The outdir is the sample command's (PNGs, grid.png, samples.jsonl
with the edit's settings and the inputs' sha256) and resumes the same way. A .jsonl
--prompts_file may give each line its own `image` and `mask`.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import edit_inputs
from imagen_jax.sample import outdir as outdir_lib

shared_flags.use(*shared_flags.SAMPLING, "prompt", "prompts_file", "save_stages")
_MODE = flags.DEFINE_enum("mode", None, list(edit_inputs.MODES), "inpaint, img2img or upscale.")
_IMAGE = config_lib.DEFINE_path("image", None, "The input image (PNG, JPEG, ...; local or gs://).")
_MASK = config_lib.DEFINE_path("mask", None,
                               "inpaint: a mask of the image's size, white = regenerate.")
_STRENGTH = flags.DEFINE_float(
    "strength", None, "img2img (default 0.6) and inpaint (default 1): start from the input "
    "noised to this time in [0, 1].")
_RESAMPLE = flags.DEFINE_integer("resample", 1, "inpaint: RePaint's resamplings per jump.")
_JUMP = flags.DEFINE_integer("jump", 1, "inpaint: RePaint's jump length, in steps.")
_FIT = flags.DEFINE_enum("fit", "none", list(edit_inputs.FITS),
                         "A non-square image: pad (black borders) or crop (centre square).")

DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "upscale": 1.0}

INPUT_ERRORS = (edit_inputs.EditError, outdir_lib.SampleError, cascade_lib.ChainError,
                FileNotFoundError)


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("mode", "stages", "outdir")
  if shared_flags.NUM_SAMPLES.value < 1:
    raise outdir_lib.SampleError(
        f"--num_samples must be >= 1, got {shared_flags.NUM_SAMPLES.value}")
  mode = _MODE.value
  strength = DEFAULT_STRENGTH[mode] if _STRENGTH.value is None else _STRENGTH.value
  edit = edit_inputs.Edit(mode, strength=strength, resample=_RESAMPLE.value, jump=_JUMP.value,
                      fit=_FIT.value)
  prompts = outdir_lib.read_prompts(shared_flags.PROMPT.value, shared_flags.PROMPTS_FILE.value)
  for item in prompts:  # --image / --mask apply to every prompt without its own
    if _IMAGE.value and not item.get("image"):
      item["image"] = _IMAGE.value
    if _MASK.value and not item.get("mask"):
      item["mask"] = _MASK.value
  cascade, settings = outdir_lib.load_cascade(
      shared_flags.STAGES.value, first_stage="sr" if mode == "upscale" else "base",
      **shared_flags.sampling_options())
  records = outdir_lib.sample_to_outdir(
      cascade, prompts, shared_flags.OUTDIR.value, num_samples=shared_flags.NUM_SAMPLES.value,
      seed=shared_flags.SEED.value, settings=settings, batch_size=shared_flags.BATCH_SIZE.value,
      save_stages=shared_flags.SAVE_STAGES.value, edit=edit)
  print(f"{len(records)} images in {shared_flags.OUTDIR.value} (grid.png, samples.jsonl)")
