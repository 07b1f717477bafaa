"""Classifier-free guidance and the null text condition it contrasts with.

The null condition is the paper's: the text embeddings zeroed (no learned null token). The
same function serves training (condition dropout) and sampling, so the two agree.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def null_text(text_emb: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The unconditional text input: embeddings [B, L, D] zeroed, the mask [B, L] kept."""
  return jnp.zeros_like(text_emb), text_mask


def drop_text(key: jax.Array, text_emb: jax.Array, rate: float) -> jax.Array:
  """Zeroes each example's embeddings [B, L, D] with probability `rate` (condition dropout)."""
  keep = jax.random.uniform(key, (text_emb.shape[0], 1, 1)) >= rate
  return jnp.where(keep, text_emb, jnp.zeros_like(text_emb))


def combine(cond: jax.Array, uncond: jax.Array, weight: float | jax.Array) -> jax.Array:
  """eps = w * eps_c + (1 - w) * eps_u: w = 1 is exactly the conditional, w = 0 the unconditional.

  Guidance is affine in the network output, so it holds for eps, x0 or v outputs alike.
  """
  return weight * cond + (1.0 - weight) * uncond


def guided_model_fn(model_fn: Callable[..., jax.Array], weight: float | jax.Array
                    ) -> Callable[..., jax.Array]:
  """Wraps `model_fn(z, log_snr, text_emb, text_mask, **extra)` with classifier-free guidance.

  The conditional and unconditional halves run as one batched forward pass of size 2B. A
  Python-float weight of 1 skips the unconditional half.
  """
  if isinstance(weight, (int, float)) and weight == 1.0:
    return model_fn

  def guided(z, log_snr, text_emb, text_mask, **extra):
    null_emb, null_mask = null_text(text_emb, text_mask)
    double = lambda a, b: jnp.concatenate([a, b], axis=0)
    extra2 = {k: (None if v is None else double(v, v)) for k, v in extra.items()}
    out = model_fn(double(z, z), double(log_snr, log_snr), double(text_emb, null_emb),
                   double(text_mask, null_mask), **extra2)
    cond, uncond = jnp.split(out, 2, axis=0)
    return combine(cond, uncond, weight)

  return guided
