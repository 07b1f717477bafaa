"""Samplers by name: DDPM ancestral, DDIM (eta), EDM's Heun, DPM-Solver++ and UniPC (the last two
in `multistep`), each one `lax.scan` over the steps, each able to start from and keep parts of an
input image (`editing`: image-to-image, inpainting).

Every sampler takes the same denoiser, `x0_fn(z [B, ...], log_snr [B]) -> x0_hat [B, ...]` in the
variance-preserving space (z = alpha x + sigma eps), with guidance and the network's
parameterization already folded in (see `denoiser`). Thresholding is applied to each x0_hat. A
network with a learned variance returns `Denoised(x0_hat, v)`: DDPM draws with that variance,
the other samplers read x0_hat alone.
`key` is one PRNG key, or a batch of keys [B] for noise that is per example.
"""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import editing
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import multistep
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import schedules

X0Fn = Callable[[jax.Array, jax.Array], "jax.Array | Denoised"]


class Denoised(NamedTuple):
  """What the denoiser of a network with a learned variance (IF's `learned_range`) returns:
  x0_hat [B, ...] and v [B, ...], the network's variance output in [-1, 1], which places the
  log variance of each DDPM step between the posterior's (v = -1) and the step's beta (v = 1)."""
  x0: jax.Array
  variance: jax.Array


def x0_only(x0_fn: X0Fn) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The denoiser without its variance output: what every sampler but DDPM reads."""

  def fn(z, log_snr):
    out = x0_fn(z, log_snr)
    return out.x0 if isinstance(out, Denoised) else out

  return fn
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


VARIANCES = ("fixed", "learned_range")


def denoiser(model_fn: Callable[[jax.Array, jax.Array], jax.Array], parameterization: str,
             variance: str = "fixed") -> X0Fn:
  """x0_fn from `model_fn(z, log_snr) -> output` of a VP-trained network in `parameterization`.

  `variance` "learned_range": the output holds twice z's channels, the prediction then the
  variance values (DeepFloyd IF); x0_fn returns `Denoised`.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown diffusion.variance {variance!r}; choose from {VARIANCES}")

  def x0_fn(z, log_snr):
    out = model_fn(z, log_snr).astype(z.dtype)
    if variance == "fixed":
      return objectives.to_x0_eps(z, out, log_snr, parameterization)[0]
    channels = z.shape[-1]
    x0 = objectives.to_x0_eps(z, out[..., :channels], log_snr, parameterization)[0]
    return Denoised(x0, out[..., channels:])

  return x0_fn


def _progress(on_step: Callable[[int], None] | None, i: jax.Array) -> None:
  if on_step is not None:
    jax.debug.callback(on_step, i)


def _walk(down, up, z: jax.Array, num_steps: int, resample: int, jump: int) -> jax.Array:
  """Runs `down(z, k, a)` (level a to a + 1) and `up(z, k, a)` (a to a - 1) along RePaint's
  path (`editing.repaint_path`); k, the transition index, picks the fresh noise. Without
  resampling only `down` is traced."""
  path = editing.repaint_path(num_steps, resample, jump)
  has_up = bool(np.any(np.diff(path) < 0))

  def transition(z, inputs):
    k, a, b = inputs
    if not has_up:
      return down(z, k, a), None
    return jax.lax.cond(b > a, down, up, z, k, a), None

  z, _ = jax.lax.scan(transition, z, (jnp.arange(len(path) - 1), jnp.asarray(path[:-1]),
                                      jnp.asarray(path[1:])))
  return z


