"""The shapes judge: does an image show what its shapes prompt says, judged from pixels alone?

For each image: blur, threshold relative to the image's peak brightness (samples are speckled;
raw thresholds fail), and keep connected components large enough to be an object. Each object
gets the nearest of the six palette colors (median of its brightest pixels), the shape whose
template, placed with the object's area and centroid, overlaps its soft coverage best, and the
3x3 cell of the fitted shape's bounding-box centre (the dataset's definition of a centre).
Two-object prompts are judged on the relation (first left of / above second) instead of cells.

Two measures of picture quality go beside the verdicts (the dataset's renders are flat shapes
on an exactly black background):
- `background`: mean brightness (max over RGB, 0-255) of the pixels farther than 1/32 of the
  image from every object; `background_p99` its 99th percentile per image. Speckle shows here.
- `edge_iou`: per object, the IoU of its soft coverage with the best-fitting ideal template
  (placed by area and centroid); ragged or blurred edges lower it. Compare with the same figure
  on the dataset's own renders (the demo's report does).

    imagen-jax eval --metric=shapes --samples=OUT     # reads OUT/samples.jsonl and the PNGs
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.sample import outdir as outdir_lib

ATTRIBUTES = ("objects", "color", "shape", "position", "all_correct")
MEASURES = ("background", "background_p99", "edge_iou")
_PALETTE_NAMES = tuple(grammar.COLORS)
_PALETTE = np.array([grammar.COLORS[c] for c in _PALETTE_NAMES], np.float32)
# An object covers at least a triangle of side 0.28 (about 0.039 of the image); components
# smaller than this fraction of the image are noise.
MIN_OBJECT_AREA = 0.012


@dataclasses.dataclass(frozen=True)
class Found:
  """An object detected in an image: color, shape, bounding-box centre (fractions) and area."""
  color: str
  shape: str
  cx: float
  cy: float
  area: float
  fit_iou: float  # soft coverage vs the fitted template of `shape`: edge fidelity

  @property
  def cell(self) -> tuple[int, int]:
    return grammar.grid_cell(self.cx, self.cy)


def find_objects(image: np.ndarray) -> list[Found]:
  """Objects in uint8 [S, S, 3], largest first."""
  return _analyze(image)[0]


def cleanliness(image: np.ndarray, background: np.ndarray | None = None) -> dict[str, float]:
  """{background, background_p99}: brightness (0-255) of the pixels away from every object
  (`background`: their bool [S, S] mask, found here when not given)."""
  if background is None:
    background = _analyze(image)[1]
  value = image.max(axis=-1)[background]
  if not value.size:
    return {"background": 0.0, "background_p99": 0.0}
  return {"background": float(value.mean()), "background_p99": float(np.percentile(value, 99))}


def _analyze(image: np.ndarray) -> tuple[list[Found], np.ndarray]:
  """(objects largest first, bool [S, S] background mask) of uint8 [S, S, 3]."""
  size = image.shape[0]
  pixels = image.astype(np.float32)
  value = pixels.max(axis=-1)
  brightness = ndimage.gaussian_filter(value, sigma=max(size / 64.0, 0.5))
  peak = np.percentile(brightness, 99.5)
  if peak < 40.0:  # nothing brighter than dark noise
    return [], np.ones((size, size), bool)
  labels, count = ndimage.label(brightness > max(0.45 * peak, 30.0), structure=np.ones((3, 3)))
  found, objects = [], np.zeros((size, size), bool)
  for index in range(1, count + 1):
    component = labels == index
    area = component.sum() / size ** 2
    if area < MIN_OBJECT_AREA:
      continue
    objects |= component
    region = ndimage.binary_dilation(component, iterations=2)
    # Soft coverage of each pixel by the object, relative to the object's own interior level
    # (an image-wide level would shrink dark objects next to bright ones).
    level = np.percentile(value[component], 75)
    coverage = np.where(region, np.clip(value / max(level, 1.0), 0.0, 1.0), 0.0)
    core = component & (value > 0.6 * level)
    rgb = np.median(pixels[core if core.any() else component], axis=0)
    color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]
    shape, (cx, cy), iou = _best_shape(coverage)
    found.append(Found(color, shape, cx / size, cy / size, float(area), iou))
  margin = max(1, size // 32)  # edge halo from resampling is not background speckle
  background = ~ndimage.binary_dilation(objects, iterations=margin) if objects.any() else (
      np.ones((size, size), bool))
  return sorted(found, key=lambda f: -f.area), background


def _best_shape(coverage: np.ndarray) -> tuple[str, tuple[float, float], float]:
  """The shape whose template, with the object's area and centroid, overlaps `coverage` best.

  coverage: float [S, S] in [0, 1]. Returns the shape, its bounding-box centre in pixels and the
  soft IoU of the fit.
  Matching area and centroid (not the bounding box) makes the fit robust to the halo pixels
  that resampling and noise add around edges.
  """
  area = coverage.sum()
  ys, xs = np.indices(coverage.shape) + 0.5
  my, mx = (coverage * ys).sum() / area, (coverage * xs).sum() / area
  fits = {}
  for shape in grammar.SHAPES:
    side = {"square": np.sqrt(area), "circle": np.sqrt(4 * area / np.pi),
            "triangle": np.sqrt(2 * area)}[shape]
    cy = my - side / 6 if shape == "triangle" else my  # a triangle's centroid is 2/3 down
    template = _template(shape, coverage.shape[0], mx, cy, side)
    iou = np.minimum(coverage, template).sum() / np.maximum(coverage, template).sum()
    fits[shape] = (float(iou), (float(mx), float(cy)))
  best = max(fits, key=lambda k: fits[k][0])
  return best, fits[best][1], fits[best][0]


def _template(shape: str, size: int, cx: float, cy: float, side: float, sub: int = 4
              ) -> np.ndarray:
  """float [size, size]: the fraction of each pixel inside the shape (sub x sub samples)."""
  coords = (np.arange(size * sub) + 0.5) / sub
  x, y = coords[None, :] - cx, coords[:, None] - cy
  half = side / 2
  if shape == "square":
    inside = (np.abs(x) <= half) & (np.abs(y) <= half)
  elif shape == "circle":
    inside = x * x + y * y <= half * half
  else:  # triangle: apex at the top centre, base along the bottom edge
    depth = y + half
    inside = (depth >= 0) & (y <= half) & (np.abs(x) <= depth / 2)
  return inside.reshape(size, sub, size, sub).mean(axis=(1, 3))


def judge(image: np.ndarray, caption: str) -> dict[str, Any]:
  """{objects, color, shape, position, all_correct} (bools) for one image and its caption, and
  the picture measures {background, background_p99} (0-255), `edge_ious` (one per object).

  `objects`: exactly as many objects as the prompt names. The other attributes are judged on the
  largest objects even when the count is wrong; `all_correct` needs everything right.
  `position` is the cell (one object) or the relation (two objects).
  """
  prompt = grammar.parse(caption)
  found, background = _analyze(image)
  measures = {**cleanliness(image, background), "edge_ious": [f.fit_iou for f in found]}
  wanted = prompt.objects
  verdict = {"objects": len(found) == len(wanted)}
  if len(found) < len(wanted):
    verdict.update(color=False, shape=False, position=False)
  elif len(wanted) == 1:
    obj = found[0]
    verdict.update(color=obj.color == wanted[0].color, shape=obj.shape == wanted[0].shape,
                   position=obj.cell == prompt.cell)
  else:
    # Match the detections to the named objects in the order that agrees best.
    best = max(itertools.permutations(found[:2]),
               key=lambda pair: sum((f.color == w.color) + (f.shape == w.shape)
                                    for f, w in zip(pair, wanted)))
    first, second = best
    verdict.update(color=all(f.color == w.color for f, w in zip(best, wanted)),
                   shape=all(f.shape == w.shape for f, w in zip(best, wanted)),
                   position=_relation_holds(first, second, prompt.relation))
  verdict["all_correct"] = all(verdict[a] for a in ATTRIBUTES[:-1])
  return {**verdict, **measures}


def _relation_holds(first: Found, second: Found, relation: str) -> bool:
  dx, dy = second.cx - first.cx, second.cy - first.cy
  if relation == grammar.LEFT_OF:
    return dx > 0 and abs(dx) > abs(dy)
  return dy > 0 and abs(dy) > abs(dx)


def score(verdicts: Iterable[dict[str, Any]]) -> dict[str, float]:
  """Accuracy per attribute and the all-correct rate over verdicts; `n` the count; the picture
  measures: mean `background` and `background_p99` over images, median `edge_iou` over objects."""
  verdicts = list(verdicts)
  out: dict[str, Any] = {"n": len(verdicts)}
  for attribute in ATTRIBUTES:
    out[attribute] = float(np.mean([v[attribute] for v in verdicts])) if verdicts else 0.0
  for measure in MEASURES[:2]:
    out[measure] = float(np.mean([v[measure] for v in verdicts])) if verdicts else 0.0
  ious = [iou for v in verdicts for iou in v["edge_ious"]]
  out["edge_iou"] = float(np.median(ious)) if ious else 0.0
  return out


def score_by_split(records: Sequence[dict[str, Any]], images: Sequence[np.ndarray],
                   by_kind: bool = False) -> dict[str, dict[str, float]]:
  """{split: score} for samples.jsonl records (`prompt`, optional `split`) and their images
  (`by_kind`: also "<split> singles" and "<split> pairs", one- and two-object prompts apart)."""
  return score_verdicts_by_split(records, judge_records(records, images), by_kind)


def judge_records(records: Sequence[dict[str, Any]], images: Sequence[np.ndarray]
                  ) -> list[dict[str, Any]]:
  """The verdict on each image for its record's prompt, in order."""
  return [judge(image, record["prompt"]) for record, image in zip(records, images, strict=True)]


def score_verdicts_by_split(records: Sequence[dict[str, Any]],
                            verdicts: Sequence[dict[str, Any]],
                            by_kind: bool = False) -> dict[str, dict[str, float]]:
  """score_by_split of verdicts already judged (one per record, in order)."""
  by_split: dict[str, list[dict[str, Any]]] = {}
  kinds: dict[str, list[dict[str, Any]]] = {}
  for record, verdict in zip(records, verdicts, strict=True):
    split = record.get("split", "all")
    by_split.setdefault(split, []).append(verdict)
    kind = "pairs" if len(grammar.parse(record["prompt"]).objects) > 1 else "singles"
    kinds.setdefault(f"{split} {kind}", []).append(verdict)
  out = {split: score(v) for split, v in sorted(by_split.items())}
  if by_kind:
    out.update({name: score(v) for name, v in sorted(kinds.items())})
  return out


def score_outdir(samples_dir: str) -> dict[str, dict[str, float]]:
  """The scores per split of an `imagen-jax sample` outdir (see score_by_split)."""
  return score_by_split(*outdir_lib.read_samples(samples_dir))
