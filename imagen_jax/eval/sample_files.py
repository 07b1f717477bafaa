"""Reading an `imagen-jax sample` outdir: OUT/samples.jsonl and the PNGs it lists."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image


def read_records(samples_dir: str) -> list[dict[str, Any]]:
  """The records of OUT/samples.jsonl, in file order (one per finished image)."""
  path = os.path.join(samples_dir, "samples.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --samples must be an `imagen-jax sample` outdir")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_image(samples_dir: str, record: dict[str, Any]) -> np.ndarray:
  """The image of one record: uint8 [H, W, 3]."""
  return np.asarray(Image.open(os.path.join(samples_dir, record["file"])).convert("RGB"))