def ddpm_or_ddim(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, num_steps: int,
                 log_snr_fn: schedules.LogSnrFn, threshold_fn=lambda x: x, eta: float = 1.0,
                 spacing: str = "time", start: float = 1.0, init: jax.Array | None = None,
                 project: editing.Project | None = None, resample: int = 1, jump: int = 1,
                 on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Ancestral sampling from z_1 = noise [B, ...] down to x0 over `num_steps` steps (`spacing`:
  uniform in t or in log-SNR, `schedules.log_snr_grid`).

  Each step draws z_s from N(mu, var) where, with c = 1 - SNR(t) / SNR(s) (Kingma et al. 2021),
  the DDPM posterior is mu = alpha_s ((1 - c) z_t / alpha_t + c x0_hat), var = c sigma_s^2.
  eta = 1 is that DDPM posterior; eta = 0 is deterministic DDIM, z_s = alpha_s x0_hat +
  sigma_s eps_hat; eta in between keeps var_eta = eta^2 c sigma_s^2 of fresh noise and the rest of
  sigma_s^2 along eps_hat. eps_hat is recomputed from the thresholded x0_hat. The last step
  (to t = 0) adds no fresh noise and returns z_0, the posterior mean: returning x0_hat from
  t = 1 / N instead would shrink the variance of the samples (E[x | z] is a shrinkage). A
  discrete schedule's last step goes to the clean image (diffusers' alpha_bar = 1): x0_hat.

  Editing (`editing`): `start` < 1 with `init` [B, ...] begins from the input noised to time
  `start`; `project` replaces the known region after every update; `resample` / `jump` walk
  RePaint's path, re-noising with the forward process on the way back up.
  """
  batch = noise.shape[0]
  grid = jnp.asarray(schedules.log_snr_grid(num_steps, log_snr_fn, spacing, start), jnp.float32)
  project = project or editing.keep_nothing
  ends_clean = isinstance(log_snr_fn, schedules.DiscreteSchedule)

  def down(z, k, i):
    lt, ls = grid[i], grid[i + 1]
    lt_b = jnp.full((batch,), lt)
    out = x0_fn(z, lt_b)
    learned = out.variance if isinstance(out, Denoised) and eta == 1.0 else None
    x0 = threshold_fn(out.x0 if isinstance(out, Denoised) else out)
    eps = objectives.eps_from_x0(z, x0, lt_b)
    alpha_s, sigma_s = schedules.alpha_sigma(ls)
    c = -jnp.expm1(lt - ls)
    var = (eta ** 2) * c * sigma_s ** 2
    z_next = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s ** 2 - var, 0.0)) * eps
    if learned is not None:  # the same posterior mean, the network's variance (IF's DDPM)
      var = objectives.learned_variance(learned, lt, ls)
    if eta != 0.0:  # deterministic DDIM draws no noise
      fresh = noise_lib.normal(noise_lib.fold_in(key, k), z.shape, z.dtype)
      z_next = z_next + jnp.sqrt(var) * jnp.where(i < num_steps - 1, fresh, 0.0)
    if ends_clean:  # a discrete schedule's last step lands on the clean image: x0 itself
      z_next = jnp.where(i == num_steps - 1, x0, z_next)
    _progress(on_step, i)
    return project(z_next, ls)

  def up(z, k, i):
    fresh = noise_lib.normal(noise_lib.fold_in(key, k), z.shape, z.dtype)
    return project(editing.renoise(z, fresh, grid[i], grid[i - 1]), grid[i - 1])

  z = project(editing.start_latent(init, noise, grid[0]), grid[0])
  return _walk(down, up, z, num_steps, resample, jump)


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
             init: jax.Array | None = None, project: editing.Project | None = None,
             resample: int = 1, jump: int = 1,
             on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Karras et al.'s Heun sampler (their Algorithm 2; churn = 0 is the deterministic Algorithm 1).

  Runs in EDM space x = z / alpha with noise level sigma = sigma_vp / alpha, where log-SNR is
  -2 log sigma, so any VP denoiser works: D(x, sigma) = x0_fn(x alpha, -2 log sigma). The noise
  [B, ...] is standard normal and is scaled by sigma_max. 2 * num_steps - 1 network evaluations.
  Editing as `ddpm_or_ddim`: `init` starts from the input plus sigma_max of noise (image-to-image
  lowers sigma_max), `project` (VP space) after every update, RePaint's path over the Heun steps.
  """
  batch = noise.shape[0]
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
  vp_project = project or editing.keep_nothing

  def project_x(x, sigma):  # the VP projection in EDM space: x = z sqrt(1 + sigma^2)
    scale = jnp.sqrt(1.0 + sigma ** 2)
    return vp_project(x / scale, -2.0 * jnp.log(sigma)) * scale

  def denoise(x, sigma):
    log_snr = jnp.full((batch,), -2.0 * jnp.log(sigma))
    alpha = 1.0 / jnp.sqrt(1.0 + sigma ** 2)
    return threshold_fn(x0_fn(x * alpha, log_snr))

  gamma_max = min(churn / num_steps, math.sqrt(2.0) - 1.0)

  def down(x, k, i):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    gamma = jnp.where((sigma >= churn_min) & (sigma <= churn_max), gamma_max, 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    fresh = noise_lib.normal(noise_lib.fold_in(key, k), x.shape, x.dtype)
    x_hat = x + jnp.sqrt(sigma_hat ** 2 - sigma ** 2) * churn_noise * fresh
    d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d
    # Heun's correction; the last step lands on sigma = 0 and stays Euler (done after the scan).
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    _progress(on_step, i)
    return project_x(x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next), sigma_next)

  def up(x, k, i):
    fresh = noise_lib.normal(noise_lib.fold_in(key, k), x.shape, x.dtype)
    return project_x(x + jnp.sqrt(sigmas[i - 1] ** 2 - sigmas[i] ** 2) * fresh, sigmas[i - 1])

  x = noise * sigmas[0] if init is None else init.astype(noise.dtype) + noise * sigmas[0]
  x = project_x(x, sigmas[0])
  x = _walk(down, up, x, num_steps - 1, resample, jump)
  # Final Euler step to sigma = 0 is the denoised estimate itself.
  _progress(on_step, jnp.asarray(num_steps - 1))
  return denoise(x, sigmas[-2])


