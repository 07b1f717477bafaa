"""Continuous-time noise schedules as log-SNR functions of t ~ U(0, 1).

A schedule maps t in [0, 1] (0: clean, 1: pure noise) to log-SNR lambda(t) = log(alpha^2 / sigma^2)
of the variance-preserving process z_t = alpha_t x + sigma_t eps, alpha^2 + sigma^2 = 1. The
networks are conditioned on lambda, so every formulation (VP or EDM) and every sampler speaks
the same language. Values are clipped to [LOG_SNR_MIN, LOG_SNR_MAX] so both ends stay finite.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LOG_SNR_MIN = -20.0
LOG_SNR_MAX = 20.0

LogSnrFn = Callable[[jax.Array], jax.Array]
SPACINGS = ("time", "logsnr", "leading")
LOGSNR_SPACING_MIN = -2.0 * math.log(80.0)   # EDM's sigma_max: where `logsnr` spacing starts
LOGSNR_SPACING_MAX = -2.0 * math.log(0.002)  # EDM's sigma_min: where it ends at the latest


def cosine_log_snr(t: jax.Array, s: float = 0.008) -> jax.Array:
  """Nichol & Dhariwal's cosine schedule in continuous time (base and SR 1 in the paper).

  alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)), so lambda(t) = -2 log tan(pi/2 (t + s) / (1 + s)).
  """
  angle = 0.5 * math.pi * (t + s) / (1.0 + s)
  angle = jnp.minimum(angle, 0.5 * math.pi - 1e-6)  # float32 pi/2 overshoots: tan < 0 at t = 1
  return jnp.clip(-2.0 * jnp.log(jnp.tan(angle)), LOG_SNR_MIN, LOG_SNR_MAX)


def linear_log_snr(t: jax.Array, beta_start: float = 1e-4, beta_end: float = 0.02,
                   num_timesteps: int = 1000) -> jax.Array:
  """The continuous version of DDPM's linear betas (SR 2 in the paper).

  With beta(t) = T (beta_start + t (beta_end - beta_start)) on t in [0, 1],
  alpha_bar(t) = exp(-int_0^t beta) = exp(-(T beta_start t + T (beta_end - beta_start) t^2 / 2)),
  and lambda = log(alpha_bar / (1 - alpha_bar)) = -log(expm1(int_0^t beta)).
  """
  integral = num_timesteps * (beta_start * t + 0.5 * (beta_end - beta_start) * t ** 2)
  integral = jnp.maximum(integral, 1e-12)  # t = 0 is noise-free: lambda = +inf, clipped below
  return jnp.clip(-jnp.log(jnp.expm1(integral)), LOG_SNR_MIN, LOG_SNR_MAX)


SCHEDULES: dict[str, LogSnrFn] = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def discrete_alphas_cumprod(name: str, num_timesteps: int, beta_start: float = 1e-4,
                            beta_end: float = 0.02) -> np.ndarray:
  """alpha_bar [T] of a T-step DDPM schedule as diffusers' DDPMScheduler computes it (betas in
  float32, their cumulative product in float32): `cosine` is its "squaredcos_cap_v2" (Nichol &
  Dhariwal's cosine, betas capped at 0.999), `linear` its "linear" betas."""
  if name == "cosine":
    bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - bar((i + 1) / num_timesteps) / bar(i / num_timesteps), 0.999)
             for i in range(num_timesteps)]
  elif name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float32)
  else:
    raise ValueError(f"unknown noise schedule {name!r}; choose from {sorted(SCHEDULES)}")
  return np.cumprod(1.0 - np.asarray(betas, np.float32), dtype=np.float32)


