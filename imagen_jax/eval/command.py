"""`imagen-jax eval`: score samples written by `imagen-jax sample` (OUT/samples.jsonl + PNGs).

    imagen-jax eval --metric=shapes --samples=OUT
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags
import numpy as np
from PIL import Image

_METRIC = flags.DEFINE_enum("metric", "shapes", ["shapes"], "What to compute.")
_SAMPLES = flags.DEFINE_string("samples", None, "Directory with samples.jsonl and its images.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the scores as JSON to this file.")


def read_samples(samples_dir: str) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
  """The records of samples.jsonl and their images (uint8 [H, W, 3]), in file order."""
  path = os.path.join(samples_dir, "samples.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --samples must be an `imagen-jax sample` outdir")
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  images = [np.asarray(Image.open(os.path.join(samples_dir, r["file"])).convert("RGB"))
            for r in records]
  return records, images


def shapes_scores(samples_dir: str) -> dict[str, dict[str, float]]:
  from imagen_jax.eval import shapes  # pylint: disable=g-import-not-at-top
  records, images = read_samples(samples_dir)
  return shapes.score_by_split(records, images)


def main(argv: Sequence[str]) -> None:
  del argv
  if not _SAMPLES.value:
    raise flags.ValidationError("--samples is required")
  scores = shapes_scores(_SAMPLES.value)
  text = json.dumps(scores, indent=2, sort_keys=True)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")
