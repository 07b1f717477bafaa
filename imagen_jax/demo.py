"""`imagen-jax demo`: train, sample and score a tiny shapes cascade on a CPU (the README's main job).

    imagen-jax demo --workdir=demo_run          # 15-31 minutes on 2 cores, by CPU
    imagen-jax demo --workdir=demo_run --quick  # under 2 minutes; the scores then mean little

1. builds the `shapes` dataset (64x64) in WORKDIR/data;
2. trains the base stage, configs/demo_base.py (text -> 32x32), in WORKDIR/base;
3. trains the SR stage, configs/demo_sr.py (32 -> 64), in WORKDIR/sr;
4. samples prompts of the `validation` and `heldout` splits through the cascade, with guidance,
   into WORKDIR/samples (an ordinary `imagen-jax sample` output);
5. judges every image from its pixels (imagen_jax/eval/shapes.py), prints the scores, and writes
   WORKDIR/scores.json and WORKDIR/report.html (the grids with each prompt under its image).

Each step is an ordinary run of the project's commands, and a second run reuses what is done.
The text encoder is a tiny random T5 v1.1 with a shapes vocabulary: real use loads real T5.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from imagen_jax import config_lib
from imagen_jax import fileio

_WORKDIR = config_lib.DEFINE_path(
    "workdir", None, "Where checkpoints, logs and samples go (local or gs://).")
_QUICK = flags.DEFINE_bool("quick", False, "A 2-minute run for tests: few steps, few prompts.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None,
                                    "Prompts sampled per split (default 100; --quick 8).")

SPLITS = ("validation", "heldout")
FULL_SHAPES = None                       # the dataset's own split sizes (110k examples)
QUICK_SHAPES = {"train": 2000, "validation": 100, "heldout": 100}


def stage_configs(workdir: str, quick: bool) -> dict[str, ml_collections.ConfigDict]:
  """The base and SR stage configs, pointed at the demo's data directory."""
  variant = "quick" if quick else "full"
  data_dir = os.path.join(workdir, "data")
  return {name: config_lib.load_config(f"configs/demo_{name}.py:{variant}",
                                       {"data.data_dir": data_dir})
          for name in ("base", "sr")}


def build_data(workdir: str, quick: bool) -> str:
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, "data")
  shapes.build(data_dir, 64, num_examples=QUICK_SHAPES if quick else FULL_SHAPES)
  return data_dir


def train_stage(config: ml_collections.ConfigDict, workdir: str) -> None:
  """An ordinary training run; skipped when its final checkpoint exists."""
  from imagen_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top
  if os.path.isdir(workdir):
    if checkpoints.Checkpointer(workdir, read_only=True).latest_step() == config.total_steps:
      logging.info("%s is trained (step %d): reusing it", workdir, config.total_steps)
      return
  train.train_and_evaluate(config, workdir)


