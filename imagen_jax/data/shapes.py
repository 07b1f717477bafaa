"""The built-in `shapes` dataset: captioned synthetic images whose prompt adherence is exact.

Flat colored circles, squares and up-pointing triangles on black, captioned in the grammar of
`shapes_grammar` ("a red circle at the top left corner", "a white square above a green
circle"). Every example is a pure function of (split, index, seed), so evaluation can regenerate
it, and the TFDS builder `imagen_shapes` (configs `64`, the default, and `256`) writes the
splits `train` (100k), `validation` (5k) and `heldout` (5k) as PNG bytes in array_record files:

    examples = [example("train", i, seed=0) for i in range(4)]
    pixels = render(examples[0].placed, size=64)          # uint8 [64, 64, 3]
    builder = build(data_dir, size=64)                   # once; later calls reuse it

Geometry is in fractions of the image side, so one example renders at any size. An object's
centre is the centre of its bounding box; it lies in the named 3x3 cell, at least
`CELL_MARGIN` from the cell's edges (so a pixel judge is never on a boundary), and the whole
object lies inside the image. The two objects of a pair caption never touch.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import struct
import sys
from typing import Sequence
import zlib

import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.data import builders
from imagen_jax.data import shapes_grammar as grammar

SPLITS = {"train": 100_000, "validation": 5_000, "heldout": 5_000}
SIZES = (64, 256)
# Split codes mixed into the random seed, so the splits are independent streams.
_SPLIT_CODES = {"train": 0, "validation": 1, "heldout": 2}
# Fraction of two-object captions per split. The evaluation splits keep the grammar's mix (a
# third); training sees pairs twice as often, because they are the hard prompts (two objects
# bound to their own words and to each other's place) and each carries two color-shape examples.
PAIR_FRACTION = {"train": 2 / 3, "validation": 1 / 3, "heldout": 1 / 3}
CELL_MARGIN = 0.06     # min distance (fraction of the side) of a centre from its cell's edges
PAIR_GAP = 0.04        # min empty space between the two objects of a pair caption

SEEN_OBJECTS = tuple(o for o in grammar.all_objects()
                     if (o.color, o.shape) not in grammar.HELDOUT_PAIRS)
HELDOUT_OBJECTS = tuple(o for o in grammar.all_objects()
                        if (o.color, o.shape) in grammar.HELDOUT_PAIRS)
ALL_OBJECTS = tuple(grammar.all_objects())
_COLUMN_PAIRS = ((0, 1), (0, 2), (1, 2))   # (first, second) cells along a row or column


@dataclasses.dataclass(frozen=True)
class Placed:
  """An object with its geometry: bounding-box centre (cx, cy) and side, fractions of the image."""
  obj: grammar.Obj
  cx: float
  cy: float
  size: float

  @property
  def cell(self) -> tuple[int, int]:
    """(row, col) of the centre in the 3x3 grid."""
    return grammar.grid_cell(self.cx, self.cy)


@dataclasses.dataclass(frozen=True)
class Example:
  """One dataset example: the parsed prompt, its caption, and the placed objects."""
  prompt: grammar.Prompt
  placed: tuple[Placed, ...]

  @property
  def caption(self) -> str:
    return grammar.caption(self.prompt)


def _axis_range(cell_index: int, size: float) -> tuple[float, float]:
  """Centre coordinates allowed along one axis: inside the cell's margin, object inside image."""
  low = max(cell_index / 3 + CELL_MARGIN, size / 2)
  high = min((cell_index + 1) / 3 - CELL_MARGIN, 1 - size / 2)
  return low, high


def _place_single(rng: np.random.Generator, obj: grammar.Obj, cell: tuple[int, int]) -> Placed:
  size = rng.uniform(*grammar.SIZE_RANGE)
  cy = rng.uniform(*_axis_range(cell[0], size))
  cx = rng.uniform(*_axis_range(cell[1], size))
  return Placed(obj, float(cx), float(cy), float(size))


