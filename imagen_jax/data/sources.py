"""`config.data.source` -> a random-access TFDS data source, built in `data_dir` on first use.

    shapes, shapes:256       the built-in demo set (`shapes.py`), generated on first use
    tfds:NAME[:CONFIG]       a TFDS dataset already prepared in data_dir as array_record
    folder:PATH              images + captions, converted once (`builders.py`)
    wds:PATTERN              webdataset shards, converted once (`builders.py`)

    source, info = get_data_source(config.data, "train")
    record = source[i]      # {image_key: encoded bytes (or uint8 array), caption_key: ..., ...}
    captions = get_captions(config.data, "train"); captions[i]   # the caption of record i

Images come back undecoded (TFDS's `Image` features are read with SkipDecoding), so that the
pipeline decodes them itself, in its workers, counting what it cannot use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.core import fileio
from imagen_jax.data import builders
from imagen_jax.data import preprocess
from imagen_jax.data import shapes

FORMS = "shapes, shapes:256, tfds:NAME[:CONFIG], folder:PATH, wds:PATTERN"


class SourceError(ValueError):
  """A malformed or unusable `config.data.source`; the message names it."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str              # shapes | tfds | folder | wds
  location: str          # shapes: the size; tfds: NAME; folder: PATH; wds: PATTERN
  config: str | None = None  # tfds: CONFIG


