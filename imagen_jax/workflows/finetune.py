"""Fine-tuning a trained stage on a subject (`imagen-jax finetune`): check, sample the class
images, train.

    finetune.run(config, "blicket")   # a stage config's `finetune` variant, finetune.base set

The run is the ordinary training loop (`train.train_and_evaluate`: resumable, sharded, logged)
with the config's fine-tuning plan (`train/plan.py`), which checks the base stage, the network
against its parameters and the subject data once, before any compute. With
`finetune.prior_class`, DreamBooth's class images come first: `prior_images` samples of the class
prompt from the base stage into WORKDIR/prior/N (an ordinary, resumable sampling outdir plus the
captions.jsonl that makes it a `folder:` source, written last).
"""

from __future__ import annotations

import json

from absl import logging
import jax
import ml_collections

from imagen_jax.core import config_lib
from imagen_jax.core import distributed
from imagen_jax.core import fileio
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib
from imagen_jax.train import plan as plan_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import train


def run(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Fine-tunes config.finetune.base on config.data.source into `workdir`; the final state."""
  if plan_lib.Plan.from_config(config).method == "none":
    raise config_lib.ConfigError(
        "config.finetune.method='none' trains from scratch: fine-tune with the stage config's "
        "`finetune` variant (e.g. --config=configs/demo_base.py:finetune), which sets LoRA and "
        "fine-tuning's training values, or set --config.finetune.method=lora|full")

  def sample_prior(checked: ml_collections.ConfigDict, plan: plan_lib.Plan) -> None:
    if plan.uses_prior:
      sample_prior_images(checked, workdir)

  return train.train_and_evaluate(config, workdir, before_data=sample_prior)


def sample_prior_images(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples `finetune.prior_images` images of `finetune.prior_class` from the base stage
  (config.finetune.base at base_step) into `plan.prior_folder` and lists them in its
  captions.jsonl; an interrupted run samples only the rest. Process 0 samples; the others wait.
  Returns the folder."""
  ft = config.finetune
  folder = plan_lib.prior_folder(config, workdir)
  captions = plan_lib.prior_captions(config, workdir)
  if jax.process_index() == 0 and not fileio.exists(captions):
    cascade = cascade_lib.Cascade.from_workdirs([ft.base], steps=[int(ft.base_step)])
    logging.info("Sampling %d class images of %r from %s into %s", ft.prior_images,
                 ft.prior_class, ft.base, folder)
    records = outdir_lib.sample_to_outdir(
        cascade, [{"prompt": ft.prior_class}], folder, num_samples=int(ft.prior_images),
        seed=plan_lib.prior_seed(config),
        settings=cascade.default_settings(), show_progress=False)
    fileio.write_text(captions, "".join(json.dumps({"file": r["file"], "caption": r["prompt"]})
                                        + "\n" for r in records))
  distributed.barrier("finetune_prior_sampled")
  return folder
