"""A sampling outdir: sample a cascade into PNGs plus samples.jsonl, resumably.

    records = sample_to_outdir(cascade, [{"prompt": "a red circle"}], "out", num_samples=4,
                               settings=cascade.default_settings())

OUT/00000.png ... hold the last stage's images, OUT/grid.png all of them, OUT/samples.jsonl one
JSON record per finished image (file, prompt, seed, index and every stage's settings); with
`save_stages`, OUT/stages/ holds every stage's output. `imagen-jax sample`, `imagen-jax edit`,
the demo, DrawBench and the notebook sample through `sample_to_outdir`; every evaluation reads outdirs with
`read_records` / `read_image`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from absl import logging
import numpy as np
import tqdm

from imagen_jax.core import fileio
from imagen_jax.core import images as images_lib
from imagen_jax.diffusion import stage_sampler
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import edit_inputs

RECORDS = "samples.jsonl"


def records_path(outdir: str) -> str:
  return fileio.join(outdir, RECORDS)


def read_records(outdir: str, missing_ok: bool = False) -> list[dict[str, Any]]:
  """The records of OUT/samples.jsonl, in file order (one per finished image)."""
  path = records_path(outdir)
  if not fileio.exists(path):
    if missing_ok:
      return []
    raise FileNotFoundError(f"{path} not found: expected the outdir of `imagen-jax sample`")
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def write_records(outdir: str, records: Sequence[dict[str, Any]]) -> None:
  """Replaces OUT/samples.jsonl with `records`, atomically: object stores cannot append, and a
  reader (or a resumed run) sees either the old list or the new one, never a torn line."""
  fileio.write_text(records_path(outdir), "".join(json.dumps(r) + "\n" for r in records))


def read_image(outdir: str, record: dict[str, Any]) -> np.ndarray:
  """The image of one record: uint8 [H, W, 3]."""
  return images_lib.read_png(fileio.join(outdir, record["file"]))


def read_samples(outdir: str) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
  """The records of samples.jsonl and their images (uint8 [H, W, 3]), in file order."""
  records = read_records(outdir)
  return records, [read_image(outdir, r) for r in records]


class SampleError(ValueError):
  """Bad sampling input, reported before any compute."""


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[dict[str, Any]]:
  """[{"prompt": ..., **extra}] from --prompt flags or a prompts file (text or .jsonl)."""
  if prompts and prompts_file:
    raise SampleError("give --prompt or --prompts_file, not both")
  if prompts_file:
    if not fileio.exists(prompts_file):
      raise SampleError(f"--prompts_file {prompts_file!r} does not exist")
    lines = fileio.read_text(prompts_file).splitlines()
    if prompts_file.endswith(".jsonl"):
      items = [json.loads(line) for line in lines if line.strip()]
      for i, item in enumerate(items):
        if not isinstance(item.get("prompt"), str):
          raise SampleError(f"{prompts_file} line {i + 1} has no string 'prompt' field")
      records = items
    else:
      records = [{"prompt": line} for line in lines if line.strip()]
  else:
    records = [{"prompt": p} for p in prompts]
  if not records:
    raise SampleError("no prompts: give --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return records


def per_stage(values: Sequence[str] | None, num_stages: int, name: str, cast,
              sr_only: bool = False) -> list[Any] | None:
  """A flag list with one value per stage (or one for all, or None)."""
  if not values:
    return None
  count = num_stages - 1 if sr_only else num_stages
  if len(values) == 1:
    values = list(values) * count
  if len(values) != count:
    what = "SR stages" if sr_only else "stages"
    raise SampleError(f"--{name} has {len(values)} values for {count} {what}")
  try:
    out = [cast(v) for v in values]
  except ValueError as e:
    raise SampleError(f"--{name}: {e}") from e
  return [None] + out if sr_only else out


def parse_interval(value: str) -> tuple[float, ...]:
  """A --guidance_interval value: 'LO:HI' (EDM sigma; HI may be 'inf') or 'all' (guidance at
  every step: ())."""
  if value.strip().lower() == "all":
    return ()
  parts = value.split(":")
  if len(parts) != 2:
    raise ValueError(f"{value!r} is not LO:HI (e.g. 0.28:5.42) or 'all'")
  return tuple(float(p) for p in parts)


def stage_settings(cascade: cascade_lib.Cascade, guidance=None, steps=None, sampler=None,
                   aug_level=None, threshold=None, spacing=None, guidance_interval=None
                   ) -> list[stage_sampler.StageSettings]:
  """Each stage's settings: its config's `sample` section, overridden by command-line lists
  (one value per stage, or one for all). Bad values raise SampleError naming the flag."""
  n = len(cascade.stages)
  overrides = {"guidance": per_stage(guidance, n, "guidance", float),
               "steps": per_stage(steps, n, "steps", int),
               "sampler": per_stage(sampler, n, "sampler", str),
               "spacing": per_stage(spacing, n, "spacing", str),
               "guidance_interval": per_stage(guidance_interval, n, "guidance_interval",
                                              parse_interval),
               "aug_level": per_stage(aug_level, n, "aug_level", float, sr_only=True),
               "threshold": per_stage(threshold, n, "threshold", str)}
  settings = []
  for k, stage in enumerate(cascade.stages):
    chosen = {name: values[k] for name, values in overrides.items() if values is not None}
    try:
      settings.append(stage_sampler.StageSettings.from_config(stage.config.sample, **chosen))
    except ValueError as e:
      raise SampleError(f"stage {k} ({stage.workdir}): {e}") from e
  return settings


def load_cascade(stages: Sequence[str], ckpt_steps: Sequence[str] | None = None,
                 first_stage: str = "base", lora_scale: float = 1.0,
                 **overrides: Sequence[str] | None
                 ) -> tuple[cascade_lib.Cascade, list[stage_sampler.StageSettings]]:
  """The cascade of `stages` (workdirs, base first; SR stages only with `first_stage` "sr";
  a LoRA workdir in place of a stage, its adapters weighted by `lora_scale`) and its
  per-stage settings.

  `ckpt_steps` and the `overrides` (guidance, steps, sampler, spacing, guidance_interval,
  aug_level, threshold) are lists of strings as the command line gives them: one per stage, or one for all; None for the configs'.
  """
  if not stages:
    raise SampleError("no stages: give the stage workdirs, base first")
  for name, values in overrides.items():
    if name != "aug_level" and values and len(values) not in (1, len(stages)):
      raise SampleError(f"--{name} has {len(values)} values for {len(stages)} stages")
  steps = per_stage(ckpt_steps, len(stages), "ckpt_steps", int)
  cascade = cascade_lib.Cascade.from_workdirs(stages, steps=steps, first_stage=first_stage,
                                              lora_scale=lora_scale)
  return cascade, stage_settings(cascade, **overrides)


def _with_later_fields(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records written before a settings field existed, completed with the value they sampled
  with (the field's default), so an outdir resumes across versions."""
  later = {f.name: f.default for f in dataclasses.fields(stage_sampler.StageSettings)
           if f.default is not dataclasses.MISSING}
  return json.loads(json.dumps([{**later, **stage} for stage in stages]))


