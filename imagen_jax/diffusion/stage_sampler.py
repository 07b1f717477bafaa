"""Sampling one stage: the network, its formulation and guidance as one x0 denoiser, then a sampler.

Used by the training loop's preview grids and by the cascade (sample/cascade.py); a whole stage's
sampling loop is one jitted function (the samplers scan over steps).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import edm
from imagen_jax.diffusion import editing
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import multistep
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import thresholding


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """How to sample one stage (each field is written to samples.jsonl).

  The defaults live in the stage config's `sample` section (configs/common.py), and
  `from_config` reads them from there, so a checkpoint samples as it was configured. The few
  defaults below are for workdirs whose config predates the field (they sample as before).
  """
  sampler: str        # samplers.SAMPLERS: ddpm, ddim, edm_heun, dpmpp_2m, dpmpp_3m, unipc, ...
  steps: int
  guidance: float
  threshold: str      # dynamic, static, none
  percentile: float   # dynamic thresholding percentile, 0-100 scale
  eta: float          # DDIM only
  aug_level: float    # SR stages: noise-aug level of the low-res input
  spacing: str = "time"                       # steps uniform in "time" or in "logsnr"
  unipc_variant: str = "bh2"                  # UniPC's B(h): bh1 or bh2
  guidance_interval: tuple[float, ...] = ()   # (lo, hi] in EDM sigma; () = every step
  threshold_max: float = 0.0                  # dynamic thresholding's largest scale (0: none)

  def __post_init__(self):
    samplers.parse_sampler(self.sampler)  # a bad name fails here, before any compute
    object.__setattr__(self, "guidance_interval", guidance.check_interval(self.guidance_interval))
    if self.unipc_variant not in multistep.UNIPC_VARIANTS:
      raise ValueError(f"unknown UniPC variant {self.unipc_variant!r}; choose from "
                       f"{multistep.UNIPC_VARIANTS}")
    if self.spacing not in schedules.SPACINGS:
      raise ValueError(f"unknown step spacing {self.spacing!r}; choose from {schedules.SPACINGS}")
    thresholding.get_threshold_fn(self.threshold, self.percentile)  # names a bad method
    # A float here (steps=25.0 from a computed budget) would fail deep inside the sampler's jit.
    if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
      raise ValueError(f"sampling steps must be an integer, got {self.steps!r}")
    if self.steps < 1:
      raise ValueError(f"sampling needs at least one step, got {self.steps}")

  @classmethod
  def from_config(cls, sample_config: Any, **overrides) -> "StageSettings":
    fields = {f.name: sample_config[f.name] for f in dataclasses.fields(cls) if f.name in sample_config}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**fields)

  def network_evaluations(self, log_snr_fn: schedules.LogSnrFn) -> int:
    """Network passes per image with these settings (`samplers.network_evaluations`)."""
    return samplers.network_evaluations(
        self.sampler, self.steps, log_snr_fn, guided=self.guidance != 1.0, spacing=self.spacing,
        guidance_interval=self.guidance_interval)


class RowSettings(NamedTuple):
  """Each image's own settings of one stage, as arrays: traced, not static like StageSettings, so
  images with different values share one compiled program. They replace `settings.guidance`,
  `threshold` and `percentile`, and give the unconditional half of guidance its own text."""
  guidance: Any                # float32 [B]: guidance weight (1: the conditional alone)
  threshold: Any               # int32 [B]: index into thresholding.METHODS
  percentile: Any              # float32 [B]: dynamic thresholding's, 0-100 scale
  null_emb: Any = None         # float32 [B, L, D]: a negative prompt's embeddings (None: zeros)
  null_mask: Any = None        # bool [B, L]

  @classmethod
  def stack(cls, settings: Sequence[StageSettings], null_emb: Any = None,
            null_mask: Any = None) -> "RowSettings":
    """Host arrays of each image's StageSettings (its guidance, threshold and percentile)."""
    return cls(np.asarray([s.guidance for s in settings], np.float32),
               np.asarray([thresholding.METHODS.index(s.threshold) for s in settings], np.int32),
               np.asarray([s.percentile for s in settings], np.float32), null_emb, null_mask)


