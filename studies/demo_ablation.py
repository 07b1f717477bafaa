"""Ablations of the demo's base stage: one training run per arm, judged alone at 32x32.

    python -m studies.demo_ablation --workdir=ablation [--data_dir=demo_run/data] \
        --arm="demo:" \
        --arm="pooled: model.text_pooling=True" [--quick]

Each arm is a name and config overrides separated by spaces (`key=value`, the value a Python
literal or else a string) applied to `configs/demo_base.py` (its seeds and budget). The arm trains
in WORKDIR/base_<name>, or is reused when its last checkpoint is there; then it samples the
demo's 100 validation and 100 held-out prompts with the config's own sampler and the shapes judge
scores its 32x32 images (the base stage alone: an SR stage is tied to the base's text encoder, and
what fails is decided here). Held-out prompts each use a color-shape pair no training image shows.
The run-to-run spread of one arm at 100 prompts is several points (RESULTS.md): read differences
smaller than that as none. Prints a table and a JSON line.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from imagen_jax.core import config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (the tests import `parse_arm` beside the CLI's
  own flags, which share names such as --workdir)."""
  flags.DEFINE_string("workdir", "ablation", "Where the arms train and sample.")
  flags.DEFINE_string("data_dir", None, "The demo's shapes data (default WORKDIR/data, built "
                      "there if missing).")
  flags.DEFINE_multi_string("arm", ["demo:"], "NAME: key=value key=value ... (overrides of "
                            "configs/demo_base.py).")
  flags.DEFINE_integer("num_prompts", 100, "Prompts per split.")
  flags.DEFINE_bool("quick", False, "The demo's quick variant (a smoke test).")


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
  """'nopool: model.text_pooling=False optimizer.lr=1e-3' -> ('nopool', {...: False, ...: 1e-3})."""
  name, sep, rest = spec.partition(":")
  if not sep or not name.strip() or "/" in name:
    raise ValueError(f"arm {spec!r}: write NAME: key=value key=value ...")
  overrides = {}
  for item in rest.split():
    key, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"arm {name!r}: override {item!r} is not key=value")
    overrides[key] = config_lib.parse_value(text)  # text.encoder=builtin:shapes-tiny: a string
  return name.strip(), overrides


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import demo  # pylint: disable=g-import-not-at-top
  arms = [parse_arm(spec) for spec in FLAGS.arm]  # every arm's spelling checked before training
  workdir = FLAGS.workdir
  data_dir = FLAGS.data_dir or os.path.join(workdir, "data")
  variant = "quick" if FLAGS.quick else "full"
  configs = [config_lib.load_config(f"configs/demo_base.py:{variant}",
                                    {"data.data_dir": data_dir, **overrides})
             for _, overrides in arms]
  demo.use_every_core({name: config for (name, _), config in zip(arms, configs)})  # as the demo
  if not FLAGS.data_dir:
    demo.build_data(workdir, FLAGS.quick)
  prompts = demo.eval_prompts(data_dir, FLAGS.num_prompts)
  rows = []
  for (name, overrides), config in zip(arms, configs):
    arm = os.path.join(workdir, "base_" + name)
    start = time.perf_counter()
    demo.train_stage(config, arm)
    train_seconds = time.perf_counter() - start
    outdir = os.path.join(arm, "samples")
    demo.sample_eval_prompts([arm], prompts, outdir)  # the config's own sampler, as the demo samples
    scores = demo.score(outdir)[0]
    row = {"arm": name, "overrides": " ".join(f"{k}={v!r}" for k, v in overrides.items()),
           "train_s": round(train_seconds)}
    for split, s in scores.items():
      for key in ("all_correct", "color", "shape", "position", "background", "edge_iou"):
        row[f"{split}_{key}"] = round(s[key], 3)
    print(row, flush=True)
    rows.append(row)
  harness.report("demo_ablation", rows, extra={"workdir": workdir,
                                               "num_prompts": FLAGS.num_prompts})


if __name__ == "__main__":
  define_flags()
  app.run(main)