def _edit_inputs(cascade: cascade_lib.Cascade, prompts: list[dict[str, Any]],
                 edit: edit_inputs.Edit) -> tuple[list[dict[str, Any]], dict[tuple[str, str], Any]]:
  """The prompts with their inputs' paths resolved and digests added, and every input loaded
  (image, mask) by (image, mask) path: all checked before any compute."""
  items, loaded = [], {}
  for item in prompts:
    if not item.get("image"):
      raise edit_inputs.EditError(f"prompt {item['prompt']!r} has no input image (--image=FILE, or "
                              f"an `image` field in the prompts file)")
    item = {**item, "image": fileio.resolve(item["image"])}
    if item.get("mask"):
      item["mask"] = fileio.resolve(item["mask"])
    key = (item["image"], item.get("mask") or "")
    if key not in loaded:
      loaded[key] = edit_inputs.load_inputs(key[0], key[1] or None, edit, cascade.input_size(edit))
      loaded[key] += ({"image_sha256": edit_inputs.file_digest(key[0]),
                       **({"mask_sha256": edit_inputs.file_digest(key[1])} if key[1] else {})},)
    items.append({**item, **loaded[key][2]})
  return items, loaded


def sample_to_outdir(cascade: cascade_lib.Cascade, prompts: list[dict[str, Any]], outdir: str, *,
        num_samples: int = 1, seed: int = 0, settings: Sequence[stage_sampler.StageSettings],
        batch_size: int = 16, save_stages: bool = False, show_progress: bool = True,
        edit: edit_inputs.Edit | None = None) -> list[dict[str, Any]]:
  """Samples every (prompt, sample) not yet in OUT/samples.jsonl; returns all records.

  `outdir` is a local path or gs://; each batch's PNGs are written before samples.jsonl is
  replaced with the longer list, so a listed image is a finished image. With an `edit`
  (`edit_inputs`), each prompt item names its input `image` (and `mask`: white = regenerate); the
  records add the edit's settings and the inputs' sha256, and a resumed run checks them.
  """
  outdir = fileio.resolve(outdir)
  inputs = {}
  if edit is not None:
    cascade.check_edit(edit, settings)
    prompts, inputs = _edit_inputs(cascade, prompts, edit)
  fileio.makedirs(outdir)
  # As samples.jsonl will read back (tuples become lists), to compare with finished records.
  stage_info = json.loads(json.dumps([
      {"workdir": s.workdir, "checkpoint_step": s.step, "image_size": s.config.image_size,
       **({"lora": s.lora} if s.lora else {}), **dataclasses.asdict(st)}
      for s, st in zip(cascade.stages, settings)]))
  edit_info = {} if edit is None else {"edit": dataclasses.asdict(edit)}
  plan = [{**item, "file": f"{i * num_samples + j:05d}.png",
           "index": i * num_samples + j, "sample": j, "seed": seed, "stages": stage_info,
           **edit_info}
          for i, item in enumerate(prompts) for j in range(num_samples)]
  done = {r["index"]: r for r in read_records(outdir, missing_ok=True)}
  same_input = lambda old, new: all(old.get(k) == new.get(k) for k in (
      "edit", "image_sha256", "mask_sha256"))
  for record in plan:
    old = done.get(record["index"])
    if old is not None and (old["prompt"] != record["prompt"] or old["seed"] != seed
                            or _with_later_fields(old["stages"]) != stage_info
                            or not same_input(old, record)):
      raise SampleError(
          f"{outdir} already holds image {old['file']} for prompt {old['prompt']!r} with other "
          f"settings, seed or input image; use a new --outdir (finished images are never "
          f"overwritten)")
  todo = [r for r in plan if r["index"] not in done]
  logging.info("%d images planned, %d already in %s, %d to sample", len(plan), len(done),
               outdir, len(todo))
  bars = {}

  def progress(k, step, steps):
    bar = bars.get(k)
    if bar is None:
      bar = bars[k] = tqdm.tqdm(total=steps, desc=f"stage {k + 1}", leave=False)
    bar.n = max(bar.n, step)
    bar.refresh()
    if step >= steps:
      bar.close()
      bars.pop(k)

  if save_stages:
    fileio.makedirs(fileio.join(outdir, "stages"))
  for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    edit_arrays = {}
    if edit is not None:
      chunk_inputs = [inputs[(r["image"], r.get("mask") or "")] for r in chunk]
      edit_arrays = {"edit": edit, "images": np.stack([i[0] for i in chunk_inputs]),
                     "masks": np.stack([i[1] for i in chunk_inputs]) if edit.uses_mask else None}
    images = cascade.sample([r["prompt"] for r in chunk], seed=seed,
                            indices=[r["index"] for r in chunk], settings=settings,
                            progress=progress if show_progress else None, **edit_arrays)
    for i, record in enumerate(chunk):
      images_lib.write_png(images[-1][i], fileio.join(outdir, record["file"]))
      if save_stages:
        for k, stage_images in enumerate(images):
          images_lib.write_png(stage_images[i], fileio.join(
              outdir, "stages", f"{record['index']:05d}_stage{k + 1}.png"))
      done[record["index"]] = record
    # The records go in after their PNGs are complete: a listed image is a finished image.
    write_records(outdir, list(done.values()))
  records = [done[r["index"]] for r in plan]
  grid = np.stack([read_image(outdir, r) for r in records])
  images_lib.write_png(images_lib.image_grid(grid), fileio.join(outdir, "grid.png"))
  return records
