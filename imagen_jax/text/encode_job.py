"""Precomputing T5 caption embeddings into a cache (`imagen-jax encode`); converting weights.

    stats = run(config_lib.load_config("configs/encode.py:tiny", {"output": "cache"}))
    convert("/ckpt/t5-v1_1-xxl", "gs://b/t5-v1_1-xxl-orbax")

The captions come from `data.sources.get_captions`, the reader training uses: any source kind
(shapes, tfds:, folder:, wds:, or text: files), the first usable caption of each example.

The captions are split into parts of `part_size` examples; process i of n encodes parts
i, i + n, ... and skips parts already committed, so a rerun after a crash redoes only the
unfinished parts. All processes step together (padding with empty batches), as the sharded
encoder is one SPMD program.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import time
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import auto as tqdm

from imagen_jax.core import distributed
from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import weights


# ------------------------------------------------------------------------------- sources

def open_source(config: Any) -> Any:
  """The captions of config.source's split, read as training reads them (data/sources.py)."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top  # heavy: tfds, only to read captions (not --verify or --convert)
  data_config = sources.source_config(config.source, config.split, config.data_dir,
                                      caption_key=config.caption_key)
  try:
    return sources.get_captions(data_config, key_feature=config.key_feature)
  except sources.SourceError as e:
    raise ValueError(str(e).replace("config.data.source", "config.source")) from e


# ------------------------------------------------------------------------------- encoding

def _encoder_identity(spec: dict[str, Any]) -> dict[str, Any]:
  # Where the weights were read from and the compute dtype do not change what they are.
  return {k: v for k, v in spec.items() if k not in ("path", "dtype")}


def _batches(metadata: cache_lib.Metadata, parts: Sequence[int], batch: int):
  for part in parts:
    start, end = metadata.part_range(part)
    for lo in range(start, end, batch):
      yield part, lo, min(lo + batch, end), min(lo + batch, end) == end


