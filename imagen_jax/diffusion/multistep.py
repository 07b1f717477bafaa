"""Multistep solvers of the diffusion ODE/SDE in data prediction: DPM-Solver++ and UniPC.

Both are exponential integrators in lam = log(alpha / sigma) (half our log-SNR): from z_t at lam_t
to lam_s = lam_t + h, with x0_hat(lam) the denoiser's (thresholded) data prediction,

    z_s = (sigma_s / sigma_t) z_t + sigma_s int_{lam_t}^{lam_s} e^lam x0_hat(lam) dlam     (ODE)

is exact; the solvers differ in how they approximate x0_hat(lam) on the step from the last few
evaluations. Every step is a linear combination of the current sample and the stored x0_hats,
so the coefficients of every step are computed once, in float64, before the loop, and the loop
(one `lax.scan`, one network evaluation per step) only adds arrays:

- DPM-Solver++ (Lu et al. 2022), order p: the polynomial through the last p x0_hats, integrated
  exactly against e^lam (for p = 2 this is DPM-Solver's "taylor" form; the paper's 2M midpoint
  form differs by O(h^3) per step, the same order). Order 1 is DDIM. The SDE variant integrates
  the SDE's exponential, 2 e^{-2(lam_s - lam)}, and adds sigma_s sqrt(1 - e^{-2h}) of fresh noise:
  its order 1 is DDPM.
- UniPC (Zhao et al. 2023): the UniP predictor with the B(h) variants bh1 (B = h) and bh2
  (B = e^h - 1), and the UniC corrector, which refines each new sample with the evaluation the
  next step needs anyway (no extra network pass; none after the last step). Predictor order p
  with the corrector is order p + 1.

Orders warm up (step i uses at most i + 1 points) and drop at the end (step i uses at most
N - i: the last step is first order), as diffusers does when the last step goes to sigma = 0.
Near t = 0 the schedules' log-SNR steps grow (the cosine's last step is 2-5x the one before),
and a polynomial fitted on short steps and extrapolated over a long one amplifies the step-to-step
jitter of a real network's thresholded x0_hat: without the lower final orders a third-order
solver at time-uniform steps lands far from the converged solution and its samples fall apart.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import editing
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import schedules

X0Fn = Callable[[jax.Array, jax.Array], jax.Array]
UNIPC_VARIANTS = ("bh1", "bh2")


def step_orders(num_steps: int, order: int, lower_order_final: bool = True) -> list[int]:
  """The order of each step: warm-up from 1 and, with `lower_order_final`, down to 1 at the
  last step (off: the solver's own order to the end, e.g. to measure its convergence)."""
  orders = [min(order, i + 1) for i in range(num_steps)]
  if lower_order_final:
    orders = [min(p, num_steps - i) for i, p in enumerate(orders)]
  return orders


def _alpha_sigma(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """alpha, sigma at lam = log-SNR / 2, in float64 (`schedules.alpha_sigma` in numpy)."""
  return np.sqrt(1.0 / (1.0 + np.exp(-2.0 * lam))), np.sqrt(1.0 / (1.0 + np.exp(2.0 * lam)))


def _exp_moments(h: float, order: int, rate: float) -> np.ndarray:
  """g_k = int_0^h rate e^{-rate (h - u)} u^k du for k < order: what the polynomial u^k of an
  x0_hat expanded around lam_t contributes to the step (rate 1: ODE, 2: SDE)."""
  # I_k = int_0^h rate e^{-rate v} (h - v)^k / k! dv; by parts I_k = h^k / k! - I_{k-1} / rate.
  moments, prev = [], -math.expm1(-rate * h)
  moments.append(prev)
  for k in range(1, order):
    prev = h ** k / math.factorial(k) - prev / rate
    moments.append(prev)
  return np.array([math.factorial(k) * m for k, m in enumerate(moments)])


def _interpolation_weights(nodes: np.ndarray, moments: np.ndarray) -> np.ndarray:
  """Weights w_j with sum_j w_j y_j = sum_k c_k moments_k, c the coefficients of the polynomial
  through (nodes_j, y_j): w = V^-T moments for the Vandermonde matrix V_jk = nodes_j^k."""
  vandermonde = np.vander(nodes, len(nodes), increasing=True)
  return np.linalg.solve(vandermonde.T, moments)


def dpm_solver_pp_coefficients(lam: np.ndarray, orders: list[int], sde: bool
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per step i: (x coefficient [N], history weights [N, K], noise scale [N]).

  z_{i+1} = a_i z_i + sum_j w_ij x0_hat_{i-j} + n_i xi, in the lam = log-SNR / 2 units of
  the papers; history slot j holds the x0_hat of step i - j.
  """
  num_steps, width = len(orders), max(orders)
  alpha, sigma = _alpha_sigma(lam)
  a, w, n = np.zeros(num_steps), np.zeros((num_steps, width)), np.zeros(num_steps)
  for i, p in enumerate(orders):
    h = lam[i + 1] - lam[i]
    nodes = lam[i - np.arange(p)] - lam[i]  # 0 and the earlier (negative) offsets
    rate = 2.0 if sde else 1.0
    w[i, :p] = alpha[i + 1] * _interpolation_weights(nodes, _exp_moments(h, p, rate))
    a[i] = sigma[i + 1] / sigma[i] * (math.exp(-h) if sde else 1.0)
    if sde and i < num_steps - 1:  # the last step adds no noise, as DDPM's
      n[i] = sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * h))
  return a, w, n


def _unipc_b_vector(h: float, order: int, variant: str) -> tuple[np.ndarray, float]:
  """UniPC's b_k = k! phi_{k+1}(-h) / B(h), k = 1..order, and B(h) (data prediction: hh = -h)."""
  hh = -h
  b_h = hh if variant == "bh1" else math.expm1(hh)
  phi = math.expm1(hh) / hh - 1.0
  factorial, out = 1.0, []
  for k in range(1, order + 1):
    out.append(phi * factorial / b_h)
    factorial *= k + 1
    phi = phi / hh - 1.0 / factorial
  return np.array(out), b_h


def unipc_coefficients(lam: np.ndarray, orders: list[int], variant: str
                       ) -> dict[str, np.ndarray]:
  """UniPC's predictor and corrector as linear maps, per step i (history slot j: x0_hat_{i-j}).

  Predictor: z_{i+1} = a_i z_i + sum_j w_ij x0_hat_{i-j}.
  Corrector, applied to z_i (i >= 1) once x0_hat_i is known, with the order of the predictor that
  made z_i: z_i <- ca_i z_{i-1} + cn_i x0_hat_i + sum_j cw_ij x0_hat_{i-1-j}.
  """
  if variant not in UNIPC_VARIANTS:
    raise ValueError(f"unknown UniPC variant {variant!r}; choose from {UNIPC_VARIANTS}")
  num_steps, width = len(orders), max(orders)
  alpha, sigma = _alpha_sigma(lam)
  out = {"a": np.zeros(num_steps), "w": np.zeros((num_steps, width)),
         "ca": np.zeros(num_steps), "cn": np.zeros(num_steps),
         "cw": np.zeros((num_steps, width))}

  def step(i: int, p: int) -> tuple[float, np.ndarray, float, np.ndarray]:
    """From z_i to z_{i+1} at order p: the predictor's and the corrector's weights."""
    h = lam[i + 1] - lam[i]
    ratios = (lam[i - np.arange(1, p)] - lam[i]) / h  # r_k < 0, k = 1..p-1
    b, b_h = _unipc_b_vector(h, p, variant)
    powers = np.vander(np.append(ratios, 1.0), p, increasing=True).T  # R_{kj} = r_j^k
    ddim = -alpha[i + 1] * math.expm1(-h)  # the order-1 weight of x0_hat_i
    # Differences D_k = (x0_hat_{i-k} - x0_hat_i) / r_k enter with -alpha B(h) rho_k.
    if p == 1:
      rho_p = np.zeros(0)
    elif p == 2:
      rho_p = np.array([0.5])
    else:
      rho_p = np.linalg.solve(powers[:-1, :-1], b[:-1])
    rho_c = np.array([0.5]) if p == 1 else np.linalg.solve(powers, b)
    scale = -alpha[i + 1] * b_h
    pred = np.zeros(width)
    pred[1:p] = scale * rho_p / ratios
    pred[0] = ddim - pred[1:p].sum()
    corr = np.zeros(width)
    corr[1:p] = scale * rho_c[:-1] / ratios
    new = scale * rho_c[-1]
    corr[0] = ddim - corr[1:p].sum() - new
    return sigma[i + 1] / sigma[i], pred, new, corr  # the sigma ratio scales both

  for i, p in enumerate(orders):
    out["a"][i], out["w"][i], _, _ = step(i, p)
    if i >= 1:  # correct z_i, made by step i - 1 at its order
      out["ca"][i], _, out["cn"][i], out["cw"][i] = step(i - 1, orders[i - 1])
  return out


def solve_multistep(x0_fn: X0Fn, noise: jax.Array, key: jax.Array, *, solver: str, order: int,
           num_steps: int, log_snr_fn: schedules.LogSnrFn, threshold_fn=lambda x: x,
           spacing: str = "time", variant: str = "bh2", corrector: bool = True,
           lower_order_final: bool = True, start: float = 1.0,
           init: jax.Array | None = None, project: editing.Project | None = None,
           on_step: Callable[[int], None] | None = None) -> jax.Array:
  """Samples [B, ...] from z_1 = noise [B, ...] in `num_steps` network evaluations.

  solver: "dpmpp" (ODE), "dpmpp_sde" or "unipc"; `order` 1-3; `variant` (UniPC) bh1 or bh2.
  `threshold_fn` is applied to every x0_hat before it is used. `key` (or keys [B]) draws the
  SDE's fresh noise. Editing (`editing`): `start` < 1 with `init` begins from the input noised to
  time `start`; `project` replaces the known region of every new and every corrected sample.
  """
  if solver not in ("dpmpp", "dpmpp_sde", "unipc"):
    raise ValueError(f"unknown multistep solver {solver!r}")
  if not 1 <= order <= 3:
    raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
  log_snr = schedules.log_snr_grid(num_steps, log_snr_fn, spacing, start)
  project = project or editing.keep_nothing
  if not np.all(np.diff(log_snr) > 0):
    raise ValueError(f"{num_steps} {spacing}-spaced steps repeat a noise level (the schedule is "
                     f"clipped at its ends): use fewer steps or spacing 'logsnr'")
  lam = log_snr / 2.0
  orders = step_orders(num_steps, order, lower_order_final)
  width = max(orders)
  dtype = noise.dtype
  as_const = lambda c: jnp.asarray(c, jnp.float32)
  if solver == "unipc":
    coef = unipc_coefficients(lam, orders, variant)
    if not corrector:
      coef["ca"][:], coef["cn"][:], coef["cw"][:] = 0.0, 0.0, 0.0
    noise_scale = np.zeros(num_steps)
  else:
    a, w, noise_scale = dpm_solver_pp_coefficients(lam, orders, sde=solver == "dpmpp_sde")
    coef = {"a": a, "w": w}
  use_corrector = solver == "unipc" and corrector
  stochastic = solver == "dpmpp_sde"
  batch = noise.shape[0]

  def combine(weights, history):
    return jnp.tensordot(weights.astype(dtype), history, axes=1)

  def step(carry, inputs):
    z, z_prev, history = carry
    i, level, level_next, c = inputs
    x0 = threshold_fn(x0_fn(z, jnp.full((batch,), level, jnp.float32))).astype(dtype)
    if use_corrector:  # UniC: refine z_i with x0_hat_i (no-op weights at i = 0)
      corrected = c["ca"] * z_prev + c["cn"] * x0 + combine(c["cw"], history)
      z = jnp.where(i > 0, project(corrected.astype(dtype), level), z)
    history = jnp.concatenate([x0[None], history[:-1]], axis=0)
    z_next = c["a"] * z + combine(c["w"], history)
    if stochastic:
      z_next = z_next + c["n"] * noise_lib.normal(noise_lib.fold_in(key, i), z.shape, dtype)
    if on_step is not None:
      jax.debug.callback(on_step, i)
    return (project(z_next.astype(dtype), level_next), z, history), None

  per_step = {k: as_const(v) for k, v in coef.items()}
  per_step["n"] = as_const(noise_scale)
  history = jnp.zeros((width,) + noise.shape, dtype)
  inputs = (jnp.arange(num_steps), as_const(log_snr[:-1]), as_const(log_snr[1:]), per_step)
  z = project(editing.start_latent(init, noise, log_snr[0]), log_snr[0])
  (z, _, _), _ = jax.lax.scan(step, (z, z, history), inputs)
  return z
