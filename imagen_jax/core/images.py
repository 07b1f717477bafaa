"""Images as files: PNG bytes, reading and writing PNGs (local or gs://), and grids.

Sampling outdirs, the training previews, the demo's report and every evaluation use these.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from imagen_jax.core import fileio


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


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> the bytes of a PNG file."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def write_png(image: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, 3] atomically (a reader never sees half a PNG), locally or on gs://."""
  fileio.write_bytes(path, png_bytes(image))


def read_png(path: str) -> np.ndarray:
  """A PNG (or any image PIL reads) as uint8 [H, W, 3]."""
  return np.asarray(Image.open(io.BytesIO(fileio.read_bytes(path))).convert("RGB"))
