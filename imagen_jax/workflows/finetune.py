"""Fine-tuning a trained stage on a subject (`imagen-jax finetune`): check, sample the class
images, train.

    finetune.run(config, "blicket")   # config: a stage config with config.finetune.base set

1. `finetune_config`: the stage's config with `finetune.*`'s training values (LoRA by default);
2. `train.finetune.prepare`: the base stage, the network against its parameters and the subject
   data checked before any compute;
3. with `finetune.prior_class`, DreamBooth's class images: `prior_images` samples of the class
   prompt from the base stage into WORKDIR/prior/N (an ordinary, resumable sampling outdir plus
   the captions.jsonl that makes it a `folder:` source, written last);
4. the ordinary training loop (`train.train_and_evaluate`), resumable like any run.
"""

from __future__ import annotations

import json

from absl import logging
import jax
import ml_collections

from imagen_jax.core import distributed
from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.train import finetune as finetune_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import train


def run(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Fine-tunes config.finetune.base on config.data.source into `workdir`; the final state."""
  config = finetune_lib.finetune_config(config)
  # Everything the run would refuse, before the class images are sampled.
  train.check_config(config, partitioning.make_mesh(config.mesh))
  checked = finetune_lib.prepare(config, workdir, require_prior=False)
  if finetune_lib.uses_prior(checked):
    sample_prior(checked, workdir)
  return train.train_and_evaluate(config, workdir)


def sample_prior(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples `finetune.prior_images` images of `finetune.prior_class` from the base stage
  (config.finetune.base at base_step) into `train.finetune.prior_folder` and lists them in its
  captions.jsonl; an interrupted run samples only the rest. Process 0 samples; the others wait.
  Returns the folder."""
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  ft = config.finetune
  folder = finetune_lib.prior_folder(config, workdir)
  captions = finetune_lib.prior_captions(config, workdir)
  if jax.process_index() == 0 and not fileio.exists(captions):
    cascade = cascade_lib.Cascade.from_workdirs([ft.base], steps=[int(ft.base_step)])
    logging.info("Sampling %d class images of %r from %s into %s", ft.prior_images,
                 ft.prior_class, ft.base, folder)
    records = outdir_lib.sample_to_outdir(
        cascade, [{"prompt": ft.prior_class}], folder, num_samples=int(ft.prior_images),
        seed=int(config.seed), settings=cascade.default_settings(), show_progress=False)
    fileio.write_text(captions, "".join(json.dumps({"file": r["file"], "caption": r["prompt"]})
                                        + "\n" for r in records))
  distributed.barrier("finetune_prior_sampled")
  return folder