def edm_sigma_range(log_snr_fn: schedules.LogSnrFn, start: float = 1.0) -> tuple[float, float]:
  """EDM Heun's noise levels (sigma_min, sigma_max): the schedule's own range within EDM's
  defaults [0.002, 80], from time `start` down. The network never saw a sigma below the
  schedule's (the cosine's is 0.0125), so Karras's steps, dense at low noise, would be spent
  where the network's predictions mean nothing, and samples lose prompt adherence."""
  with jax.ensure_compile_time_eval():
    ends = np.asarray(log_snr_fn(jnp.array([0.0, start], jnp.float32)), np.float64)
  return max(0.002, math.exp(-ends[0] / 2)), min(80.0, math.exp(-ends[1] / 2))


def evaluation_log_snrs(sampler: str, num_steps: int, log_snr_fn: schedules.LogSnrFn,
                        spacing: str = "time", start: float = 1.0, resample: int = 1,
                        jump: int = 1) -> np.ndarray:
  """The log-SNR of every network evaluation of one sampling run, in order (float64 [E]):
  what `network_evaluations` counts and a guidance interval selects from. `start`, `resample`
  and `jump` as in `sample`."""
  family, _ = parse_sampler(sampler)
  if start == 0.0:
    return np.zeros(0)
  if family == "edm_heun":
    sigma_min, sigma_max = edm_sigma_range(log_snr_fn, start)
    sigmas = np.asarray(karras_sigmas(num_steps, sigma_min, sigma_max), np.float64)
    downs = editing.steps_down(num_steps - 1, resample, jump)
    levels = [sigmas[a + d] for a in downs for d in (0, 1)] + [sigmas[num_steps - 1]]
    return -2.0 * np.log(np.asarray(levels))  # Heun: 2 per step, 1 for the last
  grid = schedules.log_snr_grid(num_steps, log_snr_fn, spacing, start)
  return grid[editing.steps_down(num_steps, resample, jump)]


