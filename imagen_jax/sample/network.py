"""One stage's network, loaded from its workdir and evaluated on given inputs.

    net = network.StageNetwork.from_workdir("if_base")      # any stage: trained, LoRA, imported
    out = net(x, timestep=np.array([999, 500]), text_emb=emb)           # [B, H, W, C_out]
    out = net(x, log_snr=np.array([-5.0, 0.0]), text_emb=emb, text_mask=mask)

For checking a converted stage against diffusers (`UNet2DConditionModel(sample, t,
encoder_hidden_states, class_labels=...)`): x is diffusers' `sample` in NHWC without the low-res
channels, `timestep` its t, `lowres` the noised up-sampled low-res image (an SR stage's other 3
channels) and `aug_timestep` its class label. Continuous-time stages take `log_snr` and
`aug_log_snr` instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax.diffusion import schedules
from imagen_jax.train import plan as plan_lib


@dataclasses.dataclass
class StageNetwork:
  """A stage's network and the parameters it samples with (EMA; LoRA merged)."""
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  step: int

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, use_ema: bool = True,
                   lora_scale: float = 1.0) -> "StageNetwork":
    """The stage at `workdir`'s checkpoint `step` (latest if None)."""
    config, params, step = plan_lib.load_network(workdir, step, use_ema, lora_scale)
    return cls(config, models.build_model(config), params, step)

  def log_snr(self, timestep: Any, augmentation: bool = False) -> jax.Array:
    """The log-SNR [B] of a discrete-time stage's timesteps [B] (its augmentation schedule's
    with `augmentation`)."""
    schedule = (schedules.aug_log_snr_fn(self.config.lowres) if augmentation
                else schedules.stage_log_snr_fn(self.config.diffusion))
    if not isinstance(schedule, schedules.DiscreteSchedule):
      raise ValueError("this stage's schedule is continuous: give log-SNRs, not timesteps")
    return schedule((jnp.asarray(timestep, jnp.float32) + 1.0) / schedule.num_timesteps)

  def __call__(self, x: Any, *, text_emb: Any, log_snr: Any = None, timestep: Any = None,
               text_mask: Any = None, lowres: Any = None, aug_log_snr: Any = None,
               aug_timestep: Any = None) -> np.ndarray:
    """The network's output [B, H, W, C_out] float32 for x [B, H, W, 3] at noise levels
    (`log_snr` [B] or `timestep` [B]), text_emb [B, L, D] and text_mask [B, L] (default all
    True); SR stages: lowres [B, h, w, 3] and its level (`aug_log_snr` or `aug_timestep` [B])."""
    if (log_snr is None) == (timestep is None):
      raise ValueError("give the noise level as one of log_snr= or timestep=")
    if log_snr is None:
      log_snr = self.log_snr(timestep)
    if (lowres is None) != (self.config.stage != "sr"):
      raise ValueError(f"a {self.config.stage!r} stage "
                       f"{'needs' if self.config.stage == 'sr' else 'takes no'} lowres")
    if lowres is not None and aug_log_snr is None:
      if aug_timestep is None:
        raise ValueError("an SR stage needs the low-res image's level: aug_log_snr= or "
                         "aug_timestep=")
      aug_log_snr = self.log_snr(aug_timestep, augmentation=True)
    text_emb = jnp.asarray(text_emb, jnp.float32)
    text_mask = (jnp.ones(text_emb.shape[:2], bool) if text_mask is None
                 else jnp.asarray(text_mask, bool))
    as_array = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    return np.asarray(_apply(self.model, self.params, as_array(x), as_array(log_snr), text_emb,
                             text_mask, as_array(lowres), as_array(aug_log_snr)))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: nn.Module, params: Any, *inputs: Any) -> jax.Array:
  x, log_snr, text_emb, text_mask, lowres, aug_log_snr = inputs
  return model.apply({"params": params}, x, log_snr, text_emb, text_mask, lowres=lowres,
                     aug_log_snr=aug_log_snr)
