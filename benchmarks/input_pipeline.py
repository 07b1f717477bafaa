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
- text from an embedding cache in the encode job's format at T5-XXL width (4096 x 128, random
  bf16 rows of 8-24 tokens): raw reads per second on one thread, and the JPEG folder's 64x64
  pipeline with each example's embedding looked up (what `base64.py` trains from);
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


def pipeline_rate(config: Any, seconds: float, embedding_lookup: Any = None) -> float:
  """Steady-state images/s of `make_pipeline(config)` (no text, or cached embeddings)."""
  from imagen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.make_pipeline(config, embedding_lookup=embedding_lookup)
  try:
    for _ in range(3):  # warm-up: threads or workers start, buffers fill
      next(data)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      images += len(next(data)["index"])
    return images / (time.perf_counter() - start)
  finally:
    data.close()


def write_random_cache(root: str, config: Any, count: int, seed: int = 0) -> str:
  """An embedding cache in the encode job's format for `count` examples at the config's text
  width and length (random bf16 rows, 8-24 real tokens each: typical captions); returns root."""
  from imagen_jax.text import cache  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  metadata = cache.create_or_check(root, cache.Metadata(
      num_examples=count, part_size=1024, width=config.text.width,
      max_length=config.text.max_length, dtype="bfloat16",
      encoder={"name": "random rows (benchmarks/input_pipeline.py)"},
      source={"source": config.data.source}))
  for part in range(metadata.num_parts):
    start, end = metadata.part_range(part)
    lengths = rng.integers(8, 25, end - start)
    writer = cache.PartWriter(root, metadata, part)
    emb = rng.standard_normal((end - start, int(lengths.max()), config.text.width), np.float32)
    writer.add(emb, lengths, range(start, end))
    writer.commit()
  return root


def cache_read_rate(root: str, seconds: float) -> float:
  """Random-order `EmbeddingCache[i]` reads per second on one thread (padded float32 rows, as
  the pipeline gets them)."""
  from imagen_jax.text import cache  # pylint: disable=g-import-not-at-top
  embeddings = cache.EmbeddingCache(root)
  order = np.random.default_rng(0).permutation(len(embeddings))
  reads, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    embeddings[int(order[reads % len(order)])]
    reads += 1
  return reads / (time.perf_counter() - start)


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
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
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

  # --- text from the embedding cache: T5-XXL rows (4096 wide, 128 positions) ----------------
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/base64.py:500m")
  config.data.source, config.data.data_dir = f"folder:{folder}", data_dir
  config.batch_size = 64
  config.data.embed_cache = write_random_cache(os.path.join(data_dir, "embed_cache"), config,
                                               _JPEGS.value)
  rows.append({"what": "embedding cache reads (T5-XXL rows, 1 thread, random order)",
               "decode_in": "-",
               "images_per_s": round(cache_read_rate(config.data.embed_cache, _SECONDS.value))})
  rows.append({"what": "pipeline folder -> 64 + cached T5-XXL embeddings", "decode_in": "threads",
               "images_per_s": round(pipeline_rate(config, _SECONDS.value,
                                                   train.open_embedding_cache(config)))})

  # --- what a training step consumes ----------------------------------------------------------
  if _STEP.value:
    for name, overrides in (("configs/base64.py:tiny", {}),
                            ("configs/base64.py:tiny", {"model.stem_patch": 2}),
                            ("configs/sr256.py:tiny", {}), ("configs/sr1024.py:tiny", {})):
      config = config_lib.load_config(name)
      for key, value in overrides.items():
        config_lib.set_by_path(config, key, value)
      _, size, _ = config_lib.stage_sizes(config)
      label = name + "".join(f" --config.{k}={v}" for k, v in overrides.items())
      rows.append({"what": f"network step {label} ({size}x{size})", "decode_in": "batch 16",
                   "images_per_s": round(step_rate(config))})
  harness.report("input_pipeline", rows, extra={"data_dir": data_dir, "cpus": os.cpu_count()})
  if not _DATA_DIR.value:  # ~0.6 GB of datasets made for this run only
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