def image_keys(seed: int, indices: Any) -> jax.Array:
  """One PRNG key per image [N, 2]: image `i` of a run with `seed` is always sampled from the
  same noise, whatever batch it falls in."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def x0_denoiser(config: Any, model: Any, params: Any, text_emb: jax.Array, text_mask: jax.Array,
                guidance_weight: float | jax.Array, lowres: jax.Array | None = None,
                aug_log_snr: jax.Array | None = None,
                guidance_interval: guidance.Interval = (),
                null_text: tuple[jax.Array, jax.Array] | None = None) -> samplers.X0Fn:
  """x0_fn(z, log_snr) of a stage with classifier-free guidance (in its interval) folded in; the
  weight is one number or one per image [B], `null_text` the unconditional text (emb, mask).
  A network with a learned variance (`diffusion.variance`) has its prediction guided and its
  variance taken from the conditional pass, as IF's pipelines do."""

  def net(z, log_snr, emb, mask, lowres=None, aug_log_snr=None):
    return model.apply({"params": params}, z, log_snr, emb, mask, lowres=lowres,
                       aug_log_snr=aug_log_snr)

  variance = config.diffusion.get("variance", "fixed")
  channels = None if variance == "fixed" else 3
  guided = guidance.guided_model_fn(net, guidance_weight, guidance_interval, null_text, channels)
  extra = {} if lowres is None else {"lowres": lowres, "aug_log_snr": aug_log_snr}
  bound = lambda z, log_snr: guided(z, log_snr, text_emb, text_mask, **extra)
  if config.diffusion.formulation == "edm":
    return edm.denoiser(bound, config.diffusion.edm_sigma_data)
  return samplers.denoiser(bound, config.diffusion.parameterization, variance)


def sample_stage(config: Any, model: Any, params: Any, keys: jax.Array, text_emb: jax.Array,
           text_mask: jax.Array, settings: StageSettings, *, image_size: int | None = None,
           lowres: jax.Array | None = None, image: jax.Array | None = None,
           keep: jax.Array | None = None, start: float = 1.0, resample: int = 1, jump: int = 1,
           on_step: Callable[[int], None] | None = None,
           rows: RowSettings | None = None,
           null_text: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Images [B, S, S, 3] in [-1, 1] for text_emb [B, L, D] (and lowres [B, s, s, 3] for SR).

  `keys` [B] holds one PRNG key per image (raw keys: [B, 2]), so an image depends only on its key.
  Jit it with `settings` static (e.g. `jax.jit(functools.partial(sample, config, model,
  settings=...))`); `image_size` defaults to the stage's config.image_size. `rows` (traced)
  gives each image its own guidance weight, thresholding and unconditional text, in place of
  those of `settings`. `null_text` (emb [B, L, D], mask [B, L]) is the unconditional text where
  the stage's is not zeros (`text.null` "empty_prompt": the encoded empty prompt, IF's).

  Editing an input `image` [B, S, S, 3] in [-1, 1] (`diffusion.editing`): `start` < 1 begins
  from it noised to that time (image-to-image; static); `keep` [B, S, S, 1] (1 = keep) keeps
  that region of it (inpainting), with RePaint's `resample` / `jump` (static).
  """
  size = image_size or config.image_size
  batch = text_emb.shape[0]
  noise_key, aug_key, sample_key = (noise_lib.fold_in(keys, i) for i in range(3))
  aug_log_snr = None
  if config.stage == "sr":
    if lowres is None:
      raise ValueError("an SR stage needs the low-res images to condition on")
    lowres, aug_log_snr = augmentation.augment_lowres(
        config, aug_key, lowres, jnp.full((batch,), settings.aug_level, jnp.float32))
  weight = settings.guidance
  threshold_fn = thresholding.get_threshold_fn(settings.threshold, settings.percentile,
                                               settings.threshold_max)
  if rows is not None:
    weight = rows.guidance
    threshold_fn = lambda x0: thresholding.per_example_threshold(
        x0, rows.threshold, rows.percentile, settings.threshold_max)
    if rows.null_emb is not None:
      null_text = (rows.null_emb, rows.null_mask)
  x0_fn = x0_denoiser(config, model, params, text_emb, text_mask, weight,
                      lowres, aug_log_snr, settings.guidance_interval, null_text)
  noise = noise_lib.normal(noise_key, (batch, size, size, 3))
  out = samplers.solve(
      x0_fn, noise, sample_key, sampler=settings.sampler, num_steps=settings.steps,
      log_snr_fn=schedules.stage_log_snr_fn(config.diffusion),
      threshold_fn=threshold_fn,
      eta=settings.eta, spacing=settings.spacing, variant=settings.unipc_variant,
      start=start, init=image, known=None if keep is None else editing.Known(image, keep),
      resample=resample, jump=jump, on_step=on_step)
  return jnp.clip(out, -1.0, 1.0)
