"""Quality per network evaluation: a stage's samplers on a trained shapes cascade.

    imagen-jax demo --workdir=demo_run          # the trained cascade (or any shapes cascade)
    python -m studies.sampler_quality --workdir=demo_run \
        --samplers=ddpm,ddim,edm_heun,dpmpp_2m,dpmpp_3m,unipc --evals=5,10,15,25,50 \
        [--guidance_interval=0.28:5.42] [--spacing=time] [--stage=sr]

For every (sampler, evaluations) the cascade samples the demo's validation and held-out prompts
(`demo.eval_prompts`, the demo's seeds) with one stage's sampler and step count changed (the base
stage's, or with --stage=sr the SR stage's) and the other stage at its configured settings, and
the shapes judge scores the 64x64 pixels (`demo.score`). The judge's verdicts saturate early on a
well-trained cascade, so each deterministic sampler's images are also compared with the
converged solution of the same ODE from the same noise (`--reference`, DPM-Solver++ 3M at 200
time-uniform steps): the PSNR of the final 64x64 images, which falls as a solver's
discretization error grows (DDPM and SDE samplers draw fresh noise and converge to other images:
no PSNR). "evals" counts the stage network's evaluations per image (EDM Heun takes 2 steps - 1,
so it gets the largest step count within the budget); "passes" counts forward passes with
guidance's unconditional half (fewer with a guidance interval). Every run is an ordinary
sampling outdir under WORKDIR/sampler_quality/, so an interrupted benchmark resumes. Prints a
table and a JSON line.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", "demo_run", "A trained demo workdir (base/ and sr/).")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddpm", "ddim", "edm_heun", "dpmpp_2m", "dpmpp_3m",
                                           "unipc"], "Base-stage samplers to compare.")
_EVALS = flags.DEFINE_list("evals", ["5", "10", "15", "25", "50"],
                           "Network evaluations per image of the base stage.")
_DDPM_EXTRA = flags.DEFINE_list("ddpm_extra_evals", ["100"], "More budgets for ddpm alone.")
_INTERVAL = flags.DEFINE_string("guidance_interval", "all",
                                "LO:HI (EDM sigma) for the base stage, or 'all'.")
_SPACING = flags.DEFINE_string("spacing", "time", "Step spacing of that stage: time, logsnr.")
_STAGE = flags.DEFINE_enum("stage", "base", ["base", "sr"],
                           "The stage whose sampler varies; the other keeps its config's.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 100, "Prompts per split.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images sampled together.")
_REFERENCE = flags.DEFINE_string(
    "reference", "dpmpp_3m:200", "SAMPLER:STEPS of the converged ODE solution the deterministic "
    "samplers' images are compared with (PSNR), or '' for none.")


STOCHASTIC = ("ddpm", "dpmpp_sde")


def steps_for(sampler: str, evals: int) -> int:
  """The step count that spends at most `evals` evaluations (EDM Heun: 2 steps - 1)."""
  return max(1, (evals + 1) // 2) if sampler == "edm_heun" else evals


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import demo  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  stage_dirs = [os.path.join(workdir, "base"), os.path.join(workdir, "sr")]
  cascade = cascade_lib.Cascade.from_workdirs(stage_dirs)
  prompts = demo.eval_prompts(os.path.join(workdir, "data"), _NUM_PROMPTS.value)
  interval = outdir_lib.parse_interval(_INTERVAL.value)
  runs = [(s, steps_for(s, int(e)), _SPACING.value) for s in _SAMPLERS.value for e in _EVALS.value]
  runs += [("ddpm", int(e), _SPACING.value) for e in _DDPM_EXTRA.value
           if "ddpm" in _SAMPLERS.value]
  reference = None
  if _REFERENCE.value:
    sampler, steps = _REFERENCE.value.split(":")
    reference = (sampler, int(steps), "time")
    runs.insert(0, reference)
  k = {"base": 0, "sr": 1}[_STAGE.value]  # the stage whose sampler varies
  default = cascade.default_settings()
  rows, reference_images = [], None
  for sampler, steps, spacing in runs:
    chosen = outdir_lib.stage_settings(
        cascade, sampler=[sampler if i == k else d.sampler for i, d in enumerate(default)],
        steps=[str(steps if i == k else d.steps) for i, d in enumerate(default)],
        spacing=[spacing if i == k else d.spacing for i, d in enumerate(default)],
        guidance_interval=[_INTERVAL.value if i == k else "all" for i in range(len(default))])
    stage = chosen[k]
    name = f"{'sr_' if k else ''}{sampler}_{steps}_{spacing}" + (
        f"_gi{interval[0]:g}-{interval[1]:g}" if interval else "")
    outdir = os.path.join(workdir, "sampler_quality", name)
    start = time.perf_counter()
    outdir_lib.sample_to_outdir(cascade, prompts, outdir, settings=chosen,
                                batch_size=_BATCH.value, show_progress=False)
    seconds = time.perf_counter() - start
    scores, _, images, _ = demo.score(outdir)
    if (sampler, steps, spacing) == reference:
      reference_images = np.stack(images).astype(np.float64)
    psnr = None
    if reference_images is not None and samplers.parse_sampler(sampler)[0] not in STOCHASTIC:
      mse = np.mean((np.stack(images) - reference_images) ** 2, axis=(1, 2, 3))
      psnr = round(float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))), 2)
    log_snr_fn = schedules.stage_log_snr_fn(cascade.stages[k].config.diffusion)
    row = {"stage": _STAGE.value, "sampler": sampler, "steps": steps, "spacing": spacing,
           "evals": samplers.network_evaluations(sampler, steps, log_snr_fn, guided=False,
                                                  spacing=spacing),
           "passes": stage.network_evaluations(log_snr_fn),
           "guidance_interval": list(interval), "seconds": round(seconds, 1),
           "psnr_vs_reference": psnr}
    for split, s in scores.items():
      row[f"{split}_all_correct"] = s["all_correct"]
      row[f"{split}_shape"] = s["shape"]
      row[f"{split}_background"] = round(s["background"], 2)
      row[f"{split}_edge_iou"] = round(s["edge_iou"], 3)
    print(row, flush=True)
    rows.append(row)
  harness.report("sampler_quality", rows, extra={"workdir": workdir})


if __name__ == "__main__":
  app.run(main)
