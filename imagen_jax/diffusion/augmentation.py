"""Noise conditioning augmentation for super-resolution stages (Imagen, sec. 2.5).

The low-res conditioning image is corrupted by the forward process at an augmentation level
aug_level in [0, 1] (random per example in training, fixed at sampling), and the network is told
the level, as a log-SNR like its own noise level, so it learns to ignore artifacts of the stage
below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import noise
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import schedules


def noise_augment(key: jax.Array, lowres: jax.Array, aug_level: jax.Array,
                  log_snr_fn: schedules.LogSnrFn) -> tuple[jax.Array, jax.Array]:
  """Corrupts lowres [B, h, w, C] at aug_level [B]; returns (z_lowres, aug_log_snr [B]).

  `key` is one key or one per example (see `noise`).

  aug_level 0 leaves the image unchanged up to the clipped log-SNR (sigma ~ 5e-5).
  """
  aug_log_snr = log_snr_fn(aug_level)
  eps = noise.normal(key, lowres.shape, lowres.dtype)
  return objectives.q_sample(lowres, eps, aug_log_snr), aug_log_snr


def random_aug_levels(key: jax.Array, batch: int, max_level: float = 1.0) -> jax.Array:
  """Training draws aug_level ~ U(0, max_level) per example: [B]."""
  return jax.random.uniform(key, (batch,), dtype=jnp.float32, maxval=max_level)
