"""Samplers by name: DDPM ancestral, DDIM (eta), EDM's Heun, DPM-Solver++ and UniPC (the last two
in `multistep`), each one `lax.scan` over the steps.

Every sampler takes the same denoiser, `x0_fn(z [B, ...], log_snr [B]) -> x0_hat [B, ...]` in the
variance-preserving space (z = alpha x + sigma eps), with guidance and the network's
parameterization already folded in (see `denoiser`). Thresholding is applied to each x0_hat.
`key` is one PRNG key, or a batch of keys [B] for noise that is per example.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import multistep
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import schedules

X0Fn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("ddpm", "ddim", "edm_heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
# Also accepted: dpmpp_{1,2,3}m[_sde] (order 1 is DDIM / DDPM), unipc_{1,2,3}m (unipc = unipc_2m).
_MULTISTEP = re.compile(r"(dpmpp|unipc)_([123])m(_sde)?")


def parse_sampler(name: str) -> tuple[str, int]:
  """(family, order) of a sampler name: ("ddim", 1), ("dpmpp", 2), ("dpmpp_sde", 2), ("unipc", 2).

  Raises ValueError naming the choices for an unknown name.
  """
  if name in ("ddpm", "ddim", "edm_heun"):
    return name, {"edm_heun": 2}.get(name, 1)
  if name == "unipc":
    return "unipc", 2
  match = _MULTISTEP.fullmatch(name)
  if not match or (match[1] == "unipc" and match[3]):
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)} (or "
                     f"dpmpp_1m/dpmpp_3m_sde/unipc_3m: family, order 1-3, _sde for DPM-Solver++)")
  return match[1] + (match[3] or ""), int(match[2])


def denoiser(model_fn: Callable[[jax.Array, jax.Array], jax.Array], parameterization: str
             ) -> X0Fn:
  """x0_fn from `model_fn(z, log_snr) -> output` of a VP-trained network in `parameterization`."""

  def x0_fn(z, log_snr):
    return objectives.to_x0_eps(z, model_fn(z, log_snr).astype(z.dtype), log_snr,
                                parameterization)[0]

  return x0_fn


def _progress(on_step: Callable[[int], None] | None, i: jax.Array) -> None:
  if on_step is not None:
    jax.debug.callback(on_step, i)


def ddpm_or_ddim(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, num_steps: int,
                 log_snr_fn: schedules.LogSnrFn, threshold_fn=lambda x: x, eta: float = 1.0,
                 spacing: str = "time", on_step: Callable[[int], None] | None = None
                 ) -> jax.Array:
  """Ancestral sampling from z_1 = noise [B, ...] down to x0 over `num_steps` steps (`spacing`:
  uniform in t or in log-SNR, `schedules.log_snr_grid`).

  Each step draws z_s from N(mu, var) where, with c = 1 - SNR(t) / SNR(s) (Kingma et al. 2021),
  the DDPM posterior is mu = alpha_s ((1 - c) z_t / alpha_t + c x0_hat), var = c sigma_s^2.
  eta = 1 is that DDPM posterior; eta = 0 is deterministic DDIM, z_s = alpha_s x0_hat +
  sigma_s eps_hat; eta in between keeps var_eta = eta^2 c sigma_s^2 of fresh noise and the rest of
  sigma_s^2 along eps_hat. eps_hat is recomputed from the thresholded x0_hat. The last step
  (to t = 0) adds no fresh noise and returns z_0, the posterior mean: returning x0_hat from
  t = 1 / N instead would shrink the variance of the samples (E[x | z] is a shrinkage).
  """
  batch = noise.shape[0]
  grid = jnp.asarray(schedules.log_snr_grid(num_steps, log_snr_fn, spacing), jnp.float32)
  log_snr_t, log_snr_s = grid[:-1], grid[1:]

  def step(z, inputs):
    i, lt, ls = inputs
    lt_b = jnp.full((batch,), lt)
    x0 = threshold_fn(x0_fn(z, lt_b))
    eps = objectives.eps_from_x0(z, x0, lt_b)
    alpha_s, sigma_s = schedules.alpha_sigma(ls)
    c = -jnp.expm1(lt - ls)
    var = (eta ** 2) * c * sigma_s ** 2
    z_next = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s ** 2 - var, 0.0)) * eps
    if eta != 0.0:  # deterministic DDIM draws no noise
      fresh = noise_lib.normal(noise_lib.fold_in(key, i), z.shape, z.dtype)
      z_next = z_next + jnp.sqrt(var) * jnp.where(i < num_steps - 1, fresh, 0.0)
    _progress(on_step, i)
    return z_next, None

  steps = jnp.arange(num_steps)
  z0, _ = jax.lax.scan(step, noise, (steps, log_snr_t, log_snr_s))
  return z0


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jax.Array:
  """EDM's noise levels [num_steps + 1], from sigma_max down to sigma_min, then 0."""
  ramp = jnp.linspace(0.0, 1.0, num_steps)
  inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
  return jnp.concatenate([inv ** rho, jnp.zeros((1,))])


