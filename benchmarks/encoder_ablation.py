"""Imagen's key finding in miniature: a frozen random vs a text-pretrained text encoder.

    python -m benchmarks.encoder_ablation --workdir=ablation [--data_dir=demo_run/data] \
        [--encoders=builtin:shapes-tiny,builtin:shapes-tiny-pretrained] [--quick]

For each encoder the demo's base stage (`configs/demo_base.py`, its seeds and budget; only
`text.encoder` changes) trains in WORKDIR/base_<encoder>, or is reused when its last checkpoint
is there; then it samples the demo's 100 validation and 100 held-out prompts (UniPC, 15
log-SNR steps, the demo's setting) and the shapes judge scores its own 32x32 images (the base
stage alone: an SR stage is tied to the encoder it trained with). Held-out prompts each use a
color-shape pair no training image shows; `builtin:shapes-tiny-pretrained` has read every pair
in text (`text.pretrain`). Prints a table and a JSON line.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "ablation", "Where the arms train and sample.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The demo's shapes data (default "
                                "WORKDIR/data, built there if missing).")
_ENCODERS = flags.DEFINE_list("encoders", ["builtin:shapes-tiny", "builtin:shapes-tiny-pretrained"],
                              "Text encoders to compare.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 100, "Prompts per split.")
_QUICK = flags.DEFINE_bool("quick", False, "The demo's quick variant (a smoke test).")


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax import demo  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  data_dir = _DATA_DIR.value or os.path.join(workdir, "data")
  if not _DATA_DIR.value:
    shapes.build(data_dir, 64, num_examples=demo.QUICK_SHAPES if _QUICK.value
                 else demo.FULL_SHAPES)
  prompts = demo.eval_prompts(data_dir, _NUM_PROMPTS.value)
  rows = []
  for encoder in _ENCODERS.value:
    arm = os.path.join(workdir, "base_" + encoder.split(":")[-1])
    config = config_lib.load_config(
        f"configs/demo_base.py:{'quick' if _QUICK.value else 'full'}",
        {"data.data_dir": data_dir, "text.encoder": encoder})
    start = time.perf_counter()
    demo.train_stage(config, arm)
    train_seconds = time.perf_counter() - start
    cascade = cascade_lib.Cascade.from_workdirs([arm])
    settings = outdir_lib.stage_settings(cascade, sampler=["unipc"], steps=["15"],
                                         spacing=["logsnr"])
    outdir = os.path.join(arm, "samples_unipc15")
    outdir_lib.sample_to_outdir(cascade, prompts, outdir, settings=settings, batch_size=100,
                                show_progress=False)
    scores = demo.score(outdir)[0]
    row = {"encoder": encoder, "train_s": round(train_seconds)}
    for split, s in scores.items():
      for key in ("all_correct", "color", "shape", "position"):
        row[f"{split}_{key}"] = s[key]
    print(row, flush=True)
    rows.append(row)
  harness.report("encoder_ablation", rows, extra={"workdir": workdir,
                                                   "num_prompts": _NUM_PROMPTS.value})


if __name__ == "__main__":
  app.run(main)
