"""The forward process q(z_t | x), the eps / x0 / v parameterizations, and the training loss.

Shapes: images x, z, eps are [B, H, W, C]; log_snr is [B] (one noise level per example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import schedules

PARAMETERIZATIONS = ("eps", "x0", "v")
WEIGHTINGS = ("plain", "snr", "min_snr")


def q_sample(x: jax.Array, eps: jax.Array, log_snr: jax.Array) -> jax.Array:
  """z_t = alpha x + sigma eps, a draw from q(z_t | x) given the Gaussian noise eps."""
  alpha, sigma = schedules.alpha_sigma(schedules.right_broadcast(log_snr, x))
  return alpha * x + sigma * eps


def corrupt(key: jax.Array, x: jax.Array, log_snr_fn: schedules.LogSnrFn
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws t ~ U(0, 1) and eps ~ N(0, I) per example; returns (z_t, log_snr [B], eps)."""
  t_key, eps_key = jax.random.split(key)
  t = jax.random.uniform(t_key, (x.shape[0],), dtype=jnp.float32)
  log_snr = log_snr_fn(t)
  eps = jax.random.normal(eps_key, x.shape, dtype=x.dtype)
  return q_sample(x, eps, log_snr), log_snr, eps


def target(x: jax.Array, eps: jax.Array, log_snr: jax.Array, parameterization: str) -> jax.Array:
  """What the network should output under `parameterization` for clean x and noise eps."""
  if parameterization == "eps":
    return eps
  if parameterization == "x0":
    return x
  if parameterization == "v":
    alpha, sigma = schedules.alpha_sigma(schedules.right_broadcast(log_snr, x))
    return alpha * eps - sigma * x
  raise ValueError(f"unknown parameterization {parameterization!r}; choose from {PARAMETERIZATIONS}")


def to_x0_eps(z: jax.Array, output: jax.Array, log_snr: jax.Array, parameterization: str
              ) -> tuple[jax.Array, jax.Array]:
  """Converts a network output in any parameterization to (x0_hat, eps_hat) given z_t."""
  alpha, sigma = schedules.alpha_sigma(schedules.right_broadcast(log_snr, z))
  if parameterization == "eps":
    return (z - sigma * output) / alpha, output
  if parameterization == "x0":
    return output, (z - alpha * output) / sigma
  if parameterization == "v":
    # v = alpha eps - sigma x and z = alpha x + sigma eps, with alpha^2 + sigma^2 = 1.
    return alpha * z - sigma * output, sigma * z + alpha * output
  raise ValueError(f"unknown parameterization {parameterization!r}; choose from {PARAMETERIZATIONS}")


def eps_from_x0(z: jax.Array, x0: jax.Array, log_snr: jax.Array) -> jax.Array:
  """The noise implied by z_t and an (e.g. thresholded) x0 estimate."""
  alpha, sigma = schedules.alpha_sigma(schedules.right_broadcast(log_snr, z))
  return (z - alpha * x0) / sigma


def loss_weight(log_snr: jax.Array, parameterization: str, weighting: str,
                min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example weight [B] on the squared error of the network's own parameterization.

  Weightings are defined on the x0 error and converted: an error of eps is SNR times the error
  of x0, an error of v is (SNR + 1) times it. `plain`: unweighted error of the output;
  `snr`: x0 error weighted by SNR (the eps objective of Ho et al. in any parameterization);
  `min_snr`: x0 error weighted by min(SNR, gamma) (Hang et al. 2023). Computed in log space, so
  the weights stay finite at the ends of the schedule.
  """
  if weighting == "plain":
    return jnp.ones_like(log_snr)
  if weighting == "snr":
    log_w_x0 = log_snr
  elif weighting == "min_snr":
    log_w_x0 = jnp.minimum(log_snr, jnp.log(min_snr_gamma))
  else:
    raise ValueError(f"unknown loss weighting {weighting!r}; choose from {WEIGHTINGS}")
  if parameterization == "eps":
    log_factor = log_snr
  elif parameterization == "v":
    log_factor = jnp.logaddexp(log_snr, 0.0)  # log(SNR + 1)
  elif parameterization == "x0":
    log_factor = jnp.zeros_like(log_snr)
  else:
    raise ValueError(f"unknown parameterization {parameterization!r}; choose from {PARAMETERIZATIONS}")
  return jnp.exp(log_w_x0 - log_factor)


def diffusion_loss(output: jax.Array, x: jax.Array, eps: jax.Array, log_snr: jax.Array, *,
                   parameterization: str, weighting: str = "plain",
                   min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example weighted mean squared error [B] of the network output against its target."""
  err = jnp.square(output.astype(jnp.float32) - target(x, eps, log_snr, parameterization))
  mse = jnp.mean(err, axis=tuple(range(1, x.ndim)))
  return loss_weight(log_snr, parameterization, weighting, min_snr_gamma) * mse
