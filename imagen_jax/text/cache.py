"""The embedding cache: T5 embeddings of a caption split, ragged on disk, random access by index.

Layout (local path or gs://):

    <root>/cache.json                  what the cache holds: count, part size, width, max_length,
                                       storage dtype, the encoder's spec, the caption source
    <root>/parts/part-000042.bin       part 42's rows: [tokens, width] little-endian bf16/f32,
                                       examples concatenated in index order, no padding
    <root>/parts/part-000042.json      its commit record: lengths, keys, bytes, crc32

Part p holds examples [p * part_size, min((p + 1) * part_size, count)). A part counts as done
only when its commit record exists, and the record is written after the data file is complete
(a local file is renamed into place, a GCS object appears when its upload is finalised), so a
crash leaves at most an unreferenced data file that the rerun overwrites. Each process of a
multi-host job writes whole parts of its own.

Why this layout (and not zarr or array_record): an example is read with exactly one ranged read
of exactly its bytes (offset from the lengths in the commit record), a part is written as one
sequential stream, and the store holds two objects per part instead of one per example or
chunk. Zarr chunks would either pad ragged rows or cost a read of a whole chunk per example,
and zarr3 sharding needs conditional (generation-matched) reads and writes; array_record reads
local files only. Plain files and objects also work through fsspec/gcsfs unchanged, including
against a local GCS emulator, and need no TensorFlow.

A cache is read with `EmbeddingCache(path)`; `cache[i]` gives the padded `[max_length, width]`
float32 embedding and its `[max_length]` mask, and `cache.key(i)` the example's key.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import zlib
from typing import Any, Iterable, Sequence

import ml_dtypes
import numpy as np

from imagen_jax.core import fileio

FORMAT = "imagen-jax embedding cache"
VERSION = 1
METADATA = "cache.json"
PARTS_DIR = "parts"
STORAGE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


class MissingEmbeddingError(KeyError):
  """An example whose part is not (yet) in the cache; the message names the index and part."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else super().__str__()


class CacheMismatchError(ValueError):
  """An existing cache was written for other captions, another encoder or other settings."""