class DiscreteSchedule:
  """A T-step DDPM schedule (DeepFloyd IF's, or any diffusers DDPMScheduler's) in continuous time.

  Timestep k in 0..T-1 sits at t = (k + 1) / T and t = 0 is the clean image, so the sampler's
  uniform time steps are diffusers' "trailing" timesteps (`log_snr_grid`'s "leading" gives its
  default ones). Between timesteps the log-SNR is interpolated linearly; `timestep` inverts it,
  giving the network the (fractional) timestep it was trained on.
  """

  def __init__(self, name: str, num_timesteps: int):
    if num_timesteps < 2:
      raise ValueError(f"a discrete schedule needs at least 2 timesteps, got {num_timesteps}")
    bar = discrete_alphas_cumprod(name, num_timesteps).astype(np.float64)
    self.name, self.num_timesteps = name, num_timesteps
    self.log_snrs = np.log(bar) - np.log1p(-bar)  # [T], decreasing in k
    # Timesteps -1 (the clean image) .. T-1 and their log-SNRs, the interpolation's knots.
    self._steps = np.arange(-1, num_timesteps, dtype=np.float32)
    self._levels = np.concatenate([[LOG_SNR_MAX], self.log_snrs]).astype(np.float32)

  def __call__(self, t: jax.Array) -> jax.Array:
    return jnp.interp(t * self.num_timesteps - 1.0, self._steps, self._levels)

  def timestep(self, log_snr: jax.Array) -> jax.Array:
    """The fractional timestep [B] of noise levels log_snr [B] (k where they are exact)."""
    return jnp.interp(log_snr.astype(jnp.float32), self._levels[::-1], self._steps[::-1])

  def grid(self, num_steps: int, spacing: str, start: float) -> np.ndarray:
    """The log-SNRs [num_steps + 1] of diffusers' timesteps, computed exactly (float64)."""
    total = self.num_timesteps
    if spacing == "leading":  # diffusers' default: k = i * (T // N), noisiest first
      steps = np.arange(num_steps)[::-1] * (round(start * total) // num_steps)
    else:  # "time": t = start (1 - i / N), diffusers' "trailing" where N divides T
      steps = np.round(start * total * np.arange(num_steps, 0, -1) / num_steps) - 1
    return np.concatenate([self.log_snrs[steps.astype(int)], [LOG_SNR_MAX]])


@functools.lru_cache(maxsize=None)
def discrete_schedule(name: str, num_timesteps: int) -> DiscreteSchedule:
  """The `DiscreteSchedule` of `name` at `num_timesteps` steps, built once per process."""
  return DiscreteSchedule(name, num_timesteps)


def get_log_snr_fn(name: str, shift: float = 0.0, timesteps: int = 0) -> LogSnrFn:
  """The schedule `name`, its log-SNR shifted by `shift` (Hoogeboom et al. 2023, "simple
  diffusion"). A negative shift spends more of t ~ U(0, 1) at high noise, where the layout of an
  image is decided: large flat objects stay visible through noise that hides fine detail, so at
  low resolution the text's "where" is only learned from the noisiest steps."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown noise schedule {name!r}; choose from {sorted(SCHEDULES)}")
  if timesteps:  # a discrete-time model: `name`'s betas at `timesteps` steps
    if shift:
      raise ValueError("a shifted schedule is continuous: schedule_shift needs timesteps 0")
    return discrete_schedule(name, timesteps)
  base = SCHEDULES[name]
  if not shift:
    return base
  return lambda t: jnp.clip(base(t) + shift, LOG_SNR_MIN, LOG_SNR_MAX)


def stage_log_snr_fn(diffusion_config) -> LogSnrFn:
  """The log-SNR schedule a stage trains and samples with (`config.diffusion`)."""
  return get_log_snr_fn(diffusion_config.schedule, diffusion_config.get("schedule_shift", 0.0),
                        diffusion_config.get("timesteps", 0))


def aug_log_snr_fn(lowres_config) -> LogSnrFn:
  """The schedule of an SR stage's noise conditioning augmentation (`config.lowres`)."""
  return get_log_snr_fn(lowres_config.aug_schedule, timesteps=lowres_config.get("aug_timesteps", 0))


def alpha_sigma(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)); alpha^2 + sigma^2 = 1."""
  return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def right_broadcast(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example values [B] to [B, 1, ..., 1] to broadcast against `like` [B, ...]."""
  return jnp.reshape(values, values.shape + (1,) * (like.ndim - values.ndim))


def log_snr_grid(num_steps: int, log_snr_fn: LogSnrFn, spacing: str = "time",
                 start: float = 1.0) -> np.ndarray:
  """A sampler's noise levels as log-SNRs [num_steps + 1], float64, noisiest first.

  `time`: t_i = start (1 - i / N), uniform in the schedule's time; `logsnr`: uniform in log-SNR
  over the schedule's range within EDM's [sigma_min, sigma_max] = [0.002, 80], which spends fewer
  steps on the last, steep stretch of e.g. the cosine schedule, where a multistep solver's
  extrapolation is least accurate. The bounds keep uniform steps where they matter: beyond
  sigma 80 the image is invisible (alpha < 1.3%), below 0.002 the noise is under a quarter of a
  uint8 level, yet the clipped schedules run from log-SNR -20 (cosine) to +20 (linear).
  `leading` (discrete schedules): diffusers' default timesteps k_i = (N - 1 - i) (T // N).
  `start` < 1 begins part-way, at the level of time `start` (image-to-image's strength): all
  `num_steps` steps are spent below it.
  Evaluated at trace time (also under jit): the grid is a constant of the compiled loop.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown step spacing {spacing!r}; choose from {SPACINGS}")
  if not 0.0 < start <= 1.0:
    raise ValueError(f"sampling starts at a time in (0, 1], got {start}")
  if isinstance(log_snr_fn, DiscreteSchedule) and spacing != "logsnr":
    return log_snr_fn.grid(num_steps, spacing, start)
  if spacing == "leading":
    raise ValueError("step spacing 'leading' places a discrete schedule's timesteps as "
                     "diffusers does; this stage's schedule is continuous (diffusion.timesteps 0)")
  with jax.ensure_compile_time_eval():
    if spacing == "time":
      grid = log_snr_fn(start * jnp.arange(num_steps, -1, -1, dtype=jnp.float32) / num_steps)
    else:
      ends = log_snr_fn(jnp.array([start, 0.0], jnp.float32))
      grid = jnp.linspace(jnp.maximum(ends[0], LOGSNR_SPACING_MIN),
                          jnp.minimum(ends[1], LOGSNR_SPACING_MAX), num_steps + 1)
    return np.asarray(grid, np.float64)