def network_evaluations(sampler: str, num_steps: int, log_snr_fn: schedules.LogSnrFn, *,
                        guided: bool, spacing: str = "time",
                        guidance_interval: tuple[float, float] | tuple[()] = (),
                        start: float = 1.0, resample: int = 1, jump: int = 1) -> int:
  """Network passes per image: one per evaluation, two where guidance runs (`guided`, inside
  `guidance_interval` if one is given)."""
  levels = evaluation_log_snrs(sampler, num_steps, log_snr_fn, spacing, start, resample, jump)
  if not guided:
    return len(levels)
  return len(levels) + int(np.sum(guidance.in_interval(levels, guidance_interval)))


ONE_STEP = ("ddpm", "ddim", "edm_heun")  # the samplers RePaint's resampling can walk back up


def solve(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, sampler: str, num_steps: int,
           log_snr_fn: schedules.LogSnrFn, threshold_fn=lambda x: x, eta: float = 0.0,
           spacing: str = "time", variant: str = "bh2", start: float = 1.0,
           init: jax.Array | None = None, known: editing.Known | None = None,
           resample: int = 1, jump: int = 1,
           on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Dispatches to a sampler by name (`parse_sampler`): `ddpm`, `ddim` (with eta), `edm_heun`,
  `dpmpp_2m` / `dpmpp_3m` / `dpmpp_2m_sde`, `unipc` (with `variant` bh1 or bh2).

  `spacing` (time or logsnr) places the steps of all but EDM Heun, which uses Karras's sigmas.
  Editing (see `editing`), with every sampler: `start` in [0, 1] with `init` [B, ...] (the
  input in [-1, 1]) starts from the input noised to time `start` (0 returns `init`, 1 ignores
  it; the `num_steps` steps run below `start`); `known` keeps a region of an input (RePaint),
  with `resample` / `jump` (one-step samplers: `ONE_STEP`) RePaint's resampling jumps.
  """
  if num_steps < 1:
    raise ValueError(f"sampling needs at least one step, got {num_steps}")
  family, order = parse_sampler(sampler)
  editing.check_resampling(resample, jump)
  if resample > 1 and family not in ONE_STEP:
    raise ValueError(f"resampling jumps walk a one-step sampler back up its steps; {sampler!r} "
                     f"is a multistep solver: use one of {', '.join(ONE_STEP)}")
  if not 0.0 <= start <= 1.0:
    raise ValueError(f"the starting time (image-to-image strength) must be in [0, 1], got {start}")
  if start < 1.0 and init is None:
    raise ValueError(f"starting at time {start} < 1 needs the input image (`init`)")
  if start == 0.0:
    return editing.paste(known, init)
  if start == 1.0:
    init = None  # strength 1: pure noise, exactly as without an input
  project = editing.known_region(known, noise)
  if family != "ddpm":
    x0_fn = x0_only(x0_fn)
  common = dict(num_steps=num_steps, threshold_fn=threshold_fn, init=init, project=project,
                on_step=on_step)
  if family in ("ddpm", "ddim"):
    out = ddpm_or_ddim(x0_fn, noise, key, log_snr_fn=log_snr_fn,
                       eta=1.0 if family == "ddpm" else eta, spacing=spacing, start=start,
                       resample=resample, jump=jump, **common)
  elif family == "edm_heun":
    sigma_min, sigma_max = edm_sigma_range(log_snr_fn, start)
    out = edm_heun(x0_fn, noise, key, sigma_min=sigma_min, sigma_max=sigma_max,
                   resample=resample, jump=jump, **common)
  else:
    out = multistep.solve_multistep(x0_fn, noise, key, solver=family, order=order, spacing=spacing,
                           variant=variant, log_snr_fn=log_snr_fn, start=start, **common)
  return editing.paste(known, out)
