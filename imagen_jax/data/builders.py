"""TFDS builders that convert image-caption folders and webdataset shards, once, to array_record.

    folder:PATH    images with a same-named .txt caption, or a captions.jsonl / captions.csv
                   at the top of PATH with a file column (file, file_name, filename, image or
                   path, relative to PATH) and a caption column (caption or text)
    wds:PATTERN    webdataset tar shards (jpg/jpeg/png/webp + txt per key), as img2dataset
                   writes them; PATTERN may hold globs and braces, e.g. `shards/{00000..00099}.tar`

Every image is fully decoded once here (truncated files are caught now, not mid-training) and
kept as its original encoded bytes; the pipeline decodes and converts it when read. Bad inputs
are skipped or converted by the rules of `preprocess` and counted; the counts are stored in
the dataset's metadata (`info.metadata["skipped"]`, `["converted"]`) and reach the training
metrics through the pipeline.

Records: `image` (encoded bytes), `caption` (text), `key` (relative path or webdataset key),
`width`, `height`. One split, `train`, in the sorted order of the files (shuffling disabled).
A dataset is identified by its PATH or PATTERN (a hash in the config name); to convert again
after the files change, delete `data_dir/<builder>/<config>`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from typing import Any, Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.core import fileio
from imagen_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
FILE_COLUMNS = ("file", "file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text")
_CHUNK = 256  # images validated concurrently (PIL releases the GIL while decoding)


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose code ships in this package, with no checksums or metadata files.

  TFDS looks for those next to the builder's module through `importlib_resources` (a backport
  that Python >= 3.9 installs lack); there are none, so say so.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None


def config_name(location: str) -> str:
  """A TFDS config name for a folder or pattern: readable stem plus a hash of the full string."""
  stem = re.sub(r"[^\w\-]+", "_", os.path.basename(location.rstrip("/")) or "root").strip("_")
  return f"{stem[:40] or 'data'}-{hashlib.sha1(location.encode()).hexdigest()[:10]}"


class _ImageCaptionBuilder(LocalBuilder):
  """Shared by the folder and webdataset converters: features, validation, counting."""

  VERSION = tfds.core.Version("1.0.0")
  _location_kind = ""

  def __init__(self, *, location: str, max_pixels: int = preprocess.MAX_PIXELS,
               min_side: int = preprocess.MIN_SIDE, num_threads: int = 0, **kwargs):
    self._location = location
    self._max_pixels = max_pixels
    self._min_side = min_side
    self._num_threads = num_threads or min(8, 2 * (os.cpu_count() or 1))
    self._counts = {"skipped": collections.Counter(), "converted": collections.Counter()}
    kwargs.setdefault("config", tfds.core.BuilderConfig(
        name=config_name(location), description=f"{self._location_kind}:{location}"))
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside its data sources, for grain's workers) as its __init__
    # arguments; it knows only its own.
    self._original_state.update(location=location, max_pixels=max_pixels, min_side=min_side,
                                num_threads=num_threads)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Image-caption pairs converted from {self._location_kind}:{self._location}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, as found
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),
            "width": tfds.features.Scalar(np.int32),
            "height": tfds.features.Scalar(np.int32),
        }),
        metadata=tfds.core.MetadataDict(source=f"{self._location_kind}:{self._location}"),
        disable_shuffling=True,  # records in sorted file order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _candidates(self) -> Iterator[tuple[str, Any, Any]]:
    """(key, image, caption) in sorted order; image and caption are bytes, a path to read, or
    a BadInput to count (caption may also be str)."""
    raise NotImplementedError

  def _validate(self, candidate: tuple[str, Any, Any]) -> tuple[str, Any]:
    """('ok', record, conversions) or ('skip', kind)."""
    key, image, caption = candidate
    try:
      image, caption = _load(image, "corrupt_image"), _load(caption, "missing_caption")
      if isinstance(caption, preprocess.BadInput):
        raise caption
      if isinstance(image, preprocess.BadInput):
        raise image
      text, caption_kind = preprocess.decode_caption(caption)
      pixels, image_kind = preprocess.decode_image(image, max_pixels=self._max_pixels,
                                                   min_side=self._min_side)
    except preprocess.BadInput as e:
      return "skip", e.kind
    record = {"image": image, "caption": text, "key": key,
              "width": pixels.shape[1], "height": pixels.shape[0]}
    return "ok", record, [k for k in (caption_kind, image_kind) if k]

  def _generate_examples(self):
    index = 0
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      candidates = iter(self._candidates())
      while chunk := list(itertools.islice(candidates, _CHUNK)):
        for result in pool.map(self._validate, chunk):
          if result[0] == "skip":
            self._counts["skipped"][result[1]] += 1
            continue
          self._counts["converted"].update(result[2])
          yield index, result[1]
          index += 1
    counts = {k: dict(sorted(v.items())) for k, v in self._counts.items()}
    if index == 0:  # TFDS would fail with "No examples were yielded", naming nothing
      raise FileNotFoundError(f"{self._location_kind}:{self._location} holds no usable image "
                              f"with a caption (skipped: {counts['skipped'] or 'none found'})")
    self.info.metadata.update(counts, examples=index)
    logging.info("Converted %s:%s: %d examples, skipped %s, converted %s", self._location_kind,
                 self._location, index, counts["skipped"], counts["converted"])


class ImageTextFolder(_ImageCaptionBuilder):
  """`folder:PATH`: images with .txt captions, or a captions.jsonl / .csv (see module doc)."""

  _location_kind = "folder"

  def _candidates(self):
    root = self._location.rstrip("/")
    if not fileio.isdir(root):
      raise FileNotFoundError(f"folder:{self._location}: no such directory")
    relative = {p[len(root) + 1:]: _File(p) for p in fileio.files_under(root)
                if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS}
    table = next((fileio.join(root, name) for name in CAPTION_FILES
                  if fileio.exists(fileio.join(root, name))), None)
    if table is None:
      for rel, path in relative.items():
        # Read in the validating threads: a missing .txt fails there as missing_caption.
        yield rel, path, _File(os.path.splitext(path)[0] + ".txt")
      return
    listed = set()
    for rel, caption in _caption_table(table):
      if isinstance(rel, preprocess.BadInput):  # an unreadable row
        yield "", rel, None
        continue
      rel = os.path.normpath(rel)
      listed.add(rel)
      path = relative.get(rel)
      yield rel, path if path is not None else preprocess.BadInput("missing_image", rel), caption
    for rel in relative:
      if rel not in listed:
        yield rel, b"", preprocess.BadInput("missing_caption", rel)


class _File(str):
  """A path whose contents are read in the validating threads (see `_load`)."""


def _load(item: Any, kind: str) -> Any:
  """File contents for a path (a BadInput of `kind` if it cannot be read); other items as is."""
  if not isinstance(item, _File):
    return item
  try:
    return fileio.read_bytes(item)
  except OSError as e:
    return preprocess.BadInput(kind, f"{item}: {e}")


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> Any:
  return next((row[n] for n in names if n in row), None)


def _caption_table(path: str) -> Iterator[tuple[Any, Any]]:
  """(relative file, raw caption) rows of captions.jsonl or captions.csv.

  Lines are decoded one by one (a non-UTF-8 line must not lose the rest of the file); a row
  that cannot be read yields a BadInput in place of the file name.
  """
  raw = fileio.read_bytes(path)
  lines = raw.splitlines()
  if path.endswith(".jsonl"):
    for line in lines:
      if not line.strip():
        continue
      try:
        text, _ = preprocess.decode_caption(line)
        row = json.loads(text)
      except (preprocess.BadInput, ValueError) as e:
        yield preprocess.BadInput("undecodable_caption", str(e)), None
        continue
      file = _pick(row, FILE_COLUMNS) if isinstance(row, dict) else None
      if not file:
        yield preprocess.BadInput("missing_image", f"row without a file: {line[:80]!r}"), None
        continue
      caption = _pick(row, CAPTION_COLUMNS)
      yield str(file), (preprocess.BadInput("missing_caption", str(file)) if caption is None
                        else caption)
    return
  decoded = []
  for line in lines:
    try:
      decoded.append(line.decode("utf-8-sig"))
    except UnicodeDecodeError:
      try:
        decoded.append(line.decode("cp1252"))
      except UnicodeDecodeError as e:
        decoded.append(None)
        yield preprocess.BadInput("undecodable_caption", str(e)), None
  reader = csv.DictReader(io.StringIO("\n".join(d for d in decoded if d is not None)))
  for row in reader:
    file = _pick(row, FILE_COLUMNS)
    if not file:
      yield preprocess.BadInput("missing_image", f"row without a file: {row}"), None
      continue
    yield str(file), _pick(row, CAPTION_COLUMNS)


class WebDatasetShards(_ImageCaptionBuilder):
  """`wds:PATTERN`: webdataset tar shards of (jpg|jpeg|png|webp, txt) per key."""

  _location_kind = "wds"

  def _candidates(self):
    shards = expand_pattern(self._location)
    if not shards:
      raise FileNotFoundError(f"wds:{self._location}: no shard matches")
    for shard in shards:
      try:
        yield from _tar_samples(shard)
      except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated shard loses its tail, not the job: the samples read so far are kept.
        logging.warning("wds shard %s is unreadable after some samples: %s", shard, e)
        self._counts["skipped"]["corrupt_shard"] += 1


def expand_pattern(pattern: str) -> list[str]:
  """Shard paths of a webdataset pattern: brace ranges/lists (`{000..009}`, `{a,b}`), globs."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match:
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
      low, high = numbers.groups()
      options = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
      options = body.split(",")
    return sorted({path for option in options
                   for path in expand_pattern(pattern[:match.start()] + option
                                              + pattern[match.end():])})
  parts = pattern.split("/")
  wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
  if wild is None:
    return [pattern] if fileio.exists(pattern) else []
  return fileio.glob(pattern)


