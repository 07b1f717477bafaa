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


def learned_variance(v: jax.Array, log_snr_t: jax.Array, log_snr_s: jax.Array) -> jax.Array:
  """The variance of a DDPM step from level t to s chosen by the network's output v [B, ...]
  (Nichol & Dhariwal's learned range): log var = f log beta + (1 - f) log posterior_var with
  f = (v + 1) / 2, beta = 1 - alpha_bar_t / alpha_bar_s, posterior_var = beta (1 - alpha_bar_s)
  / (1 - alpha_bar_t), floored at 1e-20 as diffusers does."""
  log_bar_t, log_bar_s = jax.nn.log_sigmoid(log_snr_t), jax.nn.log_sigmoid(log_snr_s)
  beta = -jnp.expm1(log_bar_t - log_bar_s)
  posterior = jnp.maximum(beta * jax.nn.sigmoid(-log_snr_s) / jax.nn.sigmoid(-log_snr_t), 1e-20)
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  return jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * jnp.log(posterior)).astype(v.dtype)


def posterior(z: jax.Array, x: jax.Array, log_snr_t: jax.Array, log_snr_s: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """q(z_s | z_t, x) for s less noisy than t: (mean [B, ...], variance, broadcastable), with
  c = 1 - SNR(t) / SNR(s): mean = alpha_s ((1 - c) z_t / alpha_t + c x), var = c sigma_s^2."""
  lt, ls = schedules.right_broadcast(log_snr_t, z), schedules.right_broadcast(log_snr_s, z)
  alpha_t, _ = schedules.alpha_sigma(lt)
  alpha_s, sigma_s = schedules.alpha_sigma(ls)
  c = -jnp.expm1(lt - ls)
  return alpha_s * ((1.0 - c) * z / alpha_t + c * x), jnp.maximum(c * sigma_s ** 2, 1e-20)


def learned_range_vlb(output: jax.Array, z: jax.Array, x: jax.Array, log_snr: jax.Array,
                      schedule: schedules.DiscreteSchedule) -> jax.Array:
  """The VLB term of Nichol & Dhariwal's hybrid loss [B], in bits per dimension: KL from the
  true posterior q(z_s | z_t, x) to the network's p(z_s | z_t) one timestep down, with the
  network's eps (the first half of `output`'s channels) held fixed so the term trains only the
  variance (the second half). Noise levels below timestep 1, whose step ends at the clean image
  (the decoder term of the paper), count 0."""
  channels = z.shape[-1]
  eps_hat = jax.lax.stop_gradient(output[..., :channels]).astype(jnp.float32)
  timestep = schedule.timestep(log_snr)
  log_snr_s = schedule(timestep / schedule.num_timesteps)  # timestep - 1 (t = (k + 1) / T)
  x0_hat = to_x0_eps(z, eps_hat, log_snr, "eps")[0]
  mean_q, var_q = posterior(z, x, log_snr, log_snr_s)
  mean_p, _ = posterior(z, x0_hat, log_snr, log_snr_s)
  var_p = learned_variance(output[..., channels:].astype(jnp.float32),
                           schedules.right_broadcast(log_snr, z),
                           schedules.right_broadcast(log_snr_s, z))
  log_var_p, log_var_q = jnp.log(var_p), jnp.log(var_q)
  kl = 0.5 * (-1.0 + log_var_p - log_var_q + jnp.exp(log_var_q - log_var_p)
              + jnp.square(mean_q - mean_p) * jnp.exp(-log_var_p))
  bits = jnp.mean(kl, axis=tuple(range(1, z.ndim))) / jnp.log(2.0)
  return jnp.where(timestep >= 1.0, bits, 0.0)
