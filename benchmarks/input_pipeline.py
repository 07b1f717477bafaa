"""Input pipeline throughput on this host: shapes and a folder of JPEGs, at 64 and 256.

    python -m benchmarks.input_pipeline                      # everything, in a temporary data_dir
    python -m benchmarks.input_pipeline --jpegs=500 --nofull_256 --nostep

Measures, in one process:
- build times: `shapes` 64x64 at full size (110k examples, what the demo builds), `shapes:256`
  (full size unless --nofull_256), and the one-time conversion of a folder of JPEGs;
- pipeline images/s (decode, resize/crop, SR low-res, batch; steady state after warm-up) for
  each source at the base stage's 64x64, the tiny CPU configs' 32x32 and the SR stage's
  256x256 (+ its 64x64 low-res), with
  decoding in threads (`data.num_workers=0`, the default) and in 2 worker processes;
- next to them, the images/s that a training step of the CPU-sized configs consumes: the
  network's forward+backward at batch 16, jitted (as `benchmarks/model_step.py` measures it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where to build (default: a temporary dir).")
_JPEGS = flags.DEFINE_integer("jpegs", 2000, "JPEGs in the folder source (640x480, quality 90).")
_FULL_256 = flags.DEFINE_bool("full_256", True, "Build shapes:256 at full size (110k).")
_STEP = flags.DEFINE_bool("step", True, "Also time the tiny configs' network step.")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Timed seconds per pipeline row (after warm-up).")


def make_jpeg_folder(root: str, count: int) -> None:
  """`count` smooth 640x480 JPEGs (photo-like to the codec) with .txt captions."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:480, :640]
  for i in range(count):
    freq, phase = rng.uniform(5, 40, 2), rng.uniform(0, 6, 3)
    image = 127.5 + 100 * np.sin(x[..., None] / freq[0] + y[..., None] / freq[1] + phase)
    image += rng.normal(0, 8, image.shape)  # texture, so the files are photo-sized
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(root, f"{i:06d}.jpg"), quality=90)
    with open(os.path.join(root, f"{i:06d}.txt"), "w") as f:
      f.write(f"a picture of waves number {i}")


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def pipeline_rate(config: Any, seconds: float) -> float:
  """Steady-state images/s of `make_pipeline(config)` (no text)."""
  from imagen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.make_pipeline(config)
  try:
    for _ in range(3):  # warm-up: threads or workers start, buffers fill
      next(data)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      images += len(next(data)["index"])
    return images / (time.perf_counter() - start)
  finally:
    data.close()


def step_rate(config: Any, batch_size: int = 16) -> float:
  """images/s of the network's jitted forward+backward at training size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(config)
  inputs = models.init_inputs(config, batch_size)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  inputs = {k: (v if v is None or v.dtype == bool else jax.random.normal(next(keys), v.shape))
            for k, v in inputs.items()}
  params = jax.jit(model.init)(jax.random.PRNGKey(1), **inputs)["params"]

  @jax.jit
  def step(params, inputs):
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))
    return jax.value_and_grad(loss)(params)

  jax.block_until_ready(step(params, inputs))
  times = harness.timeit(lambda: jax.block_until_ready(step(params, inputs)), repeats=5)
  return batch_size / float(np.median(times))


def main(argv: Sequence[str]) -> None:
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="input_pipeline_")
  folder = os.path.join(data_dir, "jpegs")
  rows = []

  # --- builds -------------------------------------------------------------------------------
  total = sum(shapes.SPLITS.values())
  seconds = timed(lambda: shapes.build(data_dir, 64))
  rows.append({"what": "build shapes 64x64", "examples": total, "seconds": round(seconds, 1),
               "images_per_s": round(total / seconds)})
  sizes = None if _FULL_256.value else {"train": 10_000, "validation": 500, "heldout": 500}
  count_256 = total if sizes is None else sum(sizes.values())
  seconds = timed(lambda: shapes.build(data_dir, 256, num_examples=sizes))
  rows.append({"what": "build shapes 256x256", "examples": count_256,
               "seconds": round(seconds, 1), "images_per_s": round(count_256 / seconds)})
  if not os.path.isdir(folder):
    make_jpeg_folder(folder, _JPEGS.value)
  base = config_lib.load_config("configs/base64.py:500m")
  base.data.source, base.data.data_dir = f"folder:{folder}", data_dir
  seconds = timed(lambda: sources.get_data_source(base.data))
  rows.append({"what": "convert folder of 640x480 JPEGs", "examples": _JPEGS.value,
               "seconds": round(seconds, 1), "images_per_s": round(_JPEGS.value / seconds)})

  # --- pipelines ----------------------------------------------------------------------------
  for size, config_name in ((32, "configs/base64.py:tiny"), (64, "configs/base64.py:500m"),
                            (256, "configs/sr256.py")):
    for source in ("shapes:256" if size == 256 else "shapes", f"folder:{folder}"):
      for workers in (0, 2):
        config = config_lib.load_config(config_name)
        config.data.source, config.data.data_dir = source, data_dir
        config.data.num_workers, config.batch_size = workers, 64
        rate = pipeline_rate(config, _SECONDS.value)
        rows.append({"what": f"pipeline {source.split(':')[0]} -> {size}"
                             + (f" (+{config.lowres.size} low-res)" if config.stage == "sr" else ""),
                     "decode_in": f"{workers} processes" if workers else "threads",
                     "images_per_s": round(rate)})

  # --- what a training step consumes ----------------------------------------------------------
  if _STEP.value:
    for name, overrides in (("configs/base64.py:tiny", {}),
                            ("configs/base64.py:tiny", {"model.stem_patch": 2}),
                            ("configs/sr256.py:tiny", {}), ("configs/sr1024.py:tiny", {})):
      config = config_lib.load_config(name)
      for key, value in overrides.items():
        config_lib.set_by_path(config, key, value)
      size = config.train_crop or config.image_size
      label = name + "".join(f" --config.{k}={v}" for k, v in overrides.items())
      rows.append({"what": f"network step {label} ({size}x{size})", "decode_in": "batch 16",
                   "images_per_s": round(step_rate(config))})
  harness.report("input_pipeline", rows, extra={"data_dir": data_dir, "cpus": os.cpu_count()})
  if not _DATA_DIR.value:  # ~0.6 GB of datasets made for this run only
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
