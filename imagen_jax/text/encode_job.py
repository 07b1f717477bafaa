"""`imagen-jax encode`: precompute T5 caption embeddings into a cache; verify it; convert weights.

    # once: T5 weights (Hugging Face or t5x directory) -> Orbax, for fast sharded loading
    imagen-jax encode --convert=/ckpt/t5-v1_1-xxl --convert_to=gs://b/t5-v1_1-xxl-orbax
    # encode a split (rerunning the same command resumes; every host runs it on a pod)
    imagen-jax encode --config=configs/encode.py:xxl --config.text.encoder=gs://b/t5-v1_1-xxl-orbax \
        --config.source=tfds:coco_captions --config.output=gs://b/cache/coco-train
    # check that every part is there
    imagen-jax encode --config=configs/encode.py:xxl --config.output=gs://b/cache/coco-train --verify

The captions are split into parts of `part_size` examples; process i of n encodes parts
i, i + n, ... and skips parts already committed, so a rerun after a crash redoes only the
unfinished parts. All processes step together (padding with empty batches), as the sharded
encoder is one SPMD program.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import numpy as np

from imagen_jax import config_lib
from imagen_jax.text import cache as cache_lib
from imagen_jax import fileio
from imagen_jax.text import tokenizer as tokenizer_lib
from imagen_jax.train import distributed  # its flags: --coordinator_address, ...

_CONFIG = config_lib.config_flag("configs/encode.py:xxl")
_VERIFY = flags.DEFINE_bool("verify", False, "Check that the cache at config.output is complete.")
_CONVERT = config_lib.DEFINE_path("convert", None, "Convert the T5 weights in this Hugging Face or "
                               "t5x directory to an Orbax checkpoint (with --convert_to).")
_CONVERT_TO = config_lib.DEFINE_path("convert_to", None, "Output directory of --convert.")
_CONVERT_DTYPE = flags.DEFINE_enum("convert_dtype", "float32", ["float32", "bfloat16"],
                                   "Parameter dtype written by --convert.")


# ------------------------------------------------------------------------------ sources

class CaptionSource:
  """Random access to (key, caption) by example index."""
  description: dict[str, Any]

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, start: int, end: int) -> tuple[list[str], list[Any]]:
    raise NotImplementedError


class TextFileSource(CaptionSource):
  """One caption per line ("\\n"-separated; a trailing "\\r" is dropped); index = line number."""

  def __init__(self, path: str):
    text = fileio.read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
      lines.pop()  # the file's final newline ends the last line, it does not start a new one
    self.lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    self.name = os.path.basename(path.rstrip("/"))
    self.description = {"kind": "text", "path": path, "num_lines": len(self.lines)}

  def __len__(self) -> int:
    return len(self.lines)

  def read(self, start, end):
    return [f"{self.name}:{i + 1}" for i in range(start, end)], self.lines[start:end]


def _feature(example: Any, path: str, key_for_errors: str) -> Any:
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"example {key_for_errors!r} has no feature {path!r} (at {part!r}; "
                     f"available: {have})")
    value = value[part]
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
    if len(value) == 0:
      raise ValueError(f"example {key_for_errors!r}: feature {path!r} is an empty list")
    value = value[0]  # several captions per example: the first one is cached
  return value


class TfdsSource(CaptionSource):
  """A TFDS split through `tfds.data_source` (array_record; no TensorFlow needed for text)."""

  def __init__(self, name: str, split: str, data_dir: str, caption_key: str, key_feature: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.split, self.caption_key, self.key_feature = split, caption_key, key_feature
    self.description = {"kind": "tfds", "name": name, "split": split, "data_dir": data_dir,
                        "caption_key": caption_key, "key_feature": key_feature,
                        "num_examples": len(self.source)}

  def __len__(self) -> int:
    return len(self.source)

  def read(self, start, end):
    indices = list(range(start, end))
    getitems = getattr(self.source, "__getitems__", None)
    examples = getitems(indices) if getitems else [self.source[i] for i in indices]
    keys, captions = [], []
    for index, example in zip(indices, examples):
      key = f"{self.split}[{index}]"
      if self.key_feature:
        key = tokenizer_lib.caption_text(_feature(example, self.key_feature, key), key)
      keys.append(key)
      captions.append(_feature(example, self.caption_key, key))
    return keys, captions


def open_source(config) -> CaptionSource:
  source = config.source
  if source.startswith("text:"):
    return TextFileSource(source[len("text:"):])
  if source.startswith("tfds:"):
    name, _, builder_config = source[len("tfds:"):].partition(":")
    name = f"{name}/{builder_config}" if builder_config else name
    return TfdsSource(name, config.split, config.data_dir, config.caption_key, config.key_feature)
  raise ValueError(f"config.source must be 'tfds:NAME[:CONFIG]' or 'text:PATH', got {source!r}")


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
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import partitioning  # pylint: disable=g-import-not-at-top

  if not config.output:
    raise ValueError("config.output is empty: give the cache directory (local or gs://)")
  if config.storage_dtype not in cache_lib.STORAGE_DTYPES:
    raise ValueError(f"config.storage_dtype must be one of {sorted(cache_lib.STORAGE_DTYPES)}")
  if config.distributed:  # `main` already did this from its flags; Python callers may not have
    distributed.maybe_initialize(force=True)
  num_processes, process = jax.process_count(), jax.process_index()
  source = open_source(config)
  mesh = partitioning.make_mesh(config.mesh)
  encoder = encoder_lib.load_text_encoder(config.text.encoder, config.text.max_length,
                                          config.dtype, mesh=mesh)
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
        keys, captions = source.read(lo, hi)
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
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, unit="caption", unit_scale=True, disable=not enabled,
                   mininterval=1.0, file=sys.stderr, desc="encode")


# ---------------------------------------------------------------------------- conversion

def convert(source: str, output: str, dtype: str = "float32") -> dict[str, Any]:
  """Reads T5 weights (Hugging Face or t5x directory) and writes them as an Orbax checkpoint."""
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import weights  # pylint: disable=g-import-not-at-top
  kind, config, params = encoder_lib.read_weights(source, dtype=np.dtype(
      cache_lib.STORAGE_DTYPES[dtype]))
  vocab_path = encoder_lib._find_vocab(source, None)  # pylint: disable=protected-access
  weights.save_converted(output, config, params, fileio.read_bytes(vocab_path), source)
  count = sum(int(np.prod(a.shape)) for a in weights.flatten(params).values())
  return {"source": source, "kind": kind, "output": output, "params": count, "dtype": dtype,
          "config": config.to_dict()}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"imagen-jax encode: unexpected arguments {list(argv[1:])}")
  if _CONVERT.value:
    if not _CONVERT_TO.value:
      raise SystemExit("imagen-jax encode: --convert needs --convert_to=DIR")
    summary = convert(_CONVERT.value, _CONVERT_TO.value, _CONVERT_DTYPE.value)
    print("CONVERT_SUMMARY " + json.dumps(summary))
    return
  config = _CONFIG.value
  if config is None:
    raise SystemExit("imagen-jax encode: --config is required (e.g. configs/encode.py:xxl)")
  if _VERIFY.value:
    if not config.output:
      raise SystemExit("imagen-jax encode --verify: set --config.output to the cache directory")
    report = cache_lib.verify(config.output, checksums=config.verify_checksums)
    print(report.summary())
    sys.exit(0 if report.ok else 1)
  distributed.initialize_from_flags(force=bool(config.distributed))  # before any device is used
  stats = run(config)
  print(f"encoded {stats['captions']} captions in {stats['seconds']:.1f}s "
        f"({stats['captions_per_s']:.1f} captions/s), {stats['bytes_per_caption']:.0f} bytes "
        f"per caption ({stats['tokens_per_caption']:.1f} tokens), {stats['truncated']} "
        f"truncated, {stats['skipped_parts']} parts already done")
  print("ENCODE_SUMMARY " + json.dumps(stats))