def run(config) -> dict[str, Any]:
  """Encodes config.source into the cache at config.output; returns this process's stats."""
  if not config.output:
    raise ValueError("config.output is empty: give the cache directory (local or gs://)")
  if config.storage_dtype not in cache_lib.STORAGE_DTYPES:
    raise ValueError(f"config.storage_dtype must be one of {sorted(cache_lib.STORAGE_DTYPES)}")
  if config.distributed:  # `main` already did this from its flags; Python callers may not have
    distributed.maybe_initialize(force=True)
  num_processes, process = jax.process_count(), jax.process_index()
  source = open_source(config)
  mesh = partitioning.make_mesh(config.mesh)
  encoder = encoder_lib.load_configured(config.text, config.dtype, mesh=mesh)
  metadata = cache_lib.Metadata(
      num_examples=len(source), part_size=int(config.part_size), width=encoder.width,
      max_length=encoder.max_length, dtype=config.storage_dtype,
      encoder=_encoder_identity(encoder.spec), source=source.description)
  if process == 0:
    cache_lib.create_or_check(config.output, metadata)
  if num_processes > 1:
    multihost_utils.sync_global_devices("imagen_jax encode: cache.json")
    cache_lib.create_or_check(config.output, metadata)

  if config.batch_size % num_processes:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_processes} processes")
  local_batch = config.batch_size // num_processes
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  local_shards = max(1, shards // num_processes)
  if local_batch % local_shards:
    raise ValueError(f"batch_size {config.batch_size} does not split over the mesh's "
                     f"{shards} batch shards (data x fsdp)")
  done = cache_lib.committed_parts(config.output, metadata)
  mine = [p for p in range(metadata.num_parts) if p % num_processes == process]
  pending = [p for p in mine if p not in done]
  sizes = [metadata.part_range(p)[1] - metadata.part_range(p)[0] for p in pending]
  steps = sum(math.ceil(n / local_batch) for n in sizes)
  if num_processes > 1:  # every process runs as many steps as the busiest one
    steps = int(np.max(multihost_utils.process_allgather(np.asarray(steps))))
  todo = sum(sizes)
  logging.info("cache %s: %d parts, %d done, process %d/%d encodes %d parts (%d captions)",
               config.output, metadata.num_parts, len(done), process, num_processes,
               len(pending), todo)

  batch_sharding = partitioning.batch_sharding(mesh, 2)
  encode = encoder._jitted()  # pylint: disable=protected-access
  max_length = encoder.max_length

  def dispatch(ids: np.ndarray, mask: np.ndarray):
    pad = local_batch - ids.shape[0]
    ids = np.pad(ids, ((0, pad), (0, 0)))
    mask = np.pad(mask, ((0, pad), (0, 0)))
    global_ids = jax.make_array_from_process_local_data(batch_sharding, ids)
    global_mask = jax.make_array_from_process_local_data(batch_sharding, mask)
    return encode(encoder.params, global_ids, global_mask)  # asynchronous

  def to_host(out) -> np.ndarray:
    if num_processes > 1:
      out = multihost_utils.global_array_to_host_local_array(
          out, mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    return np.asarray(out)

  stats = {"captions": 0, "tokens": 0, "data_bytes": 0, "parts": 0,
           "truncated": 0, "skipped_parts": len(mine) - len(pending)}
  writers: dict[int, cache_lib.PartWriter] = {}

  def finish(out, part, lengths, keys, last):
    # Runs on the writer thread: waits for the device, trims padding, appends, commits.
    emb = to_host(out)
    if part not in writers:
      writers[part] = cache_lib.PartWriter(config.output, metadata, part)
    writers[part].add(emb, lengths, keys)
    if last:
      record = writers.pop(part).commit()
      stats["parts"] += 1
      stats["data_bytes"] += record["data_bytes"]
    return len(lengths)

  progress = _progress(todo, config.progress)
  start_time = time.perf_counter()
  batches = _batches(metadata, pending, local_batch)
  in_flight: list[concurrent.futures.Future] = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    try:
      for _ in range(steps):
        item = next(batches, None)
        if item is None:  # this process is done; keep stepping with the others
          to_host(dispatch(np.zeros((0, max_length), np.int32), np.zeros((0, max_length), bool)))
          continue
        part, lo, hi, last = item
        keys, captions = [source.key(i) for i in range(lo, hi)], source[lo:hi]
        tokens = encoder.tokenizer(captions, keys)
        stats["truncated"] += tokens.truncated
        stats["tokens"] += int(tokens.lengths.sum())
        out = dispatch(tokens.ids, tokens.mask)
        in_flight.append(pool.submit(finish, out, part, tokens.lengths, keys, last))
        while len(in_flight) > 2:  # bounded look-ahead: one batch on the device, one writing
          n = in_flight.pop(0).result()
          stats["captions"] += n
          progress.update(n)
      for future in in_flight:
        n = future.result()
        stats["captions"] += n
        progress.update(n)
    except BaseException:
      for future in in_flight:
        future.cancel()
      concurrent.futures.wait(in_flight)  # a running write must end before its file is dropped
      for writer in writers.values():
        writer.abort()
      raise
    finally:
      progress.close()
  elapsed = time.perf_counter() - start_time
  stats.update(
      seconds=elapsed,
      captions_per_s=stats["captions"] / elapsed if elapsed > 0 else 0.0,
      bytes_per_caption=stats["data_bytes"] / stats["captions"] if stats["captions"] else 0.0,
      tokens_per_caption=stats["tokens"] / stats["captions"] if stats["captions"] else 0.0,
      process=process)
  return stats


def _progress(total: int, enabled: bool):
  return tqdm.tqdm(total=total, unit="caption", unit_scale=True, disable=not enabled,
                   mininterval=1.0, file=sys.stderr, desc="encode")


# ---------------------------------------------------------------------------- conversion

def convert(source: str, output: str, dtype: str = "float32") -> dict[str, Any]:
  """Reads T5 weights (Hugging Face or t5x directory) and writes them as an Orbax checkpoint."""
  kind, config, params = encoder_lib.read_weights(source, dtype=np.dtype(
      cache_lib.STORAGE_DTYPES[dtype]))
  vocab_path = encoder_lib._find_vocab(source, None)  # pylint: disable=protected-access
  weights.save_converted(output, config, params, fileio.read_bytes(vocab_path), source)
  count = sum(int(np.prod(a.shape)) for a in weights.flatten(params).values())
  return {"source": source, "kind": kind, "output": output, "params": count, "dtype": dtype,
          "config": config.to_dict()}
