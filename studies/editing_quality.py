"""Editing with a trained shapes cascade, judged from pixels: inpainting, image-to-image, upscaling.

    imagen-jax demo --workdir=demo_run          # the trained cascade (or any shapes cascade)
    python -m studies.editing_quality --workdir=demo_run [--num_images=100]

Inputs are the dataset's own renders (64x64, `data.shapes.example`, seed 0) of prompts the
stages never trained on (the validation split's generator), written to
WORKDIR/editing_quality/inputs/; every run is an ordinary `imagen-jax edit` outdir under
WORKDIR/editing_quality/, so an interrupted benchmark resumes.

- inpaint: two-object images; one object's bounding box (plus a 3-pixel margin, so the mask does
  not give the shape away) is masked and the full caption is the prompt. The judge finds the
  object whose centre lies in the masked box and checks its color, shape and cell against the
  erased object's; also the whole caption's all-correct and the largest change of any kept
  pixel (0 by construction). Rows: samplers, with and without RePaint's resampling jumps.
- img2img: one-object images of "a C1 S at CELL", prompted "a C2 S at CELL" (C2 another color
  whose pair with S the stages trained on): the rate at which the color changes to C2 while the
  shape and cell stay, per strength; also each part alone.
- upscale: the SR stage alone on the 32x32 down-sample (the SR stage's own low-res filter) of
  each render, against the 64x64 render: the judge's all-correct and PSNR, beside bicubic
  upscaling of the same 32x32 input and the renders themselves.
Prints a table and a JSON line per task.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", "demo_run", "A trained demo workdir (base/ and sr/).")
_NUM = flags.DEFINE_integer("num_images", 100, "Inputs per task.")
_STRENGTHS = flags.DEFINE_list("strengths", ["0.03", "0.1", "0.3", "0.5", "0.7", "0.9"],
                                "img2img strengths.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images sampled together.")
_TASKS = flags.DEFINE_list("tasks", ["inpaint", "img2img", "upscale"], "What to measure.")
# (name, base sampler, base steps, base spacing, resample, jump): inpainting's rows.
INPAINT_RUNS = (("ddim", "ddim", 50, "time", 1, 1), ("unipc", "unipc", 15, "logsnr", 1, 1),
                ("ddpm", "ddpm", 50, "time", 1, 1), ("ddpm_repaint", "ddpm", 50, "time", 5, 5))
MARGIN = 3  # pixels around the erased object's box, at 64x64
SIZE = 64


DEMO_BASE_SAMPLER = ("unipc", 15, "logsnr")  # configs/demo_base.py's sample settings


def base_settings(cascade: Any, sampler: str, steps: int, spacing: str) -> list[Any]:
  """The base stage's sampler as given, the SR stage's as configured."""
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  sr = cascade.default_settings()[1]
  return outdir_lib.stage_settings(cascade, sampler=[sampler, sr.sampler],
                                   steps=[str(steps), str(sr.steps)], spacing=[spacing, sr.spacing])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def object_box(placed: Any, margin: int = MARGIN) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) pixel bounds of a placed object's box, widened by `margin`."""
  half = placed.size / 2
  bounds = [(placed.cy - half) * SIZE, (placed.cy + half) * SIZE,
            (placed.cx - half) * SIZE, (placed.cx + half) * SIZE]
  top, bottom, left, right = (int(np.floor(bounds[0])) - margin, int(np.ceil(bounds[1])) + margin,
                              int(np.floor(bounds[2])) - margin, int(np.ceil(bounds[3])) + margin)
  return max(top, 0), min(bottom, SIZE), max(left, 0), min(right, SIZE)


def run_edit(cascade: Any, items: list[dict[str, Any]], outdir: str, edit: Any,
             settings: Sequence[Any]) -> tuple[list[np.ndarray], float]:
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  outdir_lib.sample_to_outdir(cascade, items, outdir, settings=settings, batch_size=_BATCH.value,
                              show_progress=False, edit=edit)
  seconds = time.perf_counter() - start
  return outdir_lib.read_samples(outdir)[1], seconds


