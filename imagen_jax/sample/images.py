"""Sampling outputs: PNG files, grids and an outdir's samples.jsonl, local or on gs://.

An outdir of `imagen-jax sample` holds one PNG per image, grid.png and samples.jsonl (one JSON
record per finished image). Sampling, the demo, the training previews and every evaluation read
and write them through these functions.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from imagen_jax import fileio

RECORDS = "samples.jsonl"


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


def records_path(outdir: str) -> str:
  return fileio.join(outdir, RECORDS)


def read_records(outdir: str, missing_ok: bool = False) -> list[dict[str, Any]]:
  """The records of OUT/samples.jsonl, in file order (one per finished image)."""
  path = records_path(outdir)
  if not fileio.exists(path):
    if missing_ok:
      return []
    raise FileNotFoundError(f"{path} not found: expected the outdir of `imagen-jax sample`")
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def write_records(outdir: str, records: Sequence[dict[str, Any]]) -> None:
  """Replaces OUT/samples.jsonl with `records`, atomically: object stores cannot append, and a
  reader (or a resumed run) sees either the old list or the new one, never a torn line."""
  fileio.write_text(records_path(outdir), "".join(json.dumps(r) + "\n" for r in records))


def read_image(outdir: str, record: dict[str, Any]) -> np.ndarray:
  """The image of one record: uint8 [H, W, 3]."""
  return read_png(fileio.join(outdir, record["file"]))