def _split_key(name: str) -> tuple[str, str]:
  """webdataset naming: 'dir/0001.jpg' -> ('dir/0001', 'jpg'); the key ends at the first dot
  of the base name."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


def _tar_samples(shard: str) -> Iterator[tuple[str, Any, Any]]:
  """(shard/key, image bytes or BadInput, caption bytes or BadInput) per sample, in tar order."""
  def emit(key, files):
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    caption = files.get("txt")
    full_key = f"{os.path.basename(shard)}/{key}"
    return (full_key,
            image if image is not None else preprocess.BadInput("missing_image", full_key),
            caption if caption is not None else preprocess.BadInput("missing_caption", full_key))

  with fileio.open_read(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
    key, files = None, {}
    for member in tar:
      if not member.isfile():
        continue
      member_key, ext = _split_key(member.name)
      if member_key != key:
        if key is not None:
          yield emit(key, files)
        key, files = member_key, {}
      files[ext] = tar.extractfile(member).read()
    if key is not None:
      yield emit(key, files)


def build(source_kind: str, location: str, data_dir: str, **kwargs) -> _ImageCaptionBuilder:
  """The converted dataset of `folder:` or `wds:` `location` in `data_dir`, converted if new."""
  cls = {"folder": ImageTextFolder, "wds": WebDatasetShards}[source_kind]
  if "://" not in location:  # one dataset per folder or pattern, wherever it is named from
    location = os.path.abspath(location)
  builder = cls(location=location, data_dir=data_dir, file_format="array_record", **kwargs)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
