"""Data: the shapes set, judged from its pixels (colors, shapes, cells), its splits and seeds."""

import glob

import numpy as np
import pytest
from scipy import ndimage

from helpers import SHAPES_SIZES, data_config  # pylint: disable=g-bad-import-order
from imagen_jax.data import preprocess
from imagen_jax.data import shapes
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.data import sources


def objects_in_pixels(image):
  """[(color, shape, (cy, cx))] read from the pixels alone: exact colors, connected components,
  the fill ratio of the bounding box (square 1, circle pi/4, triangle 1/2) and the balance of
  the lower and upper halves (an up-pointing triangle holds 3/4 of its area below the middle)."""
  names = {rgb: name for name, rgb in grammar.COLORS.items()}
  colors = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
  colors.discard((0, 0, 0))
  assert colors <= set(names), f"colors outside the palette: {colors - set(names)}"
  size = image.shape[0]
  found = []
  for rgb in colors:
    labels, count = ndimage.label(np.all(image == rgb, axis=-1))
    for i in range(1, count + 1):
      ys, xs = np.nonzero(labels == i)
      height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      fill = len(ys) / (height * width)
      middle = (ys.min() + ys.max()) / 2
      balance = np.sum(ys > middle) / max(np.sum(ys < middle), 1)
      if fill > 0.92:
        shape = "square"
      elif fill < 0.65 and balance > 2:
        shape = "triangle"
      elif 0.68 < fill < 0.88 and 0.8 < balance < 1.25:
        shape = "circle"
      else:
        shape = f"unknown(fill={fill:.2f}, balance={balance:.2f})"
      centre = ((ys.min() + ys.max() + 1) / 2 / size, (xs.min() + xs.max() + 1) / 2 / size)
      found.append((names[rgb], shape, centre))
  return found


def check_pixels_match_caption(image, caption):
  prompt = grammar.parse(caption)
  found = objects_in_pixels(image)
  assert sorted((c, s) for c, s, _ in found) == sorted(prompt.pairs), (caption, found)
  cell = lambda centre: (int(centre[0] * 3), int(centre[1] * 3))
  if prompt.relation is None:
    assert cell(found[0][2]) == prompt.cell, (caption, found)
    return
  by_pair = {(c, s): centre for c, s, centre in found}
  first = cell(by_pair[prompt.pairs[0]])
  second = cell(by_pair[prompt.pairs[1]])
  if prompt.relation == grammar.LEFT_OF:
    assert first[0] == second[0] and first[1] < second[1], (caption, found)
  else:
    assert first[1] == second[1] and first[0] < second[0], (caption, found)


def test_shapes_captions_follow_the_grammar_and_the_split_rules():
  pairs = {"train": 0, "validation": 0, "heldout": 0}
  sizes = {"train": 3000, "validation": 1000, "heldout": 1000}
  for split, n in sizes.items():
    for index in range(n):
      ex = shapes.example(split, index)
      prompt = grammar.parse(ex.caption)
      assert prompt == ex.prompt
      if split == "heldout":
        assert prompt.is_heldout, ex.caption
      else:
        assert not prompt.is_heldout, ex.caption
      if prompt.relation is not None:
        assert prompt.objects[0] != prompt.objects[1], ex.caption
      pairs[split] += prompt.relation is not None
  # Training sees pairs twice as often as the evaluation splits, which keep the grammar's mix.
  fractions = {split: pairs[split] / sizes[split] for split in sizes}
  assert abs(fractions["train"] - 2 / 3) < 0.03, fractions
  assert abs(fractions["validation"] - 1 / 3) < 0.04, fractions
  assert abs(fractions["heldout"] - 1 / 3) < 0.04, fractions


@pytest.mark.slow
def test_heldout_pairs_never_occur_in_the_full_train_and_validation_splits():
  for split in ("train", "validation"):
    for index in range(shapes.SPLITS[split]):
      assert not shapes.example(split, index).prompt.is_heldout, (split, index)


def test_shapes_records_show_the_named_color_shape_and_cell(shapes_data_dir):
  for split, n in SHAPES_SIZES.items():
    source, info = sources.get_data_source(data_config("shapes", shapes_data_dir), split)
    assert info.num_examples == n
    for index in range(n):
      record = source[index]
      image, kind = preprocess.decode_image(record["image"])
      assert kind is None and image.shape == (64, 64, 3)
      caption = record["caption"].decode()
      check_pixels_match_caption(image, caption)
      assert (split == "heldout") == grammar.parse(caption).is_heldout
      assert record["id"] == index  # shuffling disabled: position == generator index


def test_shapes_256_renders_the_same_layout(tmp_path):
  shapes.build(str(tmp_path), 256, num_examples={"train": 20, "validation": 4, "heldout": 4})
  source, _ = sources.get_data_source(data_config("shapes:256", str(tmp_path)), "train")
  for index in range(20):
    image, _ = preprocess.decode_image(source[index]["image"])
    assert image.shape == (256, 256, 3)
    check_pixels_match_caption(image, source[index]["caption"].decode())


def test_the_pixel_check_can_fail():
  ex = shapes.example("validation", 3)
  image = shapes.render(ex.placed, 64)
  wrong_color = grammar.parse(ex.caption).objects[0].color
  other = next(c for c in grammar.COLORS if c not in [o.color for o in ex.prompt.objects])
  recolored = image.copy()
  recolored[np.all(image == grammar.COLORS[wrong_color], axis=-1)] = grammar.COLORS[other]
  with pytest.raises(AssertionError):
    check_pixels_match_caption(recolored, ex.caption)
  moved = np.roll(image, 32, axis=1)
  with pytest.raises(AssertionError):
    check_pixels_match_caption(np.roll(moved, 32, axis=0), ex.caption)
  with pytest.raises(AssertionError):
    check_pixels_match_caption(image, "a red triangle at the center")


def test_same_seed_gives_byte_identical_data(tmp_path):
  sizes = {"train": 40, "validation": 8, "heldout": 8}
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    shapes.build(str(tmp_path / name), 64, num_examples=sizes, seed=seed)

  def read(name):  # the record files, byte for byte
    pattern = str(tmp_path / name / f"imagen_shapes/64/{shapes.ImagenShapes.VERSION}/*.array_record*")
    return [open(f, "rb").read() for f in sorted(glob.glob(pattern))]

  assert len(read("a")) >= 3
  assert read("a") == read("b")
  assert read("a") != read("c")
  assert shapes.example("train", 7, seed=3) == shapes.example("train", 7, seed=3)
