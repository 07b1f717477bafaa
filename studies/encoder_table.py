"""Which text reading gives the demo's base stage its prompt understanding, over seeds.

    python -m studies.encoder_table --workdir=encoder_table --data_dir=demo_run/data \
        [--readings=tokens,final,pretrained,pretrained+embeddings] [--encoder_seeds=0,1,2] \
        [--train_seeds=0,1] \
        [--objective=span+neighbors] [--num_prompts=500] [--workers=2]

Readings of a frozen shapes encoder (`text/builtin.py`) by the demo's base stage
(configs/demo_base.py, its budget and settings, only the text changed):
- `tokens`: a random encoder's token embeddings (`text.output_layer=0`);
- `final`: the same random encoder's final layer (T5's output, as Imagen reads T5);
- `pretrained`: the final layer of the encoder pretrained on the grammar's text alone with
  `--objective` (held-out color-shape pairs are in the text, never in an image);
- `pretrained+embeddings`: that final layer with each token's own embedding appended
  (`text.append_token_embeddings`).
For `tokens` and `final` the encoder seed is the random weights' seed; for `pretrained` it is
the pretraining's seed (one set of starting weights, the builtin's). Each (reading, encoder
seed, training seed) arm is an ordinary `studies.demo_ablation` arm, trained and judged alone
at 32x32 on the demo's validation and held-out prompts plus more (`--num_prompts` per split),
one- and two-object prompts apart; `--workers` arms train at once, each on its own cores.
Prints every arm, then per reading the mean and the range over seeds, and a RESULT_JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from imagen_jax.core import partitioning
from imagen_jax.text import builtin
from imagen_jax.text import pretrain

_WORKDIR = flags.DEFINE_string("workdir", "encoder_table", "Where encoders and arms live.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The demo's shapes data (built by "
                                "`imagen-jax demo` or studies.demo_ablation).")
_READINGS = flags.DEFINE_list("readings", ["tokens", "final", "pretrained"], "Readings.")
_ENCODER_SEEDS = flags.DEFINE_list("encoder_seeds", ["0", "1", "2"], "Encoder seeds.")
_TRAIN_SEEDS = flags.DEFINE_list("train_seeds", ["0", "1"], "The base stage's seeds.")
_OBJECTIVE = flags.DEFINE_string("objective", builtin.PRETRAINING.objective,
                                 "Text pretraining objective (text.pretrain.OBJECTIVES).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 500, "Prompts per split.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Arms training at once, each on its own cores.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "More overrides for every arm (key=value ...).")

READINGS = ("tokens", "final", "pretrained", "pretrained+embeddings")
KINDS = ("validation", "heldout", "validation singles", "validation pairs", "heldout singles",
         "heldout pairs")


def encoder_dir(reading: str, seed: int) -> str:
  """The encoder of a reading and seed, written on first use."""
  pretrained = reading == "pretrained"
  name = f"pretrained-{_OBJECTIVE.value}-{seed}" if pretrained else f"random-{seed}"
  path = os.path.join(os.path.abspath(_WORKDIR.value), "encoders", name)
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    tmp = path + ".tmp"
    if pretrained:
      builtin.write_encoder(tmp, pretrain.PretrainConfig(seed=seed, objective=_OBJECTIVE.value))
    else:
      builtin.write_encoder(tmp, None, init_seed=builtin.SEED + seed)
    os.replace(tmp, path)
  return path


def arm_spec(reading: str, encoder_seed: int, train_seed: int) -> str:
  if reading not in READINGS:
    raise app.UsageError(f"--readings: unknown reading {reading!r}; use {', '.join(READINGS)}")
  layer = 0 if reading == "tokens" else -1
  append = reading == "pretrained+embeddings"
  encoder = encoder_dir("pretrained" if append else reading, encoder_seed)
  return (f"{reading}-e{encoder_seed}-t{train_seed}: text.encoder={encoder}"
          f" text.output_layer={layer} text.append_token_embeddings={append}"
          f" text.width={128 if append else 64} seed={train_seed} {_OVERRIDES.value}")


def run_worker(specs: list[str], cores: Sequence[int]) -> subprocess.Popen:
  command = [sys.executable, "-m", "studies.demo_ablation", f"--workdir={_WORKDIR.value}",
             f"--data_dir={_DATA_DIR.value}", f"--num_prompts={_NUM_PROMPTS.value}",
             *(f"--arm={spec}" for spec in specs)]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(len(cores)))
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
  finally:
    os.sched_setaffinity(0, before)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per reading: mean and range over its arms of each split's and kind's all-correct rate."""
  out = []
  for reading in _READINGS.value:
    mine = [r for r in rows if r["arm"].startswith(reading + "-")]
    if not mine:
      continue
    row = {"reading": reading, "arms": len(mine)}
    for kind in KINDS:
      values = [r[f"{kind}_all_correct"] for r in mine if f"{kind}_all_correct" in r]
      if values:
        row[kind] = (f"{100 * np.mean(values):.1f} ({100 * min(values):.0f}-"
                     f"{100 * max(values):.0f})")
    backgrounds = [r["heldout_background"] for r in mine]
    row["background"] = f"{np.mean(backgrounds):.1f}"
    out.append(row)
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top  # run from the repository
  if not _DATA_DIR.value:
    raise app.UsageError("--data_dir: the demo's shapes data (e.g. demo_run/data)")
  specs = [arm_spec(reading, int(e), int(t)) for reading in _READINGS.value
           for e in _ENCODER_SEEDS.value for t in _TRAIN_SEEDS.value]
  cores = sorted(os.sched_getaffinity(0))
  workers = max(1, min(_WORKERS.value, len(cores), len(specs)))
  share = max(1, len(cores) // workers)
  procs = [run_worker(specs[w::workers], cores[w * share:(w + 1) * share])
           for w in range(workers)]
  rows = []
  for proc in procs:
    out, _ = proc.communicate()
    for line in out.splitlines():
      if line.startswith("RESULT_JSON "):
        rows += json.loads(line[len("RESULT_JSON "):])["rows"]
    if proc.returncode:
      raise RuntimeError(f"an arm worker exited with {proc.returncode}")
  harness.report("encoder_table_arms", rows)
  harness.report("encoder_table", summarize(rows), extra={
      "objective": _OBJECTIVE.value, "num_prompts": _NUM_PROMPTS.value,
      "cores": partitioning.cpu_cores()})


if __name__ == "__main__":
  app.run(main)
