"""DeepFloyd IF's stages as ordinary stage workdirs, and back (`imagen-jax convert`).

    workdir = if_stage.import_stage("IF-I-XL-v1.0/unet", "if_base")      # + its scheduler
    if_stage.export_stage("if_base_lora", "out/unet")                       # LoRA merged

Importing reads a diffusers U-Net directory (`diffusers_format.read_unet`) and the pipeline's
DDPMScheduler, derives the stage's config from them (configs/if_stage1.py or if_stage2.py, with
the network, schedule, variance and sampling settings the files say) and writes step 0 of an
Orbax checkpoint holding the weights as the stage's EMA parameters: `sample`, `edit`,
`finetune --base`, `eval`, `inspect` and the Python API read it as any trained stage. Exporting
writes a stage of IF's architecture (imported, fine-tuned - LoRA merged - or trained from
scratch) as config.json + safetensors that `UNet2DConditionModel.from_pretrained` loads, with
its scheduler_config.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.interop import diffusers_format
from imagen_jax.train import plan as plan_lib

_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCES = {"learned_range": "learned_range", "fixed_small": "fixed"}
_SPACINGS = {"leading": "leading", "trailing": "time"}
DEFAULT_NOISE_LEVEL = 250  # IF-II's pipeline: the low-res image's augmentation timestep


class ConvertError(ValueError):
  """A checkpoint or scheduler setting the conversion cannot take; the message names it."""


def _refuse(key: str, value: Any, why: str) -> ConvertError:
  return ConvertError(f"unsupported {key}={value!r}: {why}")


def _schedule(scheduler: diffusers_format.DDPMSchedulerConfig, what: str) -> tuple[str, int]:
  """(our schedule name, timesteps) of a DDPMScheduler; refuses what the core does not run."""
  if scheduler.beta_schedule not in _BETA_SCHEDULES:
    raise _refuse(f"{what}.beta_schedule", scheduler.beta_schedule,
                  f"the discrete schedules are {sorted(_BETA_SCHEDULES)}")
  if scheduler.beta_schedule == "linear" and (scheduler.beta_start, scheduler.beta_end) != (
      1e-4, 0.02):
    raise _refuse(f"{what}.beta_start/beta_end", (scheduler.beta_start, scheduler.beta_end),
                  "linear betas run from 1e-4 to 0.02 here")
  for key, default in (("trained_betas", None), ("steps_offset", 0),
                       ("rescale_betas_zero_snr", False)):
    if getattr(scheduler, key) != default:
      raise _refuse(f"{what}.{key}", getattr(scheduler, key), f"only {default!r} is supported")
  return _BETA_SCHEDULES[scheduler.beta_schedule], scheduler.num_train_timesteps


def stage_config(unet: diffusers_format.DiffusersUNet,
                 scheduler: diffusers_format.DDPMSchedulerConfig,
                 noising: diffusers_format.DDPMSchedulerConfig | None = None, *,
                 text_encoder: str = "t5-v1_1-xxl", max_length: int = 77,
                 lowres_size: int = 0, noise_level: int = DEFAULT_NOISE_LEVEL
                 ) -> ml_collections.ConfigDict:
  """The stage config of an IF U-Net and its scheduler (and for an SR stage, the pipeline's
  `image_noising_scheduler`): configs/if_stage1.py or if_stage2.py with what the files say."""
  cfg = unet.config
  sr = cfg.in_channels == 6
  config = config_lib.load_config("configs/if_stage2.py" if sr else "configs/if_stage1.py")
  config.model.diffusers = ml_collections.ConfigDict(unet.diffusers_config)
  size = int(unet.diffusers_config.get("sample_size") or config.image_size)
  config.image_size = size
  config.text.encoder = config_lib.PATH_FIELDS["text.encoder"](text_encoder)
  config.text.width = cfg.text_dim
  config.text.max_length = max_length
  d = config.diffusion
  d.schedule, d.timesteps = _schedule(scheduler, "scheduler")
  if scheduler.prediction_type not in _PREDICTIONS:
    raise _refuse("scheduler.prediction_type", scheduler.prediction_type,
                  f"use one of {sorted(_PREDICTIONS)}")
  d.parameterization = _PREDICTIONS[scheduler.prediction_type]
  if scheduler.variance_type not in _VARIANCES:
    raise _refuse("scheduler.variance_type", scheduler.variance_type,
                  f"use one of {sorted(_VARIANCES)}")
  d.variance = _VARIANCES[scheduler.variance_type]
  if scheduler.timestep_spacing not in _SPACINGS:
    raise _refuse("scheduler.timestep_spacing", scheduler.timestep_spacing,
                  f"use one of {sorted(_SPACINGS)}")
  s = config.sample
  s.sampler, s.spacing = "ddpm", _SPACINGS[scheduler.timestep_spacing]
  if scheduler.thresholding:
    s.threshold, s.percentile = "dynamic", 100.0 * scheduler.dynamic_thresholding_ratio
    s.threshold_max = float(scheduler.sample_max_value)
  elif scheduler.clip_sample:
    if scheduler.clip_sample_range != 1.0:
      raise _refuse("scheduler.clip_sample_range", scheduler.clip_sample_range,
                    "clipping is to [-1, 1] here")
    s.threshold = "static"
  else:
    s.threshold = "none"
  if sr:
    noising = noising or diffusers_format.DDPMSchedulerConfig(beta_schedule="squaredcos_cap_v2")
    config.lowres.aug_schedule, config.lowres.aug_timesteps = _schedule(
        noising, "image_noising_scheduler")
    config.lowres.size = lowres_size or size // 4
    if not 0 <= noise_level < config.lowres.aug_timesteps:
      raise _refuse("noise_level", noise_level,
                    f"a timestep of the noising schedule, 0..{config.lowres.aug_timesteps - 1}")
    s.aug_level = (noise_level + 1) / config.lowres.aug_timesteps
  models.build_model(config)  # a setting the stage cannot take is refused now, by name
  return config


def import_stage(unet_path: str, workdir: str, scheduler_path: str | None = None, *,
                 variant: str | None = None, **config_kwargs) -> ml_collections.ConfigDict:
  """Writes a stage workdir (step 0) from a diffusers U-Net directory (or a pipeline directory
  holding `unet/`); `scheduler_path` defaults to the pipeline's `scheduler/`, and an SR stage's
  augmentation schedule is read from its `image_noising_scheduler/` where there is one.
  `config_kwargs` go to `stage_config`. Returns the config written."""
  unet_dir = diffusers_format.unet_directory(unet_path)
  pipeline = os.path.dirname(os.path.abspath(unet_dir))
  if fileio.exists(str(checkpoints.checkpoint_dir(workdir))) and (
      checkpoints.Checkpointer(workdir, read_only=True).all_steps()):
    raise ConvertError(f"{workdir} already holds a stage's checkpoints: give an empty workdir")
  unet = diffusers_format.read_unet(unet_dir, variant)
  scheduler = diffusers_format.read_scheduler_config(
      scheduler_path or os.path.join(pipeline, "scheduler"))
  noising = None
  if os.path.isdir(os.path.join(pipeline, "image_noising_scheduler")):
    noising = diffusers_format.read_scheduler_config(
        os.path.join(pipeline, "image_noising_scheduler"))
  if "text_encoder" not in config_kwargs and os.path.isdir(os.path.join(pipeline, "text_encoder")):
    config_kwargs["text_encoder"] = os.path.join(pipeline, "text_encoder")
  config = stage_config(unet, scheduler, noising, **config_kwargs)
  write_stage(workdir, config, {"unet": unet.params})
  return config


# The config file a converted workdir carries, so `--config=WORKDIR/config.py[:finetune]` names
# the stage's own settings (fine-tuning it, or training its architecture anew).
_CONFIG_FILE = '''"""The config of the stage in this workdir, as `imagen-jax convert` derived it from its files.

    imagen-jax finetune --config={name}/config.py:finetune --base={name} --workdir=W ...

