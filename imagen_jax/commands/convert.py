"""`imagen-jax convert`: DeepFloyd IF's stages from diffusers' format into stage workdirs, and back.

    imagen-jax convert --from=diffusers --unet=IF-I-XL-v1.0/unet --workdir=if_base
    imagen-jax convert --from=diffusers --unet=IF-II-L-v1.0/unet --workdir=if_sr
    imagen-jax convert --to=diffusers --workdir=if_base_lora --out=exported/unet

Importing reads the U-Net's config.json and safetensors (one file, the fp16 variant, or shards)
with no torch, the pipeline's scheduler (`--scheduler`, default the `scheduler/` beside the
U-Net), and for an SR stage its `image_noising_scheduler/`; the stage's config comes from the
files (a setting imagen-jax cannot run is refused, naming the key). The prompt encoder is the
pipeline's `text_encoder/` where there is one, else `--text_encoder`. Exporting writes
config.json + safetensors that `UNet2DConditionModel.from_pretrained` loads, a LoRA workdir's
adapters merged in (`--lora_scale`), and the scheduler's config beside it.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.interop import if_stage

FROM = flags.DEFINE_enum("from", None, ["diffusers"], "Import a stage from this format.")
TO = flags.DEFINE_enum("to", None, ["diffusers"], "Export a stage workdir to this format.")
UNET = config_lib.DEFINE_path("unet", None, "The diffusers U-Net directory (or its pipeline's).")
SCHEDULER = config_lib.DEFINE_path("scheduler", None, "The DDPMScheduler's directory (default: "
                                   "the scheduler/ beside the U-Net).")
TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "The T5 encoder the stage reads (default: "
                                   "the pipeline's text_encoder/, else t5-v1_1-xxl).")
VARIANT = flags.DEFINE_string("variant", None, "Weights variant to read (e.g. fp16; default: the "
                              "float32 files where there are some, else fp16).")
LOWRES_SIZE = flags.DEFINE_integer("lowres_size", 0, "SR stages: the low-res input's size (default "
                                   "a quarter of the stage's: IF-II's 64 -> 256).")
NOISE_LEVEL = flags.DEFINE_integer("noise_level", if_stage.DEFAULT_NOISE_LEVEL, "SR stages: the "
                                   "augmentation timestep sampling uses (IF-II's pipeline: 250).")
OUT = config_lib.DEFINE_path("out", None, "Export: the U-Net directory to write.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                          "Export: the tensors' dtype.")
STEP = flags.DEFINE_integer("step", None, "Export: the checkpoint step (default: the latest).")
shared_flags.use("workdir", "lora_scale")

INPUT_ERRORS = (if_stage.ConvertError, FileNotFoundError, ValueError)


def main(argv: Sequence[str]) -> None:
  del argv
  if (FROM.value is None) == (TO.value is None):
    raise if_stage.ConvertError("give one of --from=diffusers (import) or --to=diffusers (export)")
  shared_flags.require("workdir")
  workdir = shared_flags.WORKDIR.value
  if FROM.value:
    if not UNET.value:
      raise if_stage.ConvertError("--from=diffusers needs --unet=DIR (a U-Net directory)")
    kwargs = dict(lowres_size=LOWRES_SIZE.value, noise_level=NOISE_LEVEL.value)
    if TEXT_ENCODER.value:
      kwargs["text_encoder"] = TEXT_ENCODER.value
    config = if_stage.import_stage(UNET.value, workdir, SCHEDULER.value, variant=VARIANT.value,
                                   **kwargs)
    print(f"{workdir}: a {config.stage!r} stage, {config.image_size}x{config.image_size}, "
          f"text {config.text.encoder} ({config.text.max_length} tokens)")
  else:
    if not OUT.value:
      raise if_stage.ConvertError("--to=diffusers needs --out=DIR")
    weights = if_stage.export_stage(workdir, OUT.value, step=STEP.value, dtype=DTYPE.value,
                                    lora_scale=shared_flags.LORA_SCALE.value)
    print(f"wrote {weights}")
