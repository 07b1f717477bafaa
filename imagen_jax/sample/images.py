"""Image files and grids shared by sampling, training previews and the demo report."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows * H, columns * W, 3] grid (row-major)."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def write_png(image: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, 3] atomically: a reader never sees a half-written PNG."""
  tmp = path + ".tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
