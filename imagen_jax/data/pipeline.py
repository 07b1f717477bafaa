"""The input pipeline: grain over a TFDS data source, per process, resumable, skipping bad input.

    data = make_pipeline(config, tokenize_fn=encoder.tokenize)        # or embedding_lookup=...
    batch = next(data)              # this process's share of the global batch, numpy, uint8 images
    arrays = global_batch(batch, mesh)                  # jax.Arrays sharded over ('data', 'fsdp')
    state = data.get_state()        # JSON-able; data.set_state(state) resumes at the next batch

The order of examples: one global shuffle of the split per epoch from `config.seed` (each
epoch differently, all processes alike); global batch k is positions [kB, (k + 1)B) of that
endless stream, and process p of P takes its p-th block of B / P positions, so the processes'
shards are disjoint and cover each epoch, and a global batch holds the same examples, in the
same order, whatever the number of processes.
Records are read (a local batch's in one call), decoded, preprocessed and matched with their
cached embeddings in threads (`config.data.prefetch` batches ahead) or in
`config.data.num_workers` processes; bad examples come back as markers that the batching step, in
the main process, counts and drops. Random crops and caption choices draw from a generator
seeded by (seed, stream position), so they repeat exactly after a restore.

A batch (local batch b = config.batch_size / process_count, S = config.train_crop or
config.image_size):
  image      uint8 [b, S, S, 3]
  lowres     uint8 [b, s, s, 3]    SR stages: antialiased down-sample of `image`,
                                   s = config.lowres.size * S / config.image_size
  tokens     int32 [b, L]          with tokenize_fn (captions encoded on the fly), or
  text_emb   float32 [b, L, D]     with embedding_lookup (config.data.embed_cache)
  text_mask  bool [b, L]
  index      int64 [b]             the source index of each example (host-only)
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable

from absl import flags
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from imagen_jax.core import config_lib
from imagen_jax.core import partitioning
from imagen_jax.data import preprocess
from imagen_jax.data import sources

TokenizeFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
EmbeddingLookup = Callable[[int], tuple[np.ndarray, np.ndarray]]
STATE_VERSION = 1


class MissingEmbeddingError(KeyError):
  """The embedding cache lacks an example (config.data.missing_embedding='error')."""

  def __str__(self) -> str:  # KeyError would show the message quoted
    return str(self.args[0])


class ReadInBlocks(grain.MapDataset):
  """Stream position -> (source index, record), reading `block` positions' records per call.

  array_record's per-call overhead is far larger than the cost of one more record in the same
  call, so reading a batch's records together makes the pipeline much cheaper, and on a CPU
  host that is CPU time the training step gets back. Blocks start at multiples of `block` (the
  local batch, so each process reads only its own positions); the grain threads that ask for
  positions of one block wait for one read. Each element is what reading its position alone
  gives, so batches, resumption and random draws are unchanged.
  """

  def __init__(self, parent: grain.MapDataset, data_source: Any, block: int):
    super().__init__(parent)
    self._source, self._block = data_source, max(1, int(block))
    self._lock, self._cache = threading.Lock(), collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, position):
    if isinstance(position, slice):
      return self.slice(position)
    start = position - position % self._block
    with self._lock:  # a block is read once, whichever thread asks first
      block = self._cache.get(start)
      if block is None:
        end = min(start + self._block, len(self._parent))
        indices = [int(self._parent[p]) for p in range(start, end)]
        block = list(zip(indices, self._source.__getitems__(indices)))
        self._cache[start] = block
        while len(self._cache) > 4:  # prefetching reaches at most a block or two ahead
          self._cache.popitem(last=False)
    return block[position - start]

  def __getstate__(self) -> dict[str, Any]:  # grain's worker processes get a copy, unlocked
    state = dict(self.__dict__)
    state["_lock"], state["_cache"] = None, None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock, self._cache = threading.Lock(), collections.OrderedDict()

  def __str__(self) -> str:
    return f"ReadInBlocks(block={self._block})"


class ReadAndPreprocess:
  """((source index, record), rng) -> a preprocessed example, or {"skipped": kind, "index"}.

  Runs in grain's reader threads or worker processes, so it is a picklable object holding
  plain values.
  """

  def __init__(self, info: sources.SourceInfo, config: Any, random_caption: bool):
    self.image_key, self.caption_key = info.image_key, info.caption_key
    self.image_size, self.crop, self.lowres = config_lib.stage_sizes(config)
    self.min_resolution = int(config.data.min_resolution)
    self.random_crop = bool(config.data.random_crop)
    self.random_caption = random_caption

  def __call__(self, item: tuple[int, Any], rng: np.random.Generator) -> dict[str, Any]:
    index, record = item
    try:
      return self._example(index, record, rng)
    except preprocess.BadInput as e:
      return {"skipped": e.kind, "index": index}

  def _caption(self, record: Any, rng: np.random.Generator) -> tuple[str, str | None]:
    if not self.random_caption:
      return sources.first_caption(record, self.caption_key)
    # Several captions (coco): a random usable one, per epoch (the rng depends on position).
    candidates = sources.caption_candidates(sources.lookup(record, self.caption_key))
    error = preprocess.BadInput("missing_caption")
    for i in rng.permutation(len(candidates)):
      try:
        return preprocess.decode_caption(candidates[i])
      except preprocess.BadInput as e:
        error = e
    raise error

  def _example(self, index: int, record: Any, rng: np.random.Generator) -> dict[str, Any]:
    caption, caption_kind = self._caption(record, rng)
    if "width" in record and "height" in record:  # converted folders store it: skip early
      self._check_resolution(int(record["height"]), int(record["width"]))
    # Large JPEGs decode at a reduced scale, still >= 2x the stage's size before the resize.
    pixels, image_kind = preprocess.image_to_rgb(sources.lookup(record, self.image_key),
                                                 reduce_to=2 * self.image_size)
    height, width = pixels.shape[:2]
    self._check_resolution(height, width)
    out_h, out_w = preprocess.resized_extent(height, width, self.image_size)
    if self.random_crop:
      top = int(rng.integers(out_h - self.image_size + 1))
      left = int(rng.integers(out_w - self.image_size + 1))
    else:
      top, left = (out_h - self.image_size) // 2, (out_w - self.image_size) // 2
    if self.crop < self.image_size:  # SR on crops (the 1024 stage): a random crop, always
      top += int(rng.integers(self.image_size - self.crop + 1))
      left += int(rng.integers(self.image_size - self.crop + 1))
    image = preprocess.resize_and_crop(pixels, self.image_size, self.crop, (top, left))
    example = {"index": index, "image": np.ascontiguousarray(image), "caption": caption,
               "converted": [k for k in (caption_kind, image_kind) if k]}
    if self.lowres:
      example["lowres"] = preprocess.downsample(image, self.lowres)
    return example

  def _check_resolution(self, height: int, width: int) -> None:
    if min(height, width) < self.min_resolution:
      raise preprocess.BadInput("too_small", f"{width}x{height} < {self.min_resolution}")


class LookUpEmbedding:
  """example -> the example with `text_emb` float32 [L, D] and `text_mask` bool [L] from the
  embedding cache, or a skip marker {"skipped": "missing_embedding"} (missing_embedding='skip').

  Runs in grain's reader threads next to decoding, so the lookups (a ranged read and a padded
  float32 row each: 2 MB at T5-XXL's 4096 x 128) proceed in parallel rather than one at a time
  in the main process.
  """

  def __init__(self, lookup: EmbeddingLookup, missing: str, where: dict[str, str]):
    self.lookup, self.missing, self.where = lookup, missing, where

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    if "skipped" in element:
      return element
    index = element["index"]
    try:
      emb, mask = self.lookup(index)
    except (KeyError, IndexError) as error:
      if self.missing == "skip":
        return {"skipped": "missing_embedding", "index": index}
      raise MissingEmbeddingError(
          f"the embedding cache {self.where['embed_cache']!r} has no entry for key {index} "
          f"(index {index} of split {self.where['split']!r} of {self.where['source']!r}); "
          f"re-run the encode job, or set config.data.missing_embedding='skip' to skip such "
          f"examples: {error}") from None
    return {**element, "text_emb": np.asarray(emb, np.float32),
            "text_mask": np.asarray(mask, bool)}


class _BatchIterator(grain.DatasetIterator):
  """Main process: drops and counts skip markers, stacks, tokenizes.

  Its state is the upstream state after the last example it took, plus the counts, so a
  restored pipeline continues with exactly the next example.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, text: dict[str, Any],
               give_up_after: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._text = text
    self._give_up_after = give_up_after
    self._skipped: collections.Counter = collections.Counter()
    self._converted: collections.Counter = collections.Counter()

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    skipped_in_a_row = 0
    while len(examples) < self._batch_size:
      if skipped_in_a_row > self._give_up_after:  # never loop forever over unusable data
        raise RuntimeError(
            f"{self._text['source']!r} split {self._text['split']!r}: the last "
            f"{skipped_in_a_row} records (a whole epoch of this process's shard) were all "
            f"skipped; skips so far: {dict(self._skipped)}. Check config.data (min_resolution, "
            f"keys) and the data.")
      element = next(self._parent)
      skipped_in_a_row += 1
      if "skipped" in element:
        self._skipped[element["skipped"]] += 1
        continue
      self._converted.update(element["converted"])
      examples.append(element)
      skipped_in_a_row = 0
    batch = {"image": np.stack([e["image"] for e in examples]),
             "index": np.asarray([e["index"] for e in examples], np.int64)}
    if "lowres" in examples[0]:
      batch["lowres"] = np.stack([e["lowres"] for e in examples])
    if "text_emb" in examples[0]:
      batch["text_emb"] = np.stack([e["text_emb"] for e in examples])
      batch["text_mask"] = np.stack([e["text_mask"] for e in examples])
    elif self._text.get("tokenize_fn") is not None:
      tokens, mask = self._text["tokenize_fn"]([e["caption"] for e in examples])
      batch["tokens"] = np.asarray(tokens, np.int32)
      batch["text_mask"] = np.asarray(mask, bool)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"upstream": self._parent.get_state(), "skipped": dict(self._skipped),
            "converted": dict(self._converted)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["upstream"])
    self._skipped = collections.Counter(state["skipped"])
    self._converted = collections.Counter(state["converted"])