def parse_source(source: str) -> SourceSpec:
  """Parses `config.data.source`; raises SourceError naming the string if it is malformed."""
  kind, sep, rest = source.partition(":")
  if kind == "shapes":
    size = rest if sep else "64"
    if not size.isdigit() or int(size) not in shapes.SIZES:
      raise SourceError(f"config.data.source={source!r}: shapes comes in sizes "
                        f"{shapes.SIZES} ('shapes' or 'shapes:256')")
    return SourceSpec("shapes", size)
  if kind == "tfds" and rest:
    name, _, config = rest.partition(":")
    if not name or ":" in config:
      raise SourceError(f"config.data.source={source!r}: expected tfds:NAME or tfds:NAME:CONFIG")
    return SourceSpec("tfds", name, config or None)
  if kind in ("folder", "wds") and rest:
    return SourceSpec(kind, rest)
  raise SourceError(f"config.data.source={source!r} is not one of: {FORMS}")


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What the pipeline and the embedding cache need to know about a source's split.

  `build_counts`: {"skipped": {kind: n}, "converted": {kind: n}} from the one-time conversion of
  a folder or webdataset (empty for other sources). `tfds_info`: the full TFDS DatasetInfo.
  """
  source: str
  split: str
  num_examples: int
  image_key: str
  caption_key: str
  build_counts: dict[str, dict[str, int]]
  tfds_info: Any = dataclasses.field(repr=False, compare=False)


@contextlib.contextmanager
def _build_lock(data_dir: str | None):
  """One process builds at a time (local data_dir; on gs:// build once ahead of the job)."""
  root = data_dir or tfds.core.constants.DATA_DIR
  if "://" in str(root):
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top  # platform: POSIX only
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".imagen_jax_build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def get_builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """The (prepared) TFDS builder behind `data_config.source`, converting or generating it once."""
  source = data_config.source
  spec = parse_source(source)
  data_dir = data_config.data_dir or None
  with _build_lock(data_dir):
    if spec.kind == "shapes":
      return shapes.build(data_dir, int(spec.location))
    if spec.kind in ("folder", "wds"):
      try:
        return builders.build(spec.kind, spec.location, data_dir)
      except FileNotFoundError as e:
        raise SourceError(f"config.data.source={source!r}: {e}") from e
  try:
    builder = tfds.builder(spec.location, config=spec.config, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises several kinds)
    raise SourceError(f"config.data.source={source!r}: TFDS cannot find it in data_dir "
                      f"{data_dir or tfds.core.constants.DATA_DIR!r}: {e}") from e
  if not builder.is_prepared():
    # Nothing downloads at run time: TFDS datasets are prepared ahead, as array_record.
    raise SourceError(
        f"config.data.source={source!r} is not prepared in {builder.data_dir!r}. Prepare it "
        f"with `tfds build {spec.location}{'/' + spec.config if spec.config else ''} "
        f"--data_dir=... --file_format=array_record` (this needs TensorFlow), then rerun.")
  return builder


def _feature(features: Any, key: str) -> Any:
  node = features
  for part in key.split("/"):
    if isinstance(node, tfds.features.Sequence):
      node = node.feature
    try:
      node = node[part]
    except (KeyError, TypeError) as e:
      raise KeyError(part) from e
  return node


def get_data_source(data_config: Any, split: str | None = None, need_image: bool = True
                    ) -> tuple[Any, SourceInfo]:
  """(random-access source, SourceInfo) for `split` (default: data_config.split).

  `need_image=False` (captions only) does not require the image feature.
  Builds the TFDS dataset in `data_config.data_dir` on first use (shapes generates itself,
  folder:/wds: convert once). Raises SourceError naming the source string when the source is
  malformed, missing, not random-access (not array_record), or lacks the split or feature keys.
  """
  source = data_config.source
  split = split or data_config.split
  builder = get_builder(data_config)
  info = builder.info
  if split not in info.splits:
    raise SourceError(f"config.data.source={source!r} has no split {split!r}; it has "
                      f"{sorted(info.splits)}")
  file_format = info.file_format.value if info.file_format else "tfrecord"
  if file_format != "array_record":
    raise SourceError(
        f"config.data.source={source!r} is stored as {file_format}, which has no random access. "
        f"Convert it: `tfds convert_format --dataset_dir={builder.data_dir} "
        f"--out_file_format=array_record`.")
  image_key, caption_key = _keys(data_config, spec=parse_source(source))
  decoders = None
  for key, name in ((image_key, "image_key"), (caption_key, "caption_key")):
    try:
      feature = _feature(info.features, key)
    except KeyError as e:
      if key == image_key and not need_image:
        continue
      raise SourceError(f"config.data.source={source!r} has no feature {key!r} "
                        f"(config.data.{name}); its features: {list(info.features)}") from e
    if key == image_key and isinstance(feature, tfds.features.Image):
      decoders = _nested(image_key, tfds.decode.SkipDecoding())
  data_source = builder.as_data_source(split, decoders=decoders)
  metadata = dict(info.metadata or {})
  build_counts = {k: dict(metadata[k]) for k in ("skipped", "converted") if k in metadata}
  return data_source, SourceInfo(source=source, split=split, num_examples=len(data_source),
                                 image_key=image_key, caption_key=caption_key,
                                 build_counts=build_counts, tfds_info=info)


def check_not_empty(data_source: Any, info: SourceInfo) -> None:
  """Raises SourceError naming the source if its split has no example (an empty folder, or
  one whose every image was unreadable: the conversion's skip counts say which)."""
  if len(data_source) == 0:
    skipped = info.build_counts.get("skipped")
    raise SourceError(f"config.data.source={info.source!r} split {info.split!r} has no example"
                      + (f": every input was skipped at conversion ({skipped})" if skipped
                         else ""))


def _keys(data_config: Any, spec: SourceSpec) -> tuple[str, str]:
  # Our own builders name their features `image` and `caption`, whatever the config says for
  # other TFDS datasets.
  if spec.kind != "tfds":
    return "image", "caption"
  return data_config.image_key, data_config.caption_key


def _nested(key: str, value: Any) -> dict[str, Any]:
  out: Any = value
  for part in reversed(key.split("/")):
    out = {part: out}
  return out


def lookup(record: Any, key: str) -> Any:
  """record["a"]["b"] for key "a/b" (TFDS returns nested dicts, sequences as arrays)."""
  node = record
  for part in key.split("/"):
    node = node[part]
  return node


def caption_candidates(value: Any) -> list[Any]:
  """The captions of a record's caption feature: one, or several (coco has five)."""
  if isinstance(value, np.ndarray) and value.dtype == object:
    return list(value.reshape(-1))
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return [value.item()]
  if isinstance(value, (list, tuple, np.ndarray)):
    return list(value)
  return [value]


def first_caption(record: Any, caption_key: str) -> tuple[str, str | None]:
  """(the first usable caption of a record, its conversion kind); raises BadInput if none."""
  candidates = caption_candidates(lookup(record, caption_key))
  error: preprocess.BadInput = preprocess.BadInput("missing_caption")
  for raw in candidates:
    try:
      return preprocess.decode_caption(raw)
    except preprocess.BadInput as e:
      error = e
  raise error


class CaptionSource(Sequence[str]):
  """Random access to the caption of each example: `captions[i]` (str), and its key.

  The one caption reader: training pairs the pipeline's examples with what the embedding cache
  holds at the same index, and the encode job fills that cache from this reader, so both see
  the same caption: the first usable one of the record ("" when it has none; the pipeline skips
  such records). A caption that is not text at all raises CaptionError naming the example. `key(i)` names example i in the cache ("<split>[<i>]", a key feature's value,
  or "<file>:<line>"); `description` records where the captions came from.
  """

  def __init__(self, records: Any, caption_key: str, key: Any, description: dict[str, Any]):
    self._records = records
    self._caption_key = caption_key
    self._key = key
    self.description = description

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):  # pytype: disable=signature-mismatch
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    try:
      return first_caption(self._records[int(index)], self._caption_key)[0]
    except preprocess.BadInput as e:
      if e.kind == "unsupported_caption":
        raise preprocess.CaptionError(f"caption of example {self.key(index)!r} is not text: "
                                      f"{e.detail}") from e
      return ""

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def key(self, index: int) -> str:
    return self._key(int(index))


def source_config(source: str, split: str = "train", data_dir: str = "",
                  image_key: str = "image", caption_key: str = "caption") -> Any:
  """A `config.data`-like config naming one source, for readers outside a stage config."""
  return ml_collections.ConfigDict({"source": source, "split": split, "data_dir": data_dir,
                                    "image_key": image_key, "caption_key": caption_key})


def get_captions(data_config: Any, split: str | None = None, key_feature: str = ""
                 ) -> CaptionSource:
  """The captions of `data_config.source`'s split, by index, for every source kind.

  Besides the image sources (shapes, tfds:, folder:, wds:), `text:PATH` reads one caption per
  line ("\\n"-separated, a trailing "\\r" dropped; local or gs://). `key_feature` (tfds:) names
  the feature whose value keys each example; default "<split>[<index>]".
  """
  split = split or data_config.split
  if data_config.source.startswith("text:"):
    return _text_captions(data_config.source[len("text:"):])
  records, info = get_data_source(data_config, split, need_image=False)
  description = {"kind": parse_source(info.source).kind, "source": info.source, "split": split,
                 "data_dir": data_config.data_dir, "caption_key": info.caption_key,
                 "key_feature": key_feature, "num_examples": info.num_examples}

  def key(index: int) -> str:
    if not key_feature:
      return f"{split}[{index}]"
    value = caption_candidates(lookup(records[index], key_feature))[0]
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)

  return CaptionSource(records, info.caption_key, key, description)


def _text_captions(path: str) -> CaptionSource:
  lines = fileio.read_text(path).split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the file's final newline ends the last line, it does not start a new one
  records = [{"caption": line[:-1] if line.endswith("\r") else line} for line in lines]
  name = os.path.basename(path.rstrip("/"))
  return CaptionSource(records, "caption", lambda i: f"{name}:{i + 1}",
                       {"kind": "text", "path": path, "num_lines": len(records)})
