"""Noise conditioning augmentation for super-resolution stages (Imagen, sec. 2.5).

The low-res conditioning image is corrupted by the forward process at an augmentation level
aug_level in [0, 1] (random per example in training, fixed at sampling), and the network is told
the level, as a log-SNR like its own noise level, so it learns to ignore artifacts of the stage
below.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def augment_lowres(config: Any, key: jax.Array, lowres: jax.Array, aug_level: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """An SR stage's low-res input [B, h, w, C] noise-augmented at aug_level [B] by the stage's
  augmentation schedule: (what the network reads, aug_log_snr [B]). `config.lowres.augment_at`
  "output" upsamples it to the stage's size first (bilinear, corners aligned: DeepFloyd IF's),
  so the noise is drawn at the output resolution; "input" (the paper's) noises it as it is."""
  if config.lowres.get("augment_at", "input") == "output":
    lowres = upsample_align_corners(lowres, config.image_size)
  return noise_augment(key, lowres, aug_level, schedules.aug_log_snr_fn(config.lowres))


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of linear interpolation with the corners aligned."""
  position = np.arange(size_out) * ((size_in - 1) / max(size_out - 1, 1))
  low = np.minimum(np.floor(position).astype(int), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = position - low
  matrix = np.zeros((size_out, size_in), np.float64)
  np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), high), frac)
  return matrix.astype(np.float32)


def upsample_align_corners(images: jax.Array, size: int) -> jax.Array:
  """images [B, h, w, C] -> [B, size, size, C], bilinear with the corner pixels aligned (torch's
  `interpolate(mode="bilinear", align_corners=True)`)."""
  rows = _interpolation_matrix(images.shape[1], size)
  cols = _interpolation_matrix(images.shape[2], size)
  return jnp.einsum("yh,bhwc,xw->byxc", rows, images.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST).astype(images.dtype)