def edm_heun(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, num_steps: int,
             threshold_fn=lambda x: x, sigma_min: float = 0.002, sigma_max: float = 80.0,
             rho: float = 7.0, churn: float = 0.0, churn_min: float = 0.0,
             churn_max: float = float("inf"), churn_noise: float = 1.0,
             on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Karras et al.'s Heun sampler (their Algorithm 2; churn = 0 is the deterministic Algorithm 1).

  Runs in EDM space x = z / alpha with noise level sigma = sigma_vp / alpha, where log-SNR is
  -2 log sigma, so any VP denoiser works: D(x, sigma) = x0_fn(x alpha, -2 log sigma). The noise
  [B, ...] is standard normal and is scaled by sigma_max. 2 * num_steps - 1 network evaluations.
  """
  batch = noise.shape[0]
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)

  def denoise(x, sigma):
    log_snr = jnp.full((batch,), -2.0 * jnp.log(sigma))
    alpha = 1.0 / jnp.sqrt(1.0 + sigma ** 2)
    return threshold_fn(x0_fn(x * alpha, log_snr))

  gamma_max = min(churn / num_steps, math.sqrt(2.0) - 1.0)

  def step(x, inputs):
    i, sigma, sigma_next = inputs
    gamma = jnp.where((sigma >= churn_min) & (sigma <= churn_max), gamma_max, 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    fresh = noise_lib.normal(noise_lib.fold_in(key, i), x.shape, x.dtype)
    x_hat = x + jnp.sqrt(sigma_hat ** 2 - sigma ** 2) * churn_noise * fresh
    d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d
    # Heun's correction; the last step lands on sigma = 0 and stays Euler (done after the scan).
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    _progress(on_step, i)
    return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next), None

  x = noise * sigmas[0]
  steps = jnp.arange(num_steps - 1)
  x, _ = jax.lax.scan(step, x, (steps, sigmas[:-2], sigmas[1:-1]))
  # Final Euler step to sigma = 0 is the denoised estimate itself.
  _progress(on_step, jnp.asarray(num_steps - 1))
  return denoise(x, sigmas[-2])


def edm_sigma_range(log_snr_fn: schedules.LogSnrFn) -> tuple[float, float]:
  """EDM Heun's noise levels (sigma_min, sigma_max): the schedule's own range within EDM's
  defaults [0.002, 80]. The network never saw a sigma below the schedule's (the cosine's is
  0.0125): Karras's steps, dense at low noise, spent there, cost the shapes cascade 9-40 points
  of all-correct."""
  with jax.ensure_compile_time_eval():
    ends = np.asarray(log_snr_fn(jnp.array([0.0, 1.0], jnp.float32)), np.float64)
  return max(0.002, math.exp(-ends[0] / 2)), min(80.0, math.exp(-ends[1] / 2))


def evaluation_log_snrs(sampler: str, num_steps: int, log_snr_fn: schedules.LogSnrFn,
                        spacing: str = "time") -> np.ndarray:
  """The log-SNR of every network evaluation of one sampling run, in order (float64 [E]):
  what `network_evaluations` counts and a guidance interval selects from."""
  family, _ = parse_sampler(sampler)
  if family == "edm_heun":
    sigma_min, sigma_max = edm_sigma_range(log_snr_fn)
    sigmas = np.asarray(karras_sigmas(num_steps, sigma_min, sigma_max), np.float64)
    levels = [sigmas[0]] + [s for s in sigmas[1:-1] for _ in range(2)]  # Heun: 2 but the last
    return -2.0 * np.log(np.asarray(levels))
  return schedules.log_snr_grid(num_steps, log_snr_fn, spacing)[:-1]


def network_evaluations(sampler: str, num_steps: int, log_snr_fn: schedules.LogSnrFn, *,
                        guided: bool, spacing: str = "time",
                        guidance_interval: tuple[float, float] | tuple[()] = ()) -> int:
  """Network passes per image: one per evaluation, two where guidance runs (`guided`, inside
  `guidance_interval` if one is given)."""
  levels = evaluation_log_snrs(sampler, num_steps, log_snr_fn, spacing)
  if not guided:
    return len(levels)
  return len(levels) + int(np.sum(guidance.in_interval(levels, guidance_interval)))


def sample(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, sampler: str, num_steps: int,
           log_snr_fn: schedules.LogSnrFn, threshold_fn=lambda x: x, eta: float = 0.0,
           spacing: str = "time", variant: str = "bh2",
           on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Dispatches to a sampler by name (`parse_sampler`): `ddpm`, `ddim` (with eta), `edm_heun`,
  `dpmpp_2m` / `dpmpp_3m` / `dpmpp_2m_sde`, `unipc` (with `variant` bh1 or bh2).

  `spacing` (time or logsnr) places the steps of all but EDM Heun, which uses Karras's sigmas.
  """
  if num_steps < 1:
    raise ValueError(f"sampling needs at least one step, got {num_steps}")
  family, order = parse_sampler(sampler)
  common = dict(num_steps=num_steps, log_snr_fn=log_snr_fn, threshold_fn=threshold_fn,
                on_step=on_step)
  if family in ("ddpm", "ddim"):
    return ddpm_or_ddim(x0_fn, noise, key, eta=1.0 if family == "ddpm" else eta,
                        spacing=spacing, **common)
  if family == "edm_heun":
    sigma_min, sigma_max = edm_sigma_range(common.pop("log_snr_fn"))
    return edm_heun(x0_fn, noise, key, sigma_min=sigma_min, sigma_max=sigma_max, **common)
  return multistep.sample(x0_fn, noise, key, solver=family, order=order, spacing=spacing,
                          variant=variant, **common)
