"""The shapes demo: train, sample and score a tiny cascade on a CPU (`imagen-jax demo`).

    scores = demo.run("demo_run")              # tens of minutes on a small CPU
    scores = demo.run("demo_run", quick=True)  # a few minutes; the scores then mean little

1. builds the `shapes` dataset (64x64) in WORKDIR/data;
2. writes the text encoder, once per machine: a tiny T5 v1.1 with the grammar's vocabulary,
   pretrained on the grammar's text alone (`builtin:shapes-tiny-pretrained`, shipped with the
   package), whose final layer both stages read;
3. trains the base stage, configs/demo_base.py (text -> 32x32), in WORKDIR/base, and the SR
   stage, configs/demo_sr.py (32 -> 64), in WORKDIR/sr: on a CPU with 2+ cores side by side at
   first (`train_stages` says why), each an `imagen-jax train` process on half the cores, then
   the base stage finishes on every core;
5. samples prompts of the `validation` and `heldout` splits through the cascade, with guidance,
   into WORKDIR/samples (an ordinary `imagen-jax sample` output);
6. judges every image from its pixels (imagen_jax/eval/shapes.py): prompt adherence, background
   cleanliness and edge fidelity, beside the same judge's figures on the dataset's own renders
   of those prompts; prints them and writes WORKDIR/scores.json and WORKDIR/report.html (every
   image with its prompt and verdict).

Each step is an ordinary run of the project's commands, and a second run reuses what is done.
Real use loads real T5 weights instead of the builtin encoder.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.data import preprocess
from imagen_jax.data import shapes
from imagen_jax.data import sources
from imagen_jax.eval import shapes as judge
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib
from imagen_jax.text import builtin
from imagen_jax.train import train

SPLITS = ("validation", "heldout")
FULL_SHAPES = None                       # the dataset's own split sizes (110k examples)
QUICK_SHAPES = {"train": 2000, "validation": 100, "heldout": 100}


def stage_specs(workdir: str, quick: bool) -> dict[str, tuple[str, dict[str, str]]]:
  """Per stage, the config file spec and overrides (pointed at the demo's data directory)."""
  variant = "quick" if quick else "full"
  data_dir = os.path.join(workdir, "data")
  return {name: (f"configs/demo_{name}.py:{variant}", {"data.data_dir": data_dir})
          for name in ("base", "sr")}


def stage_configs(workdir: str, quick: bool) -> dict[str, ml_collections.ConfigDict]:
  """The base and SR stage configs, pointed at the demo's data directory."""
  return {name: config_lib.load_config(spec, overrides)
          for name, (spec, overrides) in stage_specs(workdir, quick).items()}


def use_every_core(configs: dict[str, ml_collections.ConfigDict]) -> int:
  """Before JAX starts: one CPU device per core (each stage trains data-parallel over them, which
  keeps every core busy where one device would not), unless the user chose the count (XLA_FLAGS,
  JAX_NUM_CPU_DEVICES). Returns the count asked for, 0 when left alone. Accelerators are
  unaffected: the setting is the CPU backend's."""
  if partitioning.user_set_cpu_devices():
    return 0
  count = partitioning.cpu_devices_per_core([c.batch_size for c in configs.values()])
  return count if partitioning.use_cpu_devices(count) else 0


def build_data(workdir: str, quick: bool) -> str:
  data_dir = os.path.join(workdir, "data")
  shapes.build(data_dir, 64, num_examples=QUICK_SHAPES if quick else FULL_SHAPES)
  return data_dir


def prepare_text_encoders(configs: dict[str, ml_collections.ConfigDict]) -> None:
  """Writes the stages' builtin encoders once per machine (from the package's files), so the
  time shows as its own step."""
  for name in sorted({c.text.encoder for c in configs.values()}):
    logging.info("demo: text encoder %s in %s", name, builtin.resolve(name))


def trained_step(workdir: str) -> int:
  """The step of the stage's latest checkpoint (0: none)."""
  if not os.path.isdir(workdir):
    return 0
  return checkpoints.Checkpointer(workdir, read_only=True).latest_step() or 0


def train_stage(config: ml_collections.ConfigDict, workdir: str) -> None:
  """An ordinary training run; skipped when its final checkpoint exists."""
  if trained_step(workdir) == config.total_steps:
    logging.info("%s is trained (step %d): reusing it", workdir, config.total_steps)
    return
  train.train_and_evaluate(config, workdir)


# The SR stage learns from the dataset's own low-res images, not from the base stage's, so both
# can train at once. On a CPU two one-device processes, one core each, do more work per second
# than one process over both cores (XLA:CPU leaves a 2-device program's cores partly idle on the
# demo's small convolutions). So the base stage's first steps train on half the cores while the
# SR stage trains on the other half, then the base finishes on every core, which trains both
# stages sooner than one after the other. The switch is a fixed step, so the scores stay those
# of the configured seeds. The share is the fraction of the base's steps that one core trains in
# the time the SR stage takes on the other (their per-core step rates, Muon's update included),
# so that both sides finish together; on a CPU with other ratios one side waits for the other,
# and the result is the same.
BASE_SHARE_BESIDE_SR = 0.58


def side_by_side_cores(device_count: int) -> tuple[list[int], list[int]] | None:
  """(the base stage's cores, the SR stage's) for training side by side: only where the demo
  chose the CPU device count itself (`use_every_core`: `device_count` > 0) for 2+ cores, and JAX
  runs on the CPU, on an OS that lets a process choose its cores (Linux). None: train one stage
  after the other."""
  if (device_count == 0 or not hasattr(os, "sched_setaffinity")
      or partitioning.cpu_cores() < 2):
    return None
  if jax.default_backend() != "cpu":
    return None
  cores = sorted(os.sched_getaffinity(0))
  half = (len(cores) + 1) // 2
  return cores[:half], cores[half:]


@contextlib.contextmanager
def pinned_to(cores: Sequence[int]):
  """This thread runs on `cores` (children started meanwhile inherit them), then as before."""
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def start_training_process(name: str, spec: str, overrides: dict[str, str], workdir: str,
                           cores: Sequence[int], batch_size: int,
                           stop_at_step: int | None) -> subprocess.Popen:
  """`imagen-jax train` for one stage on `cores` (one CPU device per core that divides the
  batch); its output goes to this process's stderr, each line prefixed with `[name]`."""
  command = [sys.executable, "-m", "imagen_jax", "train", f"--config={spec}",
             f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  if stop_at_step is not None:
    command.append(f"--stop_at_step={stop_at_step}")
  devices = partitioning.cpu_devices_per_core([batch_size], cores=len(cores))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  with pinned_to(cores):
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)

  def forward():
    for line in process.stdout:
      sys.stderr.write(f"[{name}] {line}")
  process.forwarder = threading.Thread(target=forward, daemon=True)  # joined by `wait_for`
  process.forwarder.start()
  logging.info("demo: training %s in %s on core(s) %s, %d device(s)%s", name, workdir,
               ",".join(map(str, cores)), devices,
               f", to step {stop_at_step}" if stop_at_step else "")
  return process


def wait_for(process: subprocess.Popen) -> int:
  """The process's exit status, once all its output has been forwarded."""
  status = process.wait()
  process.forwarder.join()
  return status


def train_stages(workdir: str, quick: bool, device_count: int,
                 lap: Any = lambda name: None) -> None:
  """Trains both stages (WORKDIR/base, WORKDIR/sr), side by side where `side_by_side_cores`
  allows, else one after the other; a stage already trained is reused."""
  specs, configs = stage_specs(workdir, quick), stage_configs(workdir, quick)
  dirs = {name: os.path.join(workdir, name) for name in configs}
  pending = [name for name in configs if trained_step(dirs[name]) < configs[name].total_steps]
  cores = side_by_side_cores(device_count) if pending == ["base", "sr"] else None
  if cores is not None:
    switch = round(BASE_SHARE_BESIDE_SR * configs["base"].total_steps)
    jobs = {}
    try:
      for name, stage_cores, stop in (("base", cores[0], switch), ("sr", cores[1], None)):
        if trained_step(dirs[name]) < (stop or configs[name].total_steps):
          jobs[name] = start_training_process(name, *specs[name], dirs[name], stage_cores,
                                              configs[name].batch_size, stop)
      failed = {name: wait_for(job) for name, job in jobs.items()}
    except BaseException:
      for job in jobs.values():  # SIGTERM: each saves a checkpoint, which a rerun resumes
        job.terminate()
      for job in jobs.values():
        job.wait()
      raise
    failed = {name: rc for name, rc in failed.items() if rc}
    if failed:
      raise RuntimeError("demo: training " + ", ".join(
          f"the {name} stage exited with {rc}" for name, rc in failed.items())
                         + "; its output is above, prefixed with its name")
    lap("train_side_by_side")
  for name in configs:
    train_stage(configs[name], dirs[name])
    lap(f"train_{name}")


def eval_prompts(data_dir: str, num_prompts: int) -> list[dict[str, str]]:
  """The first `num_prompts` captions of each evaluation split, with the split named."""
  prompts = []
  for split in SPLITS:
    captions = sources.get_captions(sources.source_config("shapes", split, data_dir))
    prompts += [{"prompt": captions[i], "split": split}
                for i in range(min(num_prompts, len(captions)))]
  return prompts


def dataset_scores(data_dir: str, num_prompts: int) -> dict[str, dict[str, float]]:
  """The judge's scores on the dataset's own renders of the same prompts: the ceiling the
  samples are compared with (all-correct near 100%, background 0, the renders' edge IoU)."""
  records, images = [], []
  for split in SPLITS:
    source, info = sources.get_data_source(sources.source_config("shapes", split, data_dir))
    for i in range(min(num_prompts, len(source))):
      example = source[i]
      records.append({"prompt": sources.first_caption(example, info.caption_key)[0],
                      "split": split})
      images.append(preprocess.image_to_rgb(sources.lookup(example, info.image_key))[0])
  return judge.score_by_split(records, images, by_kind=True)


def sample_eval_prompts(stage_dirs: Sequence[str], prompts: list[dict[str, str]], outdir: str) -> list[dict]:
  cascade = cascade_lib.Cascade.from_workdirs(stage_dirs)
  return outdir_lib.sample_to_outdir(cascade, prompts, outdir,
                                     settings=cascade.default_settings(), batch_size=64,
                                     show_progress=False)


def score(outdir: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[np.ndarray],
                               list[dict[str, Any]]]:
  """(scores per split, records, images, each image's verdict) of the samples in `outdir`."""
  records, images = outdir_lib.read_samples(outdir)
  verdicts = judge.judge_records(records, images)
  return (judge.score_verdicts_by_split(records, verdicts, by_kind=True), records, images,
          verdicts)


def score_table(scores: dict[str, dict[str, float]],
                dataset: dict[str, dict[str, float]] | None = None) -> str:
  """The verdicts (percent) and picture measures per split; `dataset` rows (the renders'
  own scores) follow as `<split> (data)`."""
  header = (f"{'split':<24}{'n':>5}" + "".join(f"{a:>13}" for a in judge.ATTRIBUTES)
            + f"{'background':>12}{'bg_p99':>8}{'edge_iou':>10}")
  rows = []
  for suffix, table in (("", scores), (" (data)", dataset or {})):
    for split, s in table.items():
      rows.append(f"{split + suffix:<24}{s['n']:>5}"
                  + "".join(f"{s[a]:>13.1%}" for a in judge.ATTRIBUTES)
                  + f"{s['background']:>12.1f}{s['background_p99']:>8.1f}{s['edge_iou']:>10.3f}")
  return "\n".join([header, *rows])


def write_report(path: str, scores: dict[str, Any], records: list[dict[str, Any]],
                 images: list[np.ndarray], verdicts: list[dict[str, Any]],
                 timings: dict[str, float], dataset: dict[str, Any] | None = None) -> None:
  """A self-contained HTML page: the scores (beside the dataset renders' own), then per split
  every image over its prompt and verdict (`score`'s)."""

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
           f"<pre>{html.escape(score_table(scores, dataset))}</pre>",
           "<p>background: mean brightness (0-255) of the pixels away from every object, and "
           "its 99th percentile (bg_p99), per image; the renders' background is exactly 0. "
           "edge_iou: median over objects of the IoU with the best-fitting ideal shape.</p>",
           "<p>" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()) + "</p>"]
  for split in SPLITS:
    parts.append(f"<h2>{split}</h2>")
    for record, image, verdict in zip(records, images, verdicts):
      if record.get("split") != split:
        continue
      mark = ("<span class=ok>correct</span>" if verdict["all_correct"] else
              "<span class=bad>wrong: " + ", ".join(
                  a for a in judge.ATTRIBUTES[:-1] if not verdict[a]) + "</span>")
      mark += (f"<br>background {verdict['background']:.1f}, edge IoU "
               + ", ".join(f"{iou:.2f}" for iou in verdict["edge_ious"]))
      parts.append(f"<figure><img src='{data_uri(image)}' width=128 height=128>"
                   f"<figcaption>{html.escape(record['prompt'])}<br>{mark}</figcaption></figure>")
  fileio.write_text(path, "\n".join(parts))


