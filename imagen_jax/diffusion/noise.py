"""Gaussian noise from one PRNG key, or from one key per example.

Sampling draws per-example noise from per-example keys, so an image depends only on its own key
(its seed and index), not on the batch it happens to be sampled in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_batch(key: jax.Array) -> bool:
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """N(0, I) of `shape` [B, ...]; with a batch of keys [B] (or raw [B, 2]), example b's noise
  depends only on key b, so an image does not change with the batch it is sampled in."""
  if _is_batch(key):
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
  return jax.random.normal(key, shape, dtype)


def fold_in(key: jax.Array, data: jax.Array | int) -> jax.Array:
  """jax.random.fold_in for one key or a batch of keys."""
  if _is_batch(key):
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
  return jax.random.fold_in(key, data)


