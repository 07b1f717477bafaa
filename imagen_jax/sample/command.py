"""`imagen-jax sample`: sample a cascade stitched from stage workdirs into PNGs.

    imagen-jax sample --stages=gs://b/base64,gs://b/sr256,gs://b/sr1024 \
        --prompt="a corgi wearing a red bow tie" --num_samples=4 --outdir=out \
        --guidance=5,8,8 --steps=256,128,64 --sampler=ddpm

Writes OUT/00000.png ... (the last stage), OUT/grid.png and OUT/samples.jsonl (one line per
image: file, prompt, seed, index and every stage's settings). With --save_stages, every
stage's output goes to OUT/stages/. Re-running into the same outdir with more prompts samples
only the new images; a finished image is never redone or overwritten.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from absl import flags
from absl import logging
import numpy as np
import tqdm

from imagen_jax import config_lib
from imagen_jax import fileio
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import images as images_lib
from imagen_jax.sample import stage as stage_lib

_STAGES = config_lib.DEFINE_path_list("stages", None,
                                      "Stage workdirs, base first: DIR[,DIR[,DIR]].")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable). '' is unconditional.")
_PROMPTS_FILE = config_lib.DEFINE_path(
    "prompts_file", None, "One prompt per line, or .jsonl with a `prompt` field per line (other "
    "fields, e.g. `split`, are copied to samples.jsonl).")
_OUTDIR = config_lib.DEFINE_path("outdir", None,
                                 "Where the PNGs, grid.png and samples.jsonl go (local or gs://).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Image i is sampled from (seed, i) alone.")
_STEPS_PER_STAGE = flags.DEFINE_list("ckpt_steps", None, "Checkpoint step per stage (default latest).")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Guidance weight per stage, e.g. 5,8,8.")
_STEPS = flags.DEFINE_list("steps", None, "Sampling steps per stage (or one for all).")
_SAMPLER = flags.DEFINE_list("sampler", None, "ddpm, ddim or edm_heun per stage (or one).")
_AUG_LEVEL = flags.DEFINE_list("aug_level", None, "Noise-aug level per SR stage (or one).")
_THRESHOLD = flags.DEFINE_list("threshold", None, "dynamic, static or none per stage (or one).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images sampled together.")
_SAVE_STAGES = flags.DEFINE_bool("save_stages", False, "Also save every stage's output.")


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


def stage_settings(cascade: cascade_lib.Cascade, guidance=None, steps=None, sampler=None,
                   aug_level=None, threshold=None) -> list[stage_lib.StageSettings]:
  n = len(cascade.stages)
  overrides = {"guidance": per_stage(guidance, n, "guidance", float),
               "steps": per_stage(steps, n, "steps", int),
               "sampler": per_stage(sampler, n, "sampler", str),
               "aug_level": per_stage(aug_level, n, "aug_level", float, sr_only=True),
               "threshold": per_stage(threshold, n, "threshold", str)}
  settings = []
  for k, stage in enumerate(cascade.stages):
    chosen = {name: values[k] for name, values in overrides.items() if values is not None}
    settings.append(stage_lib.StageSettings.from_config(stage.config.sample, **chosen))
  return settings


def run(cascade: cascade_lib.Cascade, prompts: list[dict[str, Any]], outdir: str, *,
        num_samples: int = 1, seed: int = 0, settings: Sequence[stage_lib.StageSettings],
        batch_size: int = 16, save_stages: bool = False, show_progress: bool = True
        ) -> list[dict[str, Any]]:
  """Samples every (prompt, sample) not yet in OUT/samples.jsonl; returns all records.

  `outdir` is a local path or gs://; each batch's PNGs are written before samples.jsonl is
  replaced with the longer list, so a listed image is a finished image.
  """
  outdir = fileio.resolve(outdir)
  fileio.makedirs(outdir)
  stage_info = [{"workdir": s.workdir, "checkpoint_step": s.step, "image_size": s.config.image_size,
                 **dataclasses.asdict(st)} for s, st in zip(cascade.stages, settings)]
  plan = [{**item, "file": f"{i * num_samples + j:05d}.png",
           "index": i * num_samples + j, "sample": j, "seed": seed, "stages": stage_info}
          for i, item in enumerate(prompts) for j in range(num_samples)]
  done = {r["index"]: r for r in images_lib.read_records(outdir, missing_ok=True)}
  for record in plan:
    old = done.get(record["index"])
    if old is not None and (old["prompt"] != record["prompt"] or old["stages"] != stage_info
                            or old["seed"] != seed):
      raise SampleError(
          f"{outdir} already holds image {old['file']} for prompt {old['prompt']!r} with other "
          f"settings or seed; use a new --outdir (finished images are never overwritten)")
  todo = [r for r in plan if r["index"] not in done]
  logging.info("%d images planned, %d already in %s, %d to sample", len(plan), len(done),
               outdir, len(todo))
  bars = {}

  def progress(k, step, steps):
    if not show_progress:
      return
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
    images = cascade.sample([r["prompt"] for r in chunk], seed=seed,
                            indices=[r["index"] for r in chunk], settings=settings,
                            progress=progress)
    for i, record in enumerate(chunk):
      images_lib.write_png(images[-1][i], fileio.join(outdir, record["file"]))
      if save_stages:
        for k, stage_images in enumerate(images):
          images_lib.write_png(stage_images[i], fileio.join(
              outdir, "stages", f"{record['index']:05d}_stage{k + 1}.png"))
      done[record["index"]] = record
    # The records go in after their PNGs are complete: a listed image is a finished image.
    images_lib.write_records(outdir, list(done.values()))
  records = [done[r["index"]] for r in plan]
  grid = np.stack([images_lib.read_image(outdir, r) for r in records])
  images_lib.write_png(images_lib.image_grid(grid), fileio.join(outdir, "grid.png"))
  return records


def main(argv: Sequence[str]) -> None:
  del argv
  if not _STAGES.value:
    raise SampleError("--stages is required: stage workdirs, base first")
  if not _OUTDIR.value:
    raise SampleError("--outdir is required")
  if _NUM_SAMPLES.value < 1:
    raise SampleError(f"--num_samples must be >= 1, got {_NUM_SAMPLES.value}")
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  num_stages = len(_STAGES.value)
  for name, values in (("guidance", _GUIDANCE.value), ("steps", _STEPS.value),
                       ("sampler", _SAMPLER.value), ("threshold", _THRESHOLD.value)):
    if values and len(values) not in (1, num_stages):
      raise SampleError(f"--{name} has {len(values)} values for {num_stages} stages")
  ckpt_steps = per_stage(_STEPS_PER_STAGE.value, num_stages, "ckpt_steps", int)
  cascade = cascade_lib.Cascade.from_workdirs(_STAGES.value, steps=ckpt_steps)
  settings = stage_settings(cascade, _GUIDANCE.value, _STEPS.value, _SAMPLER.value,
                            _AUG_LEVEL.value, _THRESHOLD.value)
  records = run(cascade, prompts, _OUTDIR.value, num_samples=_NUM_SAMPLES.value,
                seed=_SEED.value, settings=settings, batch_size=_BATCH.value,
                save_stages=_SAVE_STAGES.value)
  print(f"{len(records)} images in {_OUTDIR.value} (grid.png, samples.jsonl)")