def eval_prompts(data_dir: str, num_prompts: int) -> list[dict[str, str]]:
  """The first `num_prompts` captions of each evaluation split, with the split named."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top
  prompts = []
  for split in SPLITS:
    data_config = ml_collections.ConfigDict({"source": "shapes", "data_dir": data_dir,
                                             "image_key": "image", "caption_key": "caption"})
    captions = sources.get_captions(data_config, split)
    prompts += [{"prompt": captions[i], "split": split}
                for i in range(min(num_prompts, len(captions)))]
  return prompts


def sample(stage_dirs: Sequence[str], prompts: list[dict[str, str]], outdir: str) -> list[dict]:
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import command  # pylint: disable=g-import-not-at-top
  cascade = cascade_lib.Cascade.from_workdirs(stage_dirs)
  return command.run(cascade, prompts, outdir, settings=cascade.default_settings(),
                     batch_size=64, show_progress=False)


def score(outdir: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[np.ndarray]]:
  """(scores per split, records, images) of the samples in `outdir`."""
  from imagen_jax.eval import command as eval_command  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  records, images = eval_command.read_samples(outdir)
  return judge.score_by_split(records, images), records, images


def score_table(scores: dict[str, dict[str, float]]) -> str:
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  header = f"{'split':<11}{'n':>5}" + "".join(f"{a:>13}" for a in judge.ATTRIBUTES)
  rows = [f"{split:<11}{s['n']:>5}" + "".join(f"{s[a]:>13.1%}" for a in judge.ATTRIBUTES)
          for split, s in scores.items()]
  return "\n".join([header, *rows])


def write_report(path: str, scores: dict[str, Any], records: list[dict[str, Any]],
                 images: list[np.ndarray], timings: dict[str, float]) -> None:
  """A self-contained HTML page: the scores, then per split every image over its prompt."""
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top

  def data_uri(image):
    buf = io.BytesIO()
    Image.fromarray(image).resize((128, 128), Image.NEAREST).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

  parts = ["<!doctype html><meta charset='utf-8'><title>imagen-jax shapes demo</title>",
           "<style>body{font-family:sans-serif;background:#111;color:#ddd}"
           "figure{display:inline-block;width:140px;margin:4px;vertical-align:top}"
           "figcaption{font-size:11px}.ok{color:#6c6}.bad{color:#e66}"
           "td,th{padding:2px 10px;text-align:right}</style>",
           "<h1>imagen-jax shapes demo</h1>",
           f"<pre>{html.escape(score_table(scores))}</pre>",
           "<p>" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()) + "</p>"]
  for split in SPLITS:
    parts.append(f"<h2>{split}</h2>")
    for record, image in zip(records, images):
      if record.get("split") != split:
        continue
      verdict = judge.judge(image, record["prompt"])
      mark = ("<span class=ok>correct</span>" if verdict["all_correct"] else
              "<span class=bad>wrong: " + ", ".join(
                  a for a in judge.ATTRIBUTES[:-1] if not verdict[a]) + "</span>")
      parts.append(f"<figure><img src='{data_uri(image)}' width=128 height=128>"
                   f"<figcaption>{html.escape(record['prompt'])}<br>{mark}</figcaption></figure>")
  fileio.write_text(path, "\n".join(parts))


def run(workdir: str, quick: bool = False, num_prompts: int | None = None) -> dict[str, Any]:
  """The whole demo; returns the scores per split (also in WORKDIR/scores.json)."""
  workdir = fileio.resolve(workdir)
  os.makedirs(workdir, exist_ok=True)
  num_prompts = num_prompts or (8 if quick else 100)
  timings = {}
  clock = time.perf_counter()

  def lap(name):
    nonlocal clock
    timings[name] = time.perf_counter() - clock
    clock = time.perf_counter()
    logging.info("demo: %s done in %.0f s", name, timings[name])

  data_dir = build_data(workdir, quick)
  lap("data")
  configs = stage_configs(workdir, quick)
  stage_dirs = [os.path.join(workdir, name) for name in configs]
  for (name, config), stage_dir in zip(configs.items(), stage_dirs):
    train_stage(config, stage_dir)
    lap(f"train_{name}")
  outdir = os.path.join(workdir, "samples")
  sample(stage_dirs, eval_prompts(data_dir, num_prompts), outdir)
  lap("sample")
  scores, records, images = score(outdir)
  lap("score")
  fileio.write_text(os.path.join(workdir, "scores.json"), json.dumps(
      {"scores": scores, "seconds": timings, "quick": quick}, indent=2))
  write_report(os.path.join(workdir, "report.html"), scores, records, images, timings)
  print(score_table(scores))
  print(f"report: {os.path.join(workdir, 'report.html')}  ({sum(timings.values()):.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
  return scores


def main(argv: Sequence[str]) -> None:
  del argv
  if not _WORKDIR.value:
    raise flags.ValidationError("--workdir is required, e.g. --workdir=demo_run")
  run(_WORKDIR.value, _QUICK.value, _NUM_PROMPTS.value)