class _BatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int, text: dict[str, Any],
               give_up_after: int):
    super().__init__(parent)
    self._args = (batch_size, text, give_up_after)

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), *self._args)


class _ProcessBlocks(grain.MapDataset):
  """Process p's positions of the global stream: the p-th block of `local` in each global batch."""

  def __init__(self, parent: grain.MapDataset, local: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._local, self._index, self._count = local, process_index, process_count

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, offset = divmod(index, self._local)
    return self._parent[(batch * self._count + self._index) * self._local + offset]

  def __str__(self) -> str:
    return f"_ProcessBlocks(local={self._local}, process={self._index}/{self._count})"


class Pipeline:
  """An endless iterator of this process's batches (see the module doc), resumable.

  Attributes: `source` (random access to the split's records), `info` (sources.SourceInfo),
  `local_batch_size`, `process_index`, `process_count`.
  """

  def __init__(self, dataset: grain.IterDataset, data_source: Any, info: sources.SourceInfo,
               local_batch_size: int, process_index: int, process_count: int, seed: int):
    self.source = data_source
    self.info = info
    self.local_batch_size = local_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self._seed = seed
    self._iterator = iter(dataset)

  def __iter__(self) -> "Pipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def _where(self) -> dict[str, Any]:
    return {"source": self.info.source, "split": self.info.split, "seed": self._seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "local_batch_size": self.local_batch_size}

  def get_state(self) -> dict[str, Any]:
    """A JSON-able dict: where this process's stream stands after the last batch returned."""
    return {"version": STATE_VERSION, **self._where(), "iterator": self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (of `get_state`): the next batches are those that followed it."""
    if not state:
      return
    mismatched = {k: (state.get(k), v) for k, v in self._where().items() if state.get(k) != v}
    if state.get("version") != STATE_VERSION or mismatched:
      raise ValueError(f"the saved input-pipeline state does not fit this pipeline "
                       f"(saved, now): {mismatched or {'version': state.get('version')}}; "
                       f"the data order would not continue where it stopped")
    self._iterator.set_state(state["iterator"])

  def _counts(self, which: str) -> dict[str, int]:
    return dict(self._iterator.get_state()[which])

  def skip_counts(self) -> dict[str, int]:
    """Examples left out, by kind: at conversion (folder/wds, once) plus by this stream so far."""
    counts = collections.Counter(self.info.build_counts.get("skipped", {}))
    counts.update(self._counts("skipped"))
    return dict(sorted(counts.items()))

  def convert_counts(self) -> dict[str, int]:
    """Examples used after a conversion (grayscale, rgba, cmyk, ...), by kind, this stream."""
    return dict(sorted(self._counts("converted").items()))

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


class Mixture:
  """Batches made of several pipelines' batches side by side, each example with its part's
  `loss_weight` (float32 [b]): fine-tuning's instance and class-prior examples, half and half.
  The same interface as `Pipeline`; its state is the parts' states."""

  def __init__(self, parts: list[Pipeline], weights: list[float]):
    if len(parts) != len(weights) or not parts:
      raise ValueError(f"a mixture needs one weight per pipeline, got {len(parts)} and "
                       f"{len(weights)}")
    self.parts, self.weights = parts, [float(w) for w in weights]
    self.local_batch_size = sum(p.local_batch_size for p in parts)

  def __iter__(self) -> "Mixture":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(p) for p in self.parts]
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    out["loss_weight"] = np.concatenate([np.full(len(b["image"]), w, np.float32)
                                         for b, w in zip(batches, self.weights)])
    return out

  def get_state(self) -> dict[str, Any]:
    return {"mixture": [p.get_state() for p in self.parts]}

  def set_state(self, state: dict[str, Any]) -> None:
    if not state:
      return
    if len(state.get("mixture", ())) != len(self.parts):
      raise ValueError(f"the saved input-pipeline state is not that of a mixture of "
                       f"{len(self.parts)} pipelines: {sorted(state)}")
    for part, part_state in zip(self.parts, state["mixture"]):
      part.set_state(part_state)

  def skip_counts(self) -> dict[str, int]:
    return dict(sum((collections.Counter(p.skip_counts()) for p in self.parts),
                    collections.Counter()))

  def convert_counts(self) -> dict[str, int]:
    return dict(sum((collections.Counter(p.convert_counts()) for p in self.parts),
                    collections.Counter()))

  def close(self) -> None:
    for part in self.parts:
      part.close()


def make_pipeline(config: Any, *, split: str | None = None, tokenize_fn: TokenizeFn | None = None,
                  embedding_lookup: EmbeddingLookup | None = None,
                  process_index: int | None = None, process_count: int | None = None) -> Pipeline:
  """The pipeline of `config`'s stage for this process (see the module doc).

  Text: `embedding_lookup(index) -> (emb [L, D], mask [L])` when config.data.embed_cache is
  set, else `tokenize_fn(captions) -> (ids int32 [b, L], mask bool [b, L])`; with neither the
  batches carry no text (image-only uses: benchmarks, previews of data).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if config.data.missing_embedding not in ("error", "skip"):
    raise ValueError(f"config.data.missing_embedding={config.data.missing_embedding!r} must be "
                     f"'error' or 'skip'")
  use_cache = bool(config.data.embed_cache)
  if use_cache and embedding_lookup is None:
    raise ValueError(f"config.data.embed_cache={config.data.embed_cache!r} is set but no "
                     f"embedding_lookup was given")
  local_batch = config.batch_size // process_count
  if jax.process_count() > 1:
    # One process builds or converts the dataset; the others wait, then read it.
    if jax.process_index() == 0:
      sources.get_builder(config.data)
    multihost_utils.sync_global_devices(f"imagen_jax.data: {config.data.source} is built")
  data_source, info = sources.get_data_source(config.data, split)
  sources.check_not_empty(data_source, info)

  ds = grain.MapDataset.range(len(data_source)).seed(int(config.seed))
  ds = ds.shuffle().repeat()  # reshuffled each epoch
  # With cached embeddings the caption is fixed (the cache holds one per record: the first).
  # Random draws follow the global stream position (mapped before the split by process), so
  # they do not depend on the number of processes either.
  # Worker processes each take every num_workers-th position: there a block would be mostly
  # records of other workers, so they read one at a time.
  block = local_batch if config.data.num_workers == 0 else 1
  ds = ReadInBlocks(ds, data_source, block)
  ds = ds.random_map(ReadAndPreprocess(info, config, random_caption=not use_cache))
  if use_cache:
    ds = ds.map(LookUpEmbedding(embedding_lookup, config.data.missing_embedding, {
        "embed_cache": config.data.embed_cache, "split": info.split,
        "source": config.data.source}))
  ds = _ProcessBlocks(ds, local_batch, process_index, process_count)
  prefetch = int(config.data.prefetch)
  threads = min(16, os.cpu_count() or 1) if prefetch else 0
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(prefetch * local_batch, threads)))
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (unparsed under pytest)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers)))
  text = {"source": config.data.source, "split": info.split,
          "tokenize_fn": None if use_cache else tokenize_fn}
  shard_epoch = -(-len(data_source) // process_count)
  return Pipeline(_BatchDataset(it_ds, local_batch, text, give_up_after=shard_epoch),
                  data_source, info, local_batch, process_index, process_count, int(config.seed))


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.Array]:
  """Each process's batch -> global jax.Arrays split over the mesh's ('data', 'fsdp') axes.

  Every process passes its own local batch (equal sizes); the global batch dimension is their
  concatenation in process order. Non-numeric fields stay behind; with 64-bit types disabled,
  int64/float64 become int32/float32 explicitly rather than with a warning.
  """
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
      continue
    if not jax.config.jax_enable_x64 and value.dtype.itemsize == 8:
      value = value.astype(np.int32 if value.dtype.kind in "iu" else np.float32)
    sharding = partitioning.batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