The argument `finetune` applies the fine-tuning variant (configs/common.py `finetuning`).
"""

import os

from imagen_jax.configs import common
from imagen_jax.core import checkpoints


def get_config(arg=None):
  config, _ = checkpoints.restore_config(os.path.dirname(os.path.abspath(__file__)), 0)
  _, finetune = common.parse_variants(arg, default="stage")
  return common.finetuning(config) if finetune else config
'''


def write_stage(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """Step 0 of a stage workdir: `params` (the stage network's tree) as its EMA parameters, and
  the workdir's `config.py`."""
  manager = checkpoints.Checkpointer(workdir, async_save=False)
  try:
    manager.save(0, {"step": np.int32(0), "ema_params": params}, None, config)
    manager.wait()
  finally:
    manager.close()
  if fileio.is_remote(workdir):
    return  # a config file is imported from a local path only
  with open(os.path.join(workdir, "config.py"), "w", encoding="utf-8") as f:
    f.write(_CONFIG_FILE.format(name=os.path.basename(os.path.normpath(workdir))))


def network_params(workdir: str, step: int | None = None, lora_scale: float = 1.0
                   ) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, the network's parameters as host arrays) of a stage workdir at `step` (latest):
  its EMA parameters, a LoRA workdir's merged into its base's (`lora_scale`)."""
  name = checkpoints.restore_config(workdir, step)[0].model.name  # before any weight is read
  if name != "if_unet":
    raise ConvertError(f"{workdir} holds a {name!r} network; only stages of IF's architecture "
                       "(model.name 'if_unet') export to diffusers' format")
  config, params, _ = plan_lib.load_network(workdir, step, lora_scale=lora_scale)
  return config, jax.device_get(params)


def export_stage(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                 lora_scale: float = 1.0) -> str:
  """Writes the stage at `workdir` as diffusers' U-Net directory `out` (config.json +
  safetensors in `dtype`) and its scheduler beside it (`out`/../scheduler when `out` ends in
  `unet`, else `out`/scheduler_config.json). Returns the weights file."""
  config, params = network_params(workdir, step, lora_scale)
  weights = diffusers_format.write_unet(out, params["unet"], config.model.diffusers.to_dict(),
                                        dtype)
  scheduler_dir = (os.path.join(os.path.dirname(os.path.abspath(out)), "scheduler")
                   if os.path.basename(os.path.normpath(out)) == "unet" else out)
  os.makedirs(scheduler_dir, exist_ok=True)
  with open(os.path.join(scheduler_dir, "scheduler_config.json"), "w", encoding="utf-8") as f:
    json.dump(scheduler_config(config), f, indent=2, sort_keys=True)
  return weights


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The DDPMScheduler config.json of a stage's schedule and sampling settings."""
  d, s = config.diffusion, config.sample
  names = {ours: theirs for theirs, ours in _BETA_SCHEDULES.items()}
  values = {"_class_name": "DDPMScheduler", "num_train_timesteps": int(d.timesteps),
            "beta_schedule": names[d.schedule],
            "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[d.parameterization],
            "variance_type": {v: k for k, v in _VARIANCES.items()}[d.variance],
            "timestep_spacing": {v: k for k, v in _SPACINGS.items()}.get(s.spacing, "leading"),
            "thresholding": s.threshold == "dynamic", "clip_sample": s.threshold == "static"}
  if s.threshold == "dynamic":
    values["dynamic_thresholding_ratio"] = s.percentile / 100.0
    values["sample_max_value"] = float(s.threshold_max) if s.threshold_max > 0 else 1e6
  return values