def inpaint_rows(cascade: Any, root: str) -> list[dict[str, Any]]:
  from imagen_jax.core import images as images_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import edit_inputs  # pylint: disable=g-import-not-at-top
  examples = [e for e in (shapes.example("validation", i) for i in range(20 * _NUM.value))
              if len(e.placed) == 2][:_NUM.value]
  items, boxes, inputs, erased = [], [], [], []
  for i, example in enumerate(examples):
    target = example.placed[i % 2]  # alternately the first and the second object
    top, bottom, left, right = box = object_box(target)
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[top:bottom, left:right] = 255
    image = shapes.render(example.placed, SIZE)
    paths = [os.path.join(root, "inputs", f"inpaint_{i:04d}_{kind}.png") for kind in ("in", "mask")]
    for array, path in zip((image, mask), paths):
      if not os.path.exists(path):
        images_lib.write_png(array, path)
    items.append({"prompt": example.caption, "image": paths[0], "mask": paths[1]})
    boxes.append(box)
    inputs.append(image)
    erased.append(target)
  rows = []
  for name, sampler, steps, spacing, resample, jump in INPAINT_RUNS:
    settings = base_settings(cascade, sampler, steps, spacing)
    edit = edit_inputs.Edit("inpaint", resample=resample, jump=jump)
    outputs, seconds = run_edit(cascade, items, os.path.join(root, f"inpaint_{name}"), edit,
                                settings)
    verdicts, kept_change = [], 0
    for image, source, box, target, item in zip(outputs, inputs, boxes, erased, items):
      top, bottom, left, right = box
      keep = np.ones((SIZE, SIZE), bool)
      keep[top:bottom, left:right] = False
      kept_change = max(kept_change, int(np.abs(image.astype(int) - source)[keep].max()))
      inside = [f for f in judge.find_objects(image)
                if top <= f.cy * SIZE < bottom and left <= f.cx * SIZE < right]
      found = inside[0] if inside else None
      verdicts.append({
          "color": bool(found and found.color == target.obj.color),
          "shape": bool(found and found.shape == target.obj.shape),
          "cell": bool(found and found.cell == target.cell),
          "caption_all_correct": judge.judge(image, item["prompt"])["all_correct"]})
    mean = lambda key: round(float(np.mean([v[key] for v in verdicts])), 3)
    rows.append({"task": "inpaint", "run": name, "base_sampler": sampler, "base_steps": steps,
                 "resample": resample, "jump": jump,
                 "object_all_correct": round(float(np.mean(
                     [v["color"] and v["shape"] and v["cell"] for v in verdicts])), 3),
                 "object_color": mean("color"), "object_shape": mean("shape"),
                 "object_cell": mean("cell"), "caption_all_correct": mean("caption_all_correct"),
                 "max_kept_pixel_change": kept_change, "seconds": round(seconds, 1)})
    print(rows[-1], flush=True)
  return rows


def img2img_rows(cascade: Any, root: str) -> list[dict[str, Any]]:
  from imagen_jax.core import images as images_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes_grammar as grammar  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import edit_inputs  # pylint: disable=g-import-not-at-top
  singles = [e for e in (shapes.example("validation", i) for i in range(20 * _NUM.value))
             if len(e.placed) == 1][:_NUM.value]
  colors = list(grammar.COLORS)
  items, wanted = [], []
  for i, example in enumerate(singles):
    placed = example.placed[0]
    # Another color whose pair with this shape the stages trained on, cycling through them.
    options = [c for c in colors if c != placed.obj.color
               and (c, placed.obj.shape) not in grammar.HELDOUT_PAIRS]
    color = options[i % len(options)]
    path = os.path.join(root, "inputs", f"img2img_{i:04d}.png")
    if not os.path.exists(path):
      images_lib.write_png(shapes.render(example.placed, SIZE), path)
    items.append({"prompt": grammar.single_caption(grammar.Obj(color, placed.obj.shape),
                                                   placed.cell), "image": path})
    wanted.append((color, placed.obj.shape, placed.cell))
  rows = []
  for strength in [float(s) for s in _STRENGTHS.value]:
    edit = edit_inputs.Edit("img2img", strength=strength)
    outputs, seconds = run_edit(cascade, items, os.path.join(root, f"img2img_{strength:g}"),
                                edit, base_settings(cascade, *DEMO_BASE_SAMPLER))
    verdicts = []
    for image, (color, shape, cell) in zip(outputs, wanted):
      found = judge.find_objects(image)
      largest = found[0] if found else None
      verdicts.append({"color_changed": bool(largest and largest.color == color),
                       "shape_kept": bool(largest and largest.shape == shape),
                       "cell_kept": bool(largest and largest.cell == cell),
                       "one_object": len(found) == 1})
    mean = lambda key: round(float(np.mean([v[key] for v in verdicts])), 3)
    rows.append({"task": "img2img", "strength": strength,
                 "changed_and_kept": round(float(np.mean(
                     [all(v.values()) for v in verdicts])), 3),
                 "color_changed": mean("color_changed"), "shape_kept": mean("shape_kept"),
                 "cell_kept": mean("cell_kept"), "one_object": mean("one_object"),
                 "seconds": round(seconds, 1)})
    print(rows[-1], flush=True)
  return rows


