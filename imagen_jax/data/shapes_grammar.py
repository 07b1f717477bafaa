"""The grammar of the built-in `shapes` dataset: its words, colors, captions and their parser.

Shared by the dataset (rendering and captions), the demo's tiny T5 vocabulary, and the judge
that scores samples, so all three agree on one spec:

- single object:               "a red circle at the top left corner"
- two objects in one row:      "a red circle to the left of a blue triangle"
- two objects in one column:   "a white square above a green circle"
(how often each kind occurs in each split: `shapes.PAIR_FRACTION`)
"""

from __future__ import annotations

import dataclasses
import itertools
import re

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")  # triangles point up

# 3x3 grid cells, row-major: (row, col) -> phrase.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left corner", (0, 1): "top", (0, 2): "top right corner",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left corner", (2, 1): "bottom", (2, 2): "bottom right corner",
}
CELL_OF_PHRASE = {phrase: cell for cell, phrase in POSITIONS.items()}


def grid_cell(cx: float, cy: float) -> tuple[int, int]:
  """(row, col) of the 3x3 grid cell holding a point given as fractions of the image."""
  return min(int(cy * 3), 2), min(int(cx * 3), 2)


# Relations between two objects: first object relative to the second.
LEFT_OF = "to the left of"   # same row, first column < second column
ABOVE = "above"              # same column, first row < second row
RELATIONS = (LEFT_OF, ABOVE)

# (color, shape) pairs kept out of train/validation; every heldout caption has one of them.
HELDOUT_PAIRS = frozenset({("yellow", "triangle"), ("purple", "circle"), ("green", "square")})

SIZE_RANGE = (0.28, 0.36)  # object size as a fraction of the image side


@dataclasses.dataclass(frozen=True)
class Obj:
  color: str
  shape: str


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A parsed caption: one object with a cell, or two objects with a relation."""
  objects: tuple[Obj, ...]
  cell: tuple[int, int] | None = None   # single object: its grid cell
  relation: str | None = None           # two objects: LEFT_OF or ABOVE

  @property
  def pairs(self) -> tuple[tuple[str, str], ...]:
    return tuple((o.color, o.shape) for o in self.objects)

  @property
  def is_heldout(self) -> bool:
    return any(p in HELDOUT_PAIRS for p in self.pairs)


def single_caption(obj: Obj, cell: tuple[int, int]) -> str:
  return f"a {obj.color} {obj.shape} at the {POSITIONS[cell]}"


def pair_caption(first: Obj, relation: str, second: Obj) -> str:
  return f"a {first.color} {first.shape} {relation} a {second.color} {second.shape}"


def caption(prompt: Prompt) -> str:
  if prompt.relation is None:
    return single_caption(prompt.objects[0], prompt.cell)
  return pair_caption(prompt.objects[0], prompt.relation, prompt.objects[1])


_OBJ = r"a (?P<c{i}>{colors}) (?P<s{i}>{shapes})"
_COLORS_RE = "|".join(COLORS)
_SHAPES_RE = "|".join(SHAPES)
_SINGLE_RE = re.compile("^" + _OBJ.format(i=1, colors=_COLORS_RE, shapes=_SHAPES_RE)
                        + " at the (?P<pos>" + "|".join(CELL_OF_PHRASE) + ")$")
_PAIR_RE = re.compile("^" + _OBJ.format(i=1, colors=_COLORS_RE, shapes=_SHAPES_RE)
                      + " (?P<rel>" + "|".join(RELATIONS) + ") "
                      + _OBJ.format(i=2, colors=_COLORS_RE, shapes=_SHAPES_RE) + "$")


def parse(text: str) -> Prompt:
  """Parses a shapes caption; raises ValueError naming the caption if it is not in the grammar."""
  normalized = " ".join(text.strip().lower().split())
  m = _SINGLE_RE.match(normalized)
  if m:
    return Prompt((Obj(m["c1"], m["s1"]),), cell=CELL_OF_PHRASE[m["pos"]])
  m = _PAIR_RE.match(normalized)
  if m:
    return Prompt((Obj(m["c1"], m["s1"]), Obj(m["c2"], m["s2"])), relation=m["rel"])
  raise ValueError(f"not a shapes caption: {text!r}")


def all_objects() -> list[Obj]:
  return [Obj(c, s) for c, s in itertools.product(COLORS, SHAPES)]


def vocabulary_corpus() -> list[str]:
  """Every single-object caption and every pair caption: the text a shapes vocabulary is built on."""
  objs = all_objects()
  lines = [single_caption(o, cell) for o in objs for cell in POSITIONS]
  lines += [pair_caption(a, rel, b) for a in objs for b in objs if a != b for rel in RELATIONS]
  return lines