def _place_pair(rng: np.random.Generator, first: grammar.Obj, second: grammar.Obj, relation: str
                ) -> tuple[Placed, Placed]:
  """Two objects in one row (LEFT_OF) or one column (ABOVE), `PAIR_GAP` apart or more."""
  line = int(rng.integers(3))  # the shared row (LEFT_OF) or column (ABOVE)
  a, b = _COLUMN_PAIRS[int(rng.integers(len(_COLUMN_PAIRS)))]
  size_a, size_b = rng.uniform(*grammar.SIZE_RANGE, size=2)
  range_a, range_b = _axis_range(a, size_a), _axis_range(b, size_b)
  needed = (size_a + size_b) / 2 + PAIR_GAP
  # Rejection sampling along the relation's axis; the fallback (the two ends of the ranges) is
  # always far enough apart for adjacent cells (>= 0.42 vs <= 0.40 needed).
  for _ in range(64):
    pos_a, pos_b = rng.uniform(*range_a), rng.uniform(*range_b)
    if pos_b - pos_a >= needed:
      break
  else:
    pos_a, pos_b = range_a[0], range_b[1]
  across_a = rng.uniform(*_axis_range(line, size_a))
  across_b = rng.uniform(*_axis_range(line, size_b))
  if relation == grammar.LEFT_OF:
    return (Placed(first, float(pos_a), float(across_a), float(size_a)),
            Placed(second, float(pos_b), float(across_b), float(size_b)))
  return (Placed(first, float(across_a), float(pos_a), float(size_a)),
          Placed(second, float(across_b), float(pos_b), float(size_b)))


def example(split: str, index: int, seed: int = 0) -> Example:
  """The example at `index` of `split`: a pure function of (split, index, seed).

  Single objects at a cell, or two objects in a row or column that differ in color or shape
  (`PAIR_FRACTION[split]` of them: two thirds in `train`, one third in `validation` and
  `heldout`). `train` and `validation` never use `HELDOUT_PAIRS`; every `heldout` caption has
  at least one of them.
  """
  if split not in _SPLIT_CODES:
    raise ValueError(f"unknown shapes split {split!r}: use one of {sorted(_SPLIT_CODES)}")
  rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])
  heldout = split == "heldout"
  if rng.random() >= PAIR_FRACTION[split]:
    pool = HELDOUT_OBJECTS if heldout else SEEN_OBJECTS
    obj = pool[int(rng.integers(len(pool)))]
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    return Example(grammar.Prompt((obj,), cell=cell), (_place_single(rng, obj, cell),))
  if heldout:
    new = HELDOUT_OBJECTS[int(rng.integers(len(HELDOUT_OBJECTS)))]
    others = [o for o in ALL_OBJECTS if o != new]
    other = others[int(rng.integers(len(others)))]
    first, second = (new, other) if rng.random() < 0.5 else (other, new)
  else:
    i, j = rng.choice(len(SEEN_OBJECTS), size=2, replace=False)
    first, second = SEEN_OBJECTS[int(i)], SEEN_OBJECTS[int(j)]
  relation = grammar.RELATIONS[int(rng.integers(len(grammar.RELATIONS)))]
  prompt = grammar.Prompt((first, second), relation=relation)
  return Example(prompt, _place_pair(rng, first, second, relation))


def _window_mask(placed: Placed, size: int) -> tuple[slice, slice, np.ndarray]:
  """(rows, cols, bool mask) over the object's bounding box: pixels whose centres are inside."""
  half = placed.size / 2
  row0 = max(int(np.floor((placed.cy - half) * size)) - 1, 0)
  row1 = min(int(np.ceil((placed.cy + half) * size)) + 1, size)
  col0 = max(int(np.floor((placed.cx - half) * size)) - 1, 0)
  col1 = min(int(np.ceil((placed.cx + half) * size)) + 1, size)
  y = ((np.arange(row0, row1, dtype=np.float64) + 0.5) / size)[:, None]
  x = ((np.arange(col0, col1, dtype=np.float64) + 0.5) / size)[None, :]
  dx, dy = x - placed.cx, y - placed.cy
  if placed.obj.shape == "circle":
    mask = dx * dx + dy * dy <= half * half
  elif placed.obj.shape == "square":
    mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
  elif placed.obj.shape == "triangle":  # apex at the top centre, base along the bottom edge
    depth = y - (placed.cy - half)      # distance below the apex
    mask = (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
  else:
    raise ValueError(f"unknown shape {placed.obj.shape!r}")
  return slice(row0, row1), slice(col0, col1), mask


def object_mask(placed: Placed, size: int) -> np.ndarray:
  """bool [size, size]: the pixels (by their centres) inside the object. No anti-aliasing."""
  full = np.zeros((size, size), bool)
  rows, cols, mask = _window_mask(placed, size)
  full[rows, cols] = mask
  return full


def render(placed: Sequence[Placed], size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the objects in their flat colors on black."""
  image = np.zeros((size, size, 3), np.uint8)
  for p in placed:
    rows, cols, mask = _window_mask(p, size)
    np.copyto(image[rows, cols], np.asarray(grammar.COLORS[p.obj.color], np.uint8),
              where=mask[..., None])
  return image


def write_subject_folder(folder: str, obj: grammar.Obj, word: str,
                         cells: Sequence[tuple[int, int]], size: int = 64, seed: int = 0
                         ) -> list[dict[str, str]]:
  """A fine-tuning subject: one image of `obj` per cell (placed as the dataset places single
  objects), captioned with a new `word` in its place ("a blicket at the top left corner"),
  as a `folder:` source (PNGs and captions.jsonl). Returns the caption rows."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  for i, cell in enumerate(cells):
    name = f"{i:03d}.png"
    with open(os.path.join(folder, name), "wb") as f:
      f.write(encode_png(render([_place_single(rng, obj, cell)], size)))
    rows.append({"file": name, "caption": f"a {word} at the {grammar.POSITIONS[cell]}"})
  with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(row) + "\n" for row in rows))
  return rows


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + tag + data
          + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no row filters, zlib level 1).

  Written here rather than by PIL, whose adaptive row filtering is slower for no smaller files
  on flat colors: the encoder is most of the dataset's build time.
  """
  height, width, _ = image.shape
  rows = np.zeros((height, width * 3 + 1), np.uint8)  # each row: filter type 0, then pixels
  rows[:, 1:] = image.reshape(height, width * 3)
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _png_chunk(b"IEND", b""))


def _encoded_examples(args: tuple[str, int, int, int, int]) -> list[tuple[int, bytes, str]]:
  """(index, PNG bytes, caption) for indices [start, stop) of a split; a worker's chunk."""
  split, start, stop, seed, size = args
  out = []
  for index in range(start, stop):
    ex = example(split, index, seed)
    out.append((index, encode_png(render(ex.placed, size)), ex.caption))
  return out


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  size: int = 64


