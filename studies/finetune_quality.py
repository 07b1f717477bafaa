"""Teaching a trained shapes cascade a new word: LoRA vs full fine-tuning, with and without
class-prior preservation.

    imagen-jax demo --workdir=demo_run        # a trained cascade (any shapes cascade will do)
    python -m studies.finetune_quality --workdir=demo_run [--arms=lora,lora_prior,full] \
        [--steps=400] [--num_prompts=100] [--samples_per_cell=4]

The subject: 8 images of a yellow triangle, one per 3x3 cell but the bottom right, captioned
"a blicket at the <cell>" (`shapes.write_subject_folder`). "blicket" is a word the builtin
tokenizer never saw (it is spelled in pieces and bytes), and a yellow triangle is a held-out
pair: no training image of the base shows one. Each arm fine-tunes the base stage with
`imagen-jax finetune`'s defaults (the `finetune` variant; full fine-tuning at --full_lr) into
WORKDIR/finetune/<arm> (reused when finished), then samples "a blicket at the <cell>" for all 9
cells through the arm's base stage and the cascade's SR stage; the shapes judge reads each
image as if the prompt said "a yellow triangle at the <cell>". The 9th cell was never shown.
Prior preservation's question, what the fine-tuning cost elsewhere, is answered by the demo's
100 validation and 100 held-out prompts before (the base) and after. Every sample is an
ordinary outdir, so an interrupted benchmark resumes. Prints a table and a JSON line.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "demo_run", "The demo's workdir: base/, sr/, data/.")
_ARMS = flags.DEFINE_list("arms", ["lora", "lora_prior", "full", "full_prior"],
                          "lora, lora_prior, full, full_prior.")
_STEPS = flags.DEFINE_integer("steps", 400, "Fine-tuning steps (total_steps).")
_FULL_LR = flags.DEFINE_float("full_lr", 2e-4, "Full fine-tuning's learning rate (LoRA's is "
                              "the variant's optimizer.lr).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 100, "Validation and held-out prompts each.")
_SAMPLES_PER_CELL = flags.DEFINE_integer("samples_per_cell", 4, "Blicket images per cell.")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke test: the demo's quick variant, 4 steps.")

WORD = "blicket"
HELD_OUT_CELL = (2, 2)


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import demo  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import finetune as finetune_run  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes_grammar as grammar  # pylint: disable=g-import-not-at-top
  from imagen_jax.models import lora  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(_WORKDIR.value)
  base, sr, data_dir = (os.path.join(workdir, d) for d in ("base", "sr", "data"))
  root = os.path.join(workdir, "finetune")
  subject = os.path.join(root, "subject")
  cells = list(grammar.POSITIONS)
  shapes.write_subject_folder(subject, grammar.Obj("yellow", "triangle"), WORD,
                              [c for c in cells if c != HELD_OUT_CELL])
  blicket_prompts = [{"prompt": f"a {WORD} at the {grammar.POSITIONS[c]}", "cell": list(c)}
                     for c in cells]
  eval_prompts = demo.eval_prompts(data_dir, _NUM_PROMPTS.value)
  variant = "quick" if _QUICK.value else "full"

  rows = [dict(arm="base (no fine-tuning)", **evaluate(base, sr, os.path.join(root, "base"),
                                                      blicket_prompts, eval_prompts))]
  print(rows[-1], flush=True)
  for arm in _ARMS.value:
    method, prior = arm.split("_")[0], arm.endswith("_prior")
    overrides = {"data.source": f"folder:{subject}", "data.data_dir": os.path.join(root, "tfds"),
                 "finetune.base": base, "finetune.method": method,
                 "total_steps": 4 if _QUICK.value else _STEPS.value}
    if method == "full":
      overrides["optimizer.lr"] = _FULL_LR.value
    if prior:
      overrides["finetune.prior_class"] = "a triangle"
    config = config_lib.load_config(f"configs/demo_base.py:{variant},finetune", overrides)
    arm_dir = os.path.join(root, arm)
    start = time.perf_counter()
    if not os.path.isdir(arm_dir) or checkpoints.Checkpointer(
        arm_dir, read_only=True).latest_step() != config.total_steps:
      finetune_run.run(config, arm_dir)  # class images (prior arms), then the training loop
    train_seconds = time.perf_counter() - start
    ckpt = checkpoints.Checkpointer(arm_dir, read_only=True)
    step_dir = os.path.join(arm_dir, "checkpoints", str(ckpt.latest_step()))
    state = ckpt.restore_as_stored(ckpt.latest_step())["state"]
    row = {"arm": arm, "train_s": round(train_seconds),
           "trained_params": lora.count(state["params"]),
           "checkpoint_mib": round(directory_bytes(step_dir) / 2**20, 2),
           **evaluate(arm_dir, sr, os.path.join(arm_dir, "eval"), blicket_prompts, eval_prompts)}
    print(row, flush=True)
    rows.append(row)
  harness.report("finetune_quality", rows, extra={
      "workdir": workdir, "steps": _STEPS.value, "samples_per_cell": _SAMPLES_PER_CELL.value,
      "num_prompts": _NUM_PROMPTS.value, "held_out_cell": list(HELD_OUT_CELL)})


def evaluate(stage: str, sr: str, outroot: str, blicket_prompts, eval_prompts) -> dict:
  """The blicket rate (all cells, the cell never shown) and all-correct on the demo's prompts,
  through `stage` (a base or LoRA workdir) and the SR stage."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import demo  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import shapes as judge  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  cascade = cascade_lib.Cascade.from_workdirs([stage, sr])
  settings = cascade.default_settings()
  blicket_dir = os.path.join(outroot, "blicket")
  records = outdir_lib.sample_to_outdir(
      cascade, blicket_prompts, blicket_dir, num_samples=_SAMPLES_PER_CELL.value,
      settings=settings, batch_size=100, show_progress=False)
  verdicts = [judge.judge(outdir_lib.read_image(blicket_dir, r),
                          r["prompt"].replace(WORD, "yellow triangle")) for r in records]
  correct = np.array([v["all_correct"] for v in verdicts], float)
  unseen = np.array([tuple(r["cell"]) == HELD_OUT_CELL for r in records])
  eval_dir = os.path.join(outroot, "prompts")
  outdir_lib.sample_to_outdir(cascade, eval_prompts, eval_dir, settings=settings,
                              batch_size=100, show_progress=False)
  scores = demo.score(eval_dir)[0]
  return {"blicket": round(float(correct.mean()), 3),
          "blicket_unseen_cell": round(float(correct[unseen].mean()), 3),
          "blicket_color": round(float(np.mean([v["color"] for v in verdicts])), 3),
          "blicket_shape": round(float(np.mean([v["shape"] for v in verdicts])), 3),
          **{f"{split}_all_correct": s["all_correct"] for split, s in scores.items()}}


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


if __name__ == "__main__":
  app.run(main)
