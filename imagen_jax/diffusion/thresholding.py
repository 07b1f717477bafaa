"""Clipping of x0 predictions during sampling: static and dynamic thresholding (Imagen, sec. 2.3)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ThresholdFn = Callable[[jax.Array], jax.Array]


def static_threshold(x0: jax.Array) -> jax.Array:
  """Clips x0 [B, ...] to the data range [-1, 1]."""
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0: jax.Array, percentile: float = 99.5, max_scale: float = 0.0
                      ) -> jax.Array:
  """Imagen's dynamic thresholding of x0 [B, ...].

  Per sample, s = max(1, the `percentile`-th percentile of |x0|), on the 0-100 scale (99.5, not
  0.995); x0 is clipped to [-s, s] and divided by s, so the output lies in [-1, 1] and pixels
  that saturate at high guidance are pushed inwards instead of clipped flat. `max_scale` > 0
  caps s (diffusers' `sample_max_value`, 1.5 for DeepFloyd IF).
  """
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"dynamic thresholding percentile must be in (0, 100], got {percentile}")
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = _capped(jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0), max_scale)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def _capped(s: jax.Array, max_scale: float) -> jax.Array:
  return jnp.minimum(s, max_scale) if max_scale > 0 else s


# The methods by index: `per_example_threshold` takes each example's as its index here.
METHODS = ("none", "static", "dynamic")


def per_example_threshold(x0: jax.Array, method: jax.Array, percentile: jax.Array,
                          max_scale: float = 0.0) -> jax.Array:
  """x0 [B, ...] thresholded example by example: `method` int [B] indexes METHODS and
  `percentile` float [B] is each example's dynamic percentile (0-100 scale). Both may be traced,
  so examples with different choices share one compiled program."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  is_dynamic = method == METHODS.index("dynamic")

  def scales() -> jax.Array:
    return _capped(jnp.maximum(jax.vmap(jnp.percentile)(flat, percentile.astype(jnp.float32)),
                               1.0), max_scale)
  # The percentile sorts every example's pixels at every step: skipped at run time for a
  # batch without a dynamic row.
  s = jax.lax.cond(jnp.any(is_dynamic), scales, lambda: jnp.ones(x0.shape[:1], jnp.float32))
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  method = jnp.reshape(method, (-1,) + (1,) * (x0.ndim - 1))
  dynamic = jnp.clip(x0, -s, s) / s
  return jnp.where(jnp.reshape(is_dynamic, method.shape), dynamic,
                   jnp.where(method == METHODS.index("static"), static_threshold(x0), x0))


def get_threshold_fn(name: str, percentile: float = 99.5, max_scale: float = 0.0
                     ) -> ThresholdFn:
  """`dynamic` (with `percentile` and `max_scale`), `static` or `none`."""
  if name == "dynamic":
    return lambda x0: dynamic_threshold(x0, percentile, max_scale)
  if name == "static":
    return static_threshold
  if name == "none":
    return lambda x0: x0
  raise ValueError(f"unknown thresholding {name!r}; choose dynamic, static or none")