class ImagenShapes(builders.LocalBuilder):
  """TFDS builder of the shapes dataset (configs `64` and `256`), deterministic from a seed.

  Records: `image` (PNG, uint8 [size, size, 3]), `caption` (text), `id` (the generator index:
  `example(split, id, seed)` regenerates it; with shuffling disabled it is also the record's
  position in the split).

  Args (beyond TFDS's): `num_examples` overrides split sizes (tests build small splits),
  `seed` the generator seed, `num_workers` render processes (0: one per CPU, at most 4).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "A third of the train split's captions name two objects.",
      "1.1.0": "Two thirds of the train split's captions name two objects (evaluation splits "
               "unchanged).",
  }
  BUILDER_CONFIGS = [ShapesConfig(name=str(s), size=s, description=f"{s}x{s} images")
                     for s in SIZES]
  DEFAULT_CONFIG_NAME = "64"

  def __init__(self, *, num_examples: dict[str, int] | None = None, seed: int = 0,
               num_workers: int = 0, **kwargs):
    self._num_examples = {**SPLITS, **(num_examples or {})}
    unknown = set(self._num_examples) - set(SPLITS)
    if unknown:
      raise ValueError(f"num_examples names unknown shapes splits {sorted(unknown)}")
    self._seed = int(seed)
    self._num_workers = num_workers or min(4, os.cpu_count() or 1)
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside its data sources) as its __init__ arguments.
    self._original_state.update(num_examples=num_examples, seed=seed, num_workers=num_workers)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "id": tfds.features.Scalar(np.int64),
        }),
        metadata=tfds.core.MetadataDict(seed=self._seed, num_examples=self._num_examples),
        # Generation order is kept (records sorted by id), so a record's position is its id.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self._num_examples.items()}

  def _generate_examples(self, split: str, num: int):
    size = self.builder_config.size
    chunk = 1000
    jobs = [(split, start, min(start + chunk, num), self._seed, size)
            for start in range(0, num, chunk)]
    if self._num_workers > 1 and len(jobs) > 1 and sys.platform.startswith("linux"):
      # fork, not spawn: spawn re-imports the caller's __main__ (a script without a main guard
      # would recurse) and the workers' imports cost more than the work for small splits. The
      # children only run numpy, PIL and zlib, never JAX, so JAX's threads in a training
      # process are no hazard to them.
      with multiprocessing.get_context("fork").Pool(self._num_workers) as pool:
        for results in pool.imap(_encoded_examples, jobs):
          yield from self._records(results)
    else:
      for job in jobs:
        yield from self._records(_encoded_examples(job))

  @staticmethod
  def _records(results):
    for index, png, caption in results:
      yield index, {"image": png, "caption": caption, "id": index}


def build(data_dir: str, size: int = 64, *, num_examples: dict[str, int] | None = None,
          seed: int = 0, num_workers: int = 0) -> ImagenShapes:
  """The shapes builder for `size` in `data_dir`, generated there first if it is not yet.

  An already prepared dataset is reused as it is (whatever `num_examples` built it).
  """
  if size not in SIZES:
    raise ValueError(f"shapes images are {SIZES} pixels, not {size}")
  builder = ImagenShapes(config=str(size), data_dir=data_dir, file_format="array_record",
                         num_examples=num_examples, seed=seed, num_workers=num_workers)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
