"""Sampling with an input image: start part-way down (image-to-image), keep a known region
(inpainting), and go back up the noise levels to harmonize it (RePaint's resampling jumps).

- Image-to-image (SDEdit, Meng et al. 2022): the sampler starts at time `start` from the input
  noised to that level, z = alpha x + sigma eps, instead of from pure noise at t = 1; `start` is
  the strength: 0 would return the input, 1 ignores it.
- Inpainting (RePaint, Lugmayr et al. 2022): after every update of the sample to a level, the
  known region is replaced by the input noised to that level, so the regenerated region is
  denoised next to a known region that is always consistent with the input. The noise is the
  sampler's starting noise at every level: the known region follows the input's own path of the
  deterministic samplers, and the same seed gives the same pixels. The last level is the input
  itself: the known region comes back exactly.
- Resampling jumps (RePaint): after every `jump` steps down, the sample is re-noised `jump`
  steps back up by the forward process and denoised again, `resample` times in all, so the
  regenerated region is fitted to the known one at every level instead of once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import schedules

# One update from grid level a to level a + 1 (down) or a - 1 (up: re-noising).
Project = Callable[[jax.Array, jax.Array], jax.Array]


class Known(NamedTuple):
  """The region of the input an inpainting sampler keeps (arrays, traced under jit).

  image: [B, S, S, C] the input in [-1, 1] at the stage's resolution.
  keep:  [B, S, S, 1] 1 where the input is kept, 0 where it is regenerated.
  """
  image: jax.Array
  keep: jax.Array


def keep_nothing(z: jax.Array, log_snr: jax.Array) -> jax.Array:
  """The projection without a known region: every pixel is the sampler's."""
  del log_snr
  return z


def known_region(known: Known | None, noise: jax.Array) -> Project:
  """project(z [B, ...], log_snr []) -> z with the known region replaced by the input noised to
  log_snr with `noise` (the sampler's starting noise); `keep_nothing` without `known`."""
  if known is None:
    return keep_nothing

  def project(z, log_snr):
    levels = jnp.full((z.shape[0],), log_snr, jnp.float32)
    inside = objectives.q_sample(known.image.astype(z.dtype), noise, levels)
    return jnp.where(known.keep > 0.5, inside, z)

  return project


def paste(known: Known | None, x: jax.Array) -> jax.Array:
  """The final images x [B, ...] with the known region set to the input exactly."""
  if known is None:
    return x
  return jnp.where(known.keep > 0.5, known.image.astype(x.dtype), x)


def start_latent(init: jax.Array | None, noise: jax.Array, log_snr: float) -> jax.Array:
  """The sampler's first sample at `log_snr`: pure noise, or the input `init` noised to it."""
  if init is None:
    return noise
  return objectives.q_sample(init.astype(noise.dtype), noise,
                             jnp.full((noise.shape[0],), log_snr, jnp.float32))


def renoise(z: jax.Array, fresh: jax.Array, log_snr_from: jax.Array, log_snr_to: jax.Array
            ) -> jax.Array:
  """A draw of q(z_t | z_s): from level s (`log_snr_from`) back up to the noisier t.

  z_t = (alpha_t / alpha_s) z_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) n, with
  n = `fresh` [B, ...] standard normal.
  """
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_from)
  alpha_t, sigma_t = schedules.alpha_sigma(log_snr_to)
  ratio = alpha_t / alpha_s
  return ratio * z + jnp.sqrt(jnp.maximum(sigma_t ** 2 - (ratio * sigma_s) ** 2, 0.0)) * fresh


def check_resampling(resample: int, jump: int) -> None:
  if resample < 1 or jump < 1:
    raise ValueError(f"resampling needs resample >= 1 and jump >= 1, got resample={resample}, "
                     f"jump={jump}")


def repaint_path(num_steps: int, resample: int = 1, jump: int = 1) -> np.ndarray:
  """The grid levels a sampler visits, int [T + 1]: 0 (noisiest) ... num_steps (clean).

  Without resampling, 0, 1, ..., num_steps. With it, RePaint's schedule: the jump points are
  counted from the clean end, the last one step before it, then every `jump` levels up the
  path, but none within the first `jump` levels; on arriving at a jump point the path goes
  `jump` levels back up and down again, `resample` times in all at that point. The resampling
  thus reaches the last step, where the finest detail meets the known region.
  """
  check_resampling(resample, jump)
  is_jump_point = lambda level: jump < level < num_steps and (num_steps - 1 - level) % jump == 0
  path, level, left = [0], 0, {}
  while level < num_steps:
    level += 1
    path.append(level)
    if resample > 1 and is_jump_point(level):
      left.setdefault(level, resample - 1)
      if left[level] > 0:
        left[level] -= 1
        for _ in range(jump):
          level -= 1
          path.append(level)
  return np.asarray(path)


def steps_down(num_steps: int, resample: int = 1, jump: int = 1) -> np.ndarray:
  """The grid level each denoising step of the path starts from, int [D] (D >= num_steps)."""
  path = repaint_path(num_steps, resample, jump)
  return path[:-1][np.diff(path) > 0]
