"""Classifier-free guidance and the null text condition it contrasts with.

The null condition is the paper's: the text embeddings zeroed (no learned null token). The
same function serves training (condition dropout) and sampling, so the two agree.

A guidance interval (Kynkaenniemi et al. 2024) applies guidance only at noise levels sigma in
(lo, hi], in EDM's sigma = sigma_vp / alpha_vp = exp(-log_snr / 2) (their unit; EDM2-XXL used
(0.28, 5.42]): guidance at high noise pushes every sample towards the same layout, and at low
noise does little but costs a second pass. Outside it the conditional prediction is used and the
unconditional pass is skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Interval = tuple[float, float] | tuple[()]


def null_text(text_emb: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The unconditional text input: embeddings [B, L, D] zeroed, the mask [B, L] kept."""
  return jnp.zeros_like(text_emb), text_mask


def drop_text(key: jax.Array, text_emb: jax.Array, rate: float,
              null: jax.Array | None = None) -> jax.Array:
  """Replaces each example's embeddings [B, L, D] with probability `rate` (condition dropout)
  by zeros, or by `null` [1, L, D] (an encoded empty caption, IF's unconditional text)."""
  keep = jax.random.uniform(key, (text_emb.shape[0], 1, 1)) >= rate
  return jnp.where(keep, text_emb, jnp.zeros_like(text_emb) if null is None
                   else jnp.broadcast_to(null.astype(text_emb.dtype), text_emb.shape))


def drop_tokens(key: jax.Array, text_emb: jax.Array, rate: float) -> jax.Array:
  """Zeroes each token's embedding [B, L, D] with probability `rate`, independently (word
  dropout): the net also learns what each word means with any other word missing, as a whole
  caption's dropout teaches the unconditional model."""
  keep = jax.random.uniform(key, text_emb.shape[:2] + (1,)) >= rate
  return jnp.where(keep, text_emb, jnp.zeros_like(text_emb))


def combine(cond: jax.Array, uncond: jax.Array, weight: float | jax.Array,
            channels: int | None = None) -> jax.Array:
  """eps = w * eps_c + (1 - w) * eps_u: w = 1 is exactly the conditional, w = 0 the unconditional.

  Guidance is affine in the network output, so it holds for eps, x0 or v outputs alike. The
  weight is one number or one per example [B] (outputs [B, ...]). `channels`: only the first
  ones are guided, the rest (a learned variance, as IF's pipelines do) are the conditional's.
  """
  if jnp.ndim(weight) == 1:
    weight = jnp.reshape(weight, (-1,) + (1,) * (cond.ndim - 1)).astype(cond.dtype)
  if channels is not None and channels < cond.shape[-1]:
    guided = weight * cond[..., :channels] + (1.0 - weight) * uncond[..., :channels]
    return jnp.concatenate([guided, cond[..., channels:]], axis=-1)
  return weight * cond + (1.0 - weight) * uncond


def check_interval(interval: Sequence[float]) -> Interval:
  """The interval as a tuple: () for everywhere, or (lo, hi) with 0 <= lo < hi (EDM sigma)."""
  interval = tuple(float(v) for v in interval)
  if interval and (len(interval) != 2 or not 0.0 <= interval[0] < interval[1]):
    raise ValueError(f"a guidance interval is (lo, hi) in EDM sigma with 0 <= lo < hi, or () for "
                     f"guidance at every step; got {interval}")
  return interval


def in_interval(log_snr, interval: Interval):
  """Whether noise levels (log-SNRs, array or traced) lie in the interval: lo < sigma <= hi."""
  if not interval:
    return np.ones(np.shape(log_snr), bool)
  lo, hi = interval
  xp = jnp if isinstance(log_snr, jax.Array) else np
  sigma = xp.exp(-0.5 * log_snr)
  return (sigma > lo) & (sigma <= hi)


def guided_model_fn(model_fn: Callable[..., jax.Array], weight: float | jax.Array,
                    interval: Sequence[float] = (),
                    null: tuple[jax.Array, jax.Array] | None = None,
                    channels: int | None = None) -> Callable[..., jax.Array]:
  """Wraps `model_fn(z, log_snr, text_emb, text_mask, **extra)` with classifier-free guidance.

  The conditional and unconditional halves run as one batched forward pass of size 2B. A
  Python-float weight of 1 skips the unconditional half; an array weight [B] guides each
  example by its own, and a batch whose weights are all 1 skips it at run time. `null` (emb
  [B, L, D], mask [B, L]) replaces the zeroed text of the unconditional half (a negative
  prompt). `channels` as in `combine`. With an `interval`, guidance runs only where the noise
  level (of the first example: samplers step the batch together) lies in it. Where guidance is
  not needed, a `lax.cond` runs the conditional pass alone, so the skipped passes are skipped
  work.
  """
  interval = check_interval(interval)
  if isinstance(weight, (int, float)) and weight == 1.0:
    return model_fn
  per_example = jnp.ndim(weight) == 1

  def guided(z, log_snr, text_emb, text_mask, **extra):
    null_emb, null_mask = null_text(text_emb, text_mask) if null is None else null
    double = lambda a, b: jnp.concatenate([a, b], axis=0)
    extra2 = {k: (None if v is None else double(v, v)) for k, v in extra.items()}
    out = model_fn(double(z, z), double(log_snr, log_snr), double(text_emb, null_emb),
                   double(text_mask, null_mask), **extra2)
    cond, uncond = jnp.split(out, 2, axis=0)
    return combine(cond, uncond, weight, channels)

  if not interval and not per_example:
    return guided

  def guided_where_needed(z, log_snr, text_emb, text_mask, **extra):
    needed = jnp.asarray(in_interval(log_snr[0], interval))
    if per_example:  # a batch whose weights are all 1 needs no unconditional half
      needed &= jnp.any(jnp.asarray(weight) != 1.0)
    return jax.lax.cond(needed,
                        lambda: guided(z, log_snr, text_emb, text_mask, **extra),
                        lambda: model_fn(z, log_snr, text_emb, text_mask, **extra))

  return guided_where_needed