def upscale_rows(workdir: str, root: str) -> list[dict[str, Any]]:
  from imagen_jax.core import images as images_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import edit_inputs  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sr = cascade_lib.Cascade.from_workdirs([os.path.join(workdir, "sr")], first_stage="sr")
  low = sr.stages[0].config.lowres.size
  examples = [shapes.example("validation", i) for i in range(_NUM.value)]
  truths = [shapes.render(e.placed, SIZE) for e in examples]
  items, bicubic = [], []
  for i, (example, truth) in enumerate(zip(examples, truths)):
    small = preprocess.downsample(truth, low)
    path = os.path.join(root, "inputs", f"upscale_{i:04d}.png")
    if not os.path.exists(path):
      images_lib.write_png(small, path)
    items.append({"prompt": example.caption, "image": path})
    bicubic.append(np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)))
  # The SR stage as configured (noise augmentation of its input at the configured level, for a
  # base stage's outputs) and at level 0 (a clean input).
  runs = []
  for aug_level in (sr.default_settings()[0].aug_level, 0.0):
    settings = [dataclasses.replace(sr.default_settings()[0], aug_level=aug_level)]
    outputs, seconds = run_edit(sr, items, os.path.join(root, f"upscale_aug{aug_level:g}"),
                                edit_inputs.Edit("upscale"), settings)
    runs.append((f"sr_stage_aug{aug_level:g}", outputs, seconds))
  rows = []
  for name, images, seconds in runs + [("bicubic", bicubic, None), ("renders_64", truths, None)]:
    scores = judge.score([judge.judge(im, it["prompt"]) for im, it in zip(images, items)])
    rows.append({"task": "upscale", "method": name, "all_correct": scores["all_correct"],
                 "shape": scores["shape"], "edge_iou": round(scores["edge_iou"], 3),
                 "background": round(scores["background"], 2),
                 "psnr_vs_64": round(float(np.mean([psnr(a, b) for a, b in zip(images, truths)])),
                                     2),
                 "seconds": seconds and round(seconds, 1)})
    print(rows[-1], flush=True)
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  root = os.path.join(workdir, "editing_quality")
  os.makedirs(os.path.join(root, "inputs"), exist_ok=True)
  extra = {"workdir": workdir, "num_images": _NUM.value}
  if {"inpaint", "img2img"} & set(_TASKS.value):
    cascade = cascade_lib.Cascade.from_workdirs(
        [os.path.join(workdir, "base"), os.path.join(workdir, "sr")])
    if "inpaint" in _TASKS.value:
      harness.report("editing_quality_inpaint", inpaint_rows(cascade, root), extra=extra)
    if "img2img" in _TASKS.value:
      harness.report("editing_quality_img2img", img2img_rows(cascade, root), extra=extra)
  if "upscale" in _TASKS.value:
    harness.report("editing_quality_upscale", upscale_rows(workdir, root), extra=extra)


if __name__ == "__main__":
  app.run(main)