def run(workdir: str, quick: bool = False, num_prompts: int | None = None) -> dict[str, Any]:
  """The whole demo; returns the scores per split (also in WORKDIR/scores.json)."""
  workdir = fileio.resolve(workdir)
  os.makedirs(workdir, exist_ok=True)
  default_prompts = 8 if quick else 100
  num_prompts = num_prompts or default_prompts
  timings = {}
  clock = time.perf_counter()

  def lap(name):
    nonlocal clock
    timings[name] = time.perf_counter() - clock
    clock = time.perf_counter()
    logging.info("demo: %s done in %.0f s", name, timings[name])

  configs = stage_configs(workdir, quick)
  if devices := use_every_core(configs):
    logging.info("demo: %d CPU devices, one per core (XLA_FLAGS or JAX_NUM_CPU_DEVICES overrides)",
                 devices)
  data_dir = build_data(workdir, quick)
  lap("data")
  prepare_text_encoders(configs)
  lap("text_encoder")
  train_stages(workdir, quick, devices, lap)
  stage_dirs = [os.path.join(workdir, name) for name in configs]
  # Another prompt count samples into a directory of its own: the trained stages are reused,
  # the default run's samples are kept.
  outdir = os.path.join(workdir, "samples" if num_prompts == default_prompts
                        else f"samples_{num_prompts}")
  sample_eval_prompts(stage_dirs, eval_prompts(data_dir, num_prompts), outdir)
  lap("sample")
  scores, records, images, verdicts = score(outdir)
  dataset = dataset_scores(data_dir, num_prompts)
  lap("score")
  fileio.write_text(os.path.join(workdir, "scores.json"), json.dumps(
      {"scores": scores, "dataset": dataset, "seconds": timings, "quick": quick}, indent=2))
  write_report(os.path.join(workdir, "report.html"), scores, records, images, verdicts, timings,
               dataset)
  print(score_table(scores, dataset))
  print(f"report: {os.path.join(workdir, 'report.html')}  ({sum(timings.values()):.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
  return scores