@dataclasses.dataclass(frozen=True)
class Metadata:
  num_examples: int
  part_size: int
  width: int
  max_length: int
  dtype: str                      # storage dtype: "bfloat16" or "float32"
  encoder: dict[str, Any]         # TextEncoder.spec
  source: dict[str, Any]          # where the captions came from

  @property
  def num_parts(self) -> int:
    return -(-self.num_examples // self.part_size)

  def part_range(self, part: int) -> tuple[int, int]:
    start = part * self.part_size
    return start, min(start + self.part_size, self.num_examples)

  def to_json(self) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)},
                      indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, where: str = "") -> "Metadata":
    values = json.loads(text)
    if values.get("format") != FORMAT or values.get("version") != VERSION:
      raise ValueError(f"{where} is not an {FORMAT} v{VERSION}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def part_name(part: int) -> str:
  return f"part-{part:06d}"


def data_path(root: str, part: int) -> str:
  return fileio.join(root, PARTS_DIR, part_name(part) + ".bin")


def record_path(root: str, part: int) -> str:
  return fileio.join(root, PARTS_DIR, part_name(part) + ".json")


def read_metadata(root: str) -> Metadata:
  path = fileio.join(root, METADATA)
  if not fileio.exists(path):
    raise FileNotFoundError(f"no embedding cache at {root} ({METADATA} is missing)")
  return Metadata.from_json(fileio.read_text(path), path)


def create_or_check(root: str, metadata: Metadata) -> Metadata:
  """Writes cache.json, or checks that the existing one describes the same job (resume)."""
  path = fileio.join(root, METADATA)
  if fileio.exists(path):
    existing = read_metadata(root)
    if existing != metadata:
      old, new = dataclasses.asdict(existing), dataclasses.asdict(metadata)
      diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
      raise CacheMismatchError(
          f"{root} holds a cache written with other settings; differences (existing, now): "
          f"{diff}. Use a new output path, or delete the old cache.")
    return existing
  fileio.makedirs(fileio.join(root, PARTS_DIR))
  fileio.write_bytes(path, metadata.to_json().encode())
  return metadata


class PartWriter:
  """Streams one part's rows to its data file, then commits the part's record.

      writer = PartWriter(root, metadata, part)
      writer.add(embeddings, lengths, keys)   # [n, L, D] float32, [n], n keys; any number of calls
      writer.commit()                        # the part is now visible to readers
  """

  def __init__(self, root: str, metadata: Metadata, part: int):
    self.root, self.metadata, self.part = root, metadata, part
    self.start, self.end = metadata.part_range(part)
    self.dtype = np.dtype(STORAGE_DTYPES[metadata.dtype])
    self.lengths: list[int] = []
    self.keys: list[str] = []
    self.crc = 0
    self.bytes = 0
    fileio.remove_stale_temporaries(data_path(root, part))  # from a writer that was killed
    self._context = fileio.atomic_writer(data_path(root, part))
    self._stream = self._context.__enter__()

  def add(self, embeddings: np.ndarray, lengths: Sequence[int], keys: Sequence[Any]) -> None:
    if len(self.lengths) + len(lengths) > self.end - self.start:
      raise ValueError(f"part {self.part} holds {self.end - self.start} examples; got more")
    rows = [np.asarray(embeddings[i, :n]) for i, n in enumerate(lengths)]
    # Native byte order: every host JAX runs on is little-endian, as the format says.
    data = np.ascontiguousarray(np.concatenate(rows).astype(self.dtype)).tobytes()
    self._stream.write(data)
    self.crc = zlib.crc32(data, self.crc)
    self.bytes += len(data)
    self.lengths += [int(n) for n in lengths]
    self.keys += [str(k) for k in keys]

  def commit(self) -> dict[str, Any]:
    if len(self.lengths) != self.end - self.start:
      raise ValueError(f"part {self.part}: {len(self.lengths)} of {self.end - self.start} "
                       "examples written; not committing")
    self._context.__exit__(None, None, None)  # data complete and visible
    record = {"part": self.part, "start": self.start, "end": self.end,
              "num_tokens": int(sum(self.lengths)), "data_bytes": self.bytes,
              "crc32": self.crc, "lengths": self.lengths, "keys": self.keys}
    fileio.write_bytes(record_path(self.root, self.part), json.dumps(record).encode())
    return record

  def abort(self) -> None:
    """Drops the unfinished data file: nothing becomes visible."""
    try:
      self._context.__exit__(RuntimeError, RuntimeError(f"part {self.part} aborted"), None)
    except RuntimeError:
      pass


def committed_parts(root: str, metadata: Metadata) -> set[int]:
  """The parts whose commit record exists (one directory listing)."""
  names = set(fileio.listdir(fileio.join(root, PARTS_DIR)))
  return {p for p in range(metadata.num_parts) if part_name(p) + ".json" in names}


@dataclasses.dataclass
class _PartIndex:
  offsets: np.ndarray  # int64 [n + 1], row offsets
  keys: list[str]


class EmbeddingCache:
  """Random access to a cache by example index (the example's position in its source split).

  Picklable: worker processes reopen lazily (only the path and metadata travel).
  `cache[i]` -> (embedding float32 [max_length, width], zero past the caption; mask bool
  [max_length]). A missing part raises `MissingEmbeddingError` naming the index and part.
  """

  def __init__(self, path: str, max_parts_in_memory: int = 1024):
    self.path = path
    self.metadata = read_metadata(path)
    self.max_length = self.metadata.max_length
    self.width = self.metadata.width
    self.storage_dtype = np.dtype(STORAGE_DTYPES[self.metadata.dtype])
    self.encoder_spec = self.metadata.encoder
    self._max_parts = max_parts_in_memory
    self._init_state()

  def _init_state(self):
    self._parts: collections.OrderedDict[int, _PartIndex] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_parts"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_state()

  def __len__(self) -> int:
    return self.metadata.num_examples

  def _check(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"example index {index} is outside the cache [0, {len(self)})")
    return index

  def _part(self, part: int) -> _PartIndex:
    with self._lock:
      if part in self._parts:
        self._parts.move_to_end(part)
        return self._parts[part]
    path = record_path(self.path, part)
    try:
      record = json.loads(fileio.read_text(path))
    except FileNotFoundError:
      record = None
    if record is None:
      start, end = self.metadata.part_range(part)
      raise MissingEmbeddingError(
          f"no cached embedding for examples {start}..{end - 1}: part {part} of {self.path} "
          "is not finished (rerun `imagen-jax encode` with the same config to complete it)")
    offsets = np.zeros(len(record["lengths"]) + 1, np.int64)
    np.cumsum(record["lengths"], out=offsets[1:])
    entry = _PartIndex(offsets, record["keys"])
    with self._lock:
      self._parts[part] = entry
      while len(self._parts) > self._max_parts:
        self._parts.popitem(last=False)
    return entry

  def _locate(self, index: int) -> tuple[int, int, _PartIndex]:
    index = self._check(index)
    part = index // self.metadata.part_size
    try:
      entry = self._part(part)
    except MissingEmbeddingError as e:
      raise MissingEmbeddingError(f"example {index}: {e}") from None
    return part, index - part * self.metadata.part_size, entry

  def has(self, index: int) -> bool:
    try:
      self._locate(index)
      return True
    except MissingEmbeddingError:
      return False

  def key(self, index: int) -> str:
    _, row, entry = self._locate(index)
    return entry.keys[row]

  def length(self, index: int) -> int:
    _, row, entry = self._locate(index)
    return int(entry.offsets[row + 1] - entry.offsets[row])

  def raw(self, index: int) -> np.ndarray:
    """The stored rows [length, width] in the storage dtype (one ranged read)."""
    part, row, entry = self._locate(index)
    item = self.storage_dtype.itemsize * self.width
    start, end = int(entry.offsets[row]) * item, int(entry.offsets[row + 1]) * item
    data = fileio.read_bytes(data_path(self.path, part), start, end)
    if len(data) != end - start:
      raise IOError(f"example {index}: read {len(data)} of {end - start} bytes from part {part}")
    return np.frombuffer(data, self.storage_dtype).reshape(-1, self.width)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    rows = self.raw(index)
    emb = np.zeros((self.max_length, self.width), np.float32)
    emb[:len(rows)] = rows.astype(np.float32)
    mask = np.arange(self.max_length) < len(rows)
    return emb, mask

  def get_batch(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked `cache[i]` for several indices: [B, max_length, width], [B, max_length]."""
    pairs = [self[i] for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@dataclasses.dataclass
class VerifyReport:
  ok: bool
  num_examples: int
  num_parts: int
  missing_parts: list[int]
  bad_parts: dict[int, str]
  num_tokens: int
  data_bytes: int

  def summary(self) -> str:
    done = self.num_parts - len(self.missing_parts) - len(self.bad_parts)
    lines = [f"{'complete' if self.ok else 'INCOMPLETE'}: {done}/{self.num_parts} parts, "
             f"{self.num_examples} examples, {self.num_tokens} tokens, {self.data_bytes} bytes "
             f"of embeddings ({self.data_bytes / max(1, self.num_examples):.0f} bytes/caption)"]
    if self.missing_parts:
      shown = ", ".join(map(str, self.missing_parts[:20]))
      more = "" if len(self.missing_parts) <= 20 else f" (+{len(self.missing_parts) - 20} more)"
      lines.append(f"missing parts: {shown}{more}")
    for part, why in sorted(self.bad_parts.items()):
      lines.append(f"bad part {part}: {why}")
    return "\n".join(lines)


def verify(root: str, checksums: bool = False) -> VerifyReport:
  """Checks that every part is committed and its data file has the recorded size (and crc32)."""
  metadata = read_metadata(root)
  done = committed_parts(root, metadata)
  missing, bad = [], {}
  tokens = nbytes = 0
  item = np.dtype(STORAGE_DTYPES[metadata.dtype]).itemsize * metadata.width
  for part in range(metadata.num_parts):
    if part not in done:
      missing.append(part)
      continue
    record = json.loads(fileio.read_text(record_path(root, part)))
    start, end = metadata.part_range(part)
    problems = []
    if (record["start"], record["end"]) != (start, end) or len(record["lengths"]) != end - start \
        or len(record["keys"]) != end - start:
      problems.append(f"record covers {record['start']}..{record['end']} with "
                      f"{len(record['lengths'])} lengths, expected {start}..{end}")
    if min(record["lengths"], default=1) < 1 or max(record["lengths"], default=1) > metadata.max_length:
      problems.append("a length outside [1, max_length]")
    if record["data_bytes"] != sum(record["lengths"]) * item:
      problems.append("recorded bytes do not match the lengths")
    try:
      size = fileio.size(data_path(root, part))
    except FileNotFoundError:
      size = -1
    if size != record["data_bytes"]:
      problems.append(f"data file has {size} bytes, record says {record['data_bytes']}")
    elif checksums and zlib.crc32(fileio.read_bytes(data_path(root, part))) != record["crc32"]:
      problems.append("crc32 mismatch")
    if problems:
      bad[part] = "; ".join(problems)
    tokens += sum(record["lengths"])
    nbytes += record["data_bytes"]
  return VerifyReport(not missing and not bad, metadata.num_examples, metadata.num_parts,
                      missing, bad, tokens, nbytes)
