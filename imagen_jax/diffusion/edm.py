"""The EDM formulation (Karras et al. 2022): preconditioning, noise distribution and loss.

EDM works on x = y + sigma n. The network F sees c_in x and is told the noise level; the
denoiser is D(x, sigma) = c_skip x + c_out F(c_in x, sigma). Here the network is told the level
as log-SNR = -2 log sigma (the same input the VP formulation gives it; EDM's c_noise = log(sigma)
/ 4 is an affine function of it), so both formulations share networks and samplers. Sampling
goes through `denoiser`, which maps the VP variables (z, log_snr) to EDM's and back.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import schedules


def preconditioning(sigma: jax.Array, sigma_data: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(c_skip, c_out, c_in) for noise levels sigma [B]."""
  var = sigma ** 2 + sigma_data ** 2
  return sigma_data ** 2 / var, sigma * sigma_data / jnp.sqrt(var), 1.0 / jnp.sqrt(var)


def sample_sigma(key: jax.Array, batch: int, p_mean: float = -1.2, p_std: float = 1.2
                 ) -> jax.Array:
  """Training noise levels [B]: log sigma ~ N(p_mean, p_std^2)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,), dtype=jnp.float32))


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so the loss is ~1 everywhere."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def log_snr_of_sigma(sigma: jax.Array) -> jax.Array:
  return -2.0 * jnp.log(sigma)


def precondition_apply(net_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                       sigma: jax.Array, sigma_data: float) -> jax.Array:
  """D(x, sigma) [B, ...] = c_skip x + c_out net_fn(c_in x, log_snr)."""
  c_skip, c_out, c_in = (schedules.right_broadcast(c, x) for c in preconditioning(sigma, sigma_data))
  out = net_fn(c_in * x, log_snr_of_sigma(sigma)).astype(x.dtype)
  return c_skip * x + c_out * out


def training_loss(net_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
                  y: jax.Array, *, sigma_data: float = 0.5, p_mean: float = -1.2,
                  p_std: float = 1.2) -> tuple[jax.Array, jax.Array]:
  """Per-example EDM loss [B] on clean images y [B, ...], and the log-SNRs [B] it used."""
  sigma_key, noise_key = jax.random.split(key)
  sigma = sample_sigma(sigma_key, y.shape[0], p_mean, p_std)
  x = y + schedules.right_broadcast(sigma, y) * jax.random.normal(noise_key, y.shape, y.dtype)
  denoised = precondition_apply(net_fn, x, sigma, sigma_data)
  mse = jnp.mean(jnp.square(denoised.astype(jnp.float32) - y), axis=tuple(range(1, y.ndim)))
  return loss_weight(sigma, sigma_data) * mse, log_snr_of_sigma(sigma)


def denoiser(net_fn: Callable[[jax.Array, jax.Array], jax.Array], sigma_data: float = 0.5
             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """An EDM-trained network as the samplers' `x0_fn(z, log_snr)` in VP variables."""

  def x0_fn(z, log_snr):
    sigma = jnp.exp(-0.5 * log_snr)
    x = z * schedules.right_broadcast(jnp.sqrt(1.0 + sigma ** 2), z)
    return precondition_apply(net_fn, x, sigma, sigma_data)

  return x0_fn
