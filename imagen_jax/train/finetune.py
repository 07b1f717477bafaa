"""Fine-tuning a trained stage: full or LoRA, with DreamBooth's class-prior preservation.

    imagen-jax finetune --config=configs/demo_base.py --base=demo_run/base --workdir=blicket \
        --config.data.source=folder:subject --config.finetune.prior_class="a triangle"

is the ordinary training loop (`train.train_and_evaluate`: resumable, sharded, logged) with
`config.finetune` set: `finetune_config` puts the fine-tuning values (steps, learning rate,
batch) in place of the stage's own, `prepare` checks the base stage and samples the class
images, and the loop starts from the base's parameters:
- method "full": every parameter, from the base's EMA parameters, with a fresh optimizer;
- method "lora": the base's EMA parameters frozen (outside the train state: no optimizer state,
  not checkpointed) and adapters trained (`models/lora.py`); the workdir's checkpoints hold the
  adapters, and their config names the base workdir and step that sampling merges them into.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.models import lora

PRIOR_DIR = "prior"


class FinetuneError(ValueError):
  """A fine-tuning run that cannot start: the message names the workdir, folder or parameter."""


def method(config: ml_collections.ConfigDict) -> str:
  """config.finetune.method: "none" (train from scratch), "full" or "lora"."""
  try:
    return lora.finetune_method(config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def uses_prior(config: ml_collections.ConfigDict) -> bool:
  return method(config) != "none" and bool(config.finetune.prior_class)


@dataclasses.dataclass(frozen=True)
class Base:
  """The trained stage a run starts from: its workdir and checkpoint step."""
  workdir: str
  step: int


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config `imagen-jax finetune` trains: the stage's, with `finetune.*`'s training values
  (steps, constant learning rate after warm-up, Adam, batch) and LoRA as the default method.

  Captions are encoded on the fly (the stage's embedding cache holds its own dataset's).
  """
  c = config_lib.from_json(config_lib.to_json(config))
  ft = c.finetune
  if ft.method == "none":
    ft.method = "lora"
  c.total_steps = int(ft.steps)
  c.optimizer.name = "adam"
  c.optimizer.lr = float(ft.lr)
  c.optimizer.warmup_steps = int(ft.warmup_steps)
  c.optimizer.schedule = "constant"
  c.optimizer.grad_accum_steps = 1
  if ft.batch_size > 0:
    c.batch_size = int(ft.batch_size)
  c.log_every = min(c.log_every, max(c.total_steps // 10, 1))
  c.checkpoint_every = min(c.checkpoint_every, c.total_steps)
  c.sample_every = 0
  c.data.embed_cache = ""
  return c


def resolve_base(config: ml_collections.ConfigDict) -> Base:
  """The base workdir (resolved) and step (finetune.base_step, or the latest); errors name them."""
  ft = config.finetune
  if not ft.base:
    raise FinetuneError(f"config.finetune.method={ft.method!r} starts from a trained stage: "
                        "give its workdir (--base=WORKDIR or --config.finetune.base=WORKDIR)")
  workdir = fileio.resolve(str(ft.base))
  steps = checkpoints.Checkpointer(workdir, read_only=True).all_steps() if fileio.exists(
      str(checkpoints.checkpoint_dir(workdir))) else []
  if not steps:
    raise FinetuneError(f"base workdir {ft.base!r} has no complete checkpoint (looked in "
                        f"{checkpoints.checkpoint_dir(workdir)}): train that stage first")
  step = max(steps) if ft.base_step < 0 else int(ft.base_step)
  if step not in steps:
    raise FinetuneError(f"base workdir {ft.base!r} has no checkpoint at step {step} "
                        f"(config.finetune.base_step); it has {sorted(steps)}")
  return Base(workdir, step)


def check_matches_base(config: ml_collections.ConfigDict, base: Base) -> None:
  """Raises FinetuneError naming the first text setting (encoder, width, max_length,
  output_layer) in which `config` differs from the base's training config, else the first
  parameter of `config`'s network that the base checkpoint lacks or holds with another shape
  (or the first it has that the network lacks)."""
  from imagen_jax import text  # pylint: disable=g-import-not-at-top
  base_config, _ = checkpoints.restore_config(base.workdir, base.step)
  if difference := text.text_difference(config.text, base_config.text):
    key, mine, theirs = difference
    raise FinetuneError(
        f"the config says text.{key}={mine!r} but the base stage {base.workdir} (step "
        f"{base.step}) was trained with {theirs!r}: its network reads other text embeddings. "
        "Fine-tune with the base's own text settings.")
  expected = _flat_shapes(nn.unbox(models.param_shapes(config)))
  stored = checkpoints.Checkpointer(base.workdir, read_only=True).param_shapes(base.step)
  for name in sorted(expected.keys() | stored.keys()):
    if expected.get(name) != stored.get(name):
      raise FinetuneError(
          f"the config's network does not match the base stage {base.workdir} (step "
          f"{base.step}): parameter {name} is {_describe(expected.get(name))} in the config "
          f"and {_describe(stored.get(name))} in the checkpoint. Fine-tune with the base's own "
          f"config file and model variant.")


def restore_base_params(base: Base, abstract_params: Any) -> Any:
  """The base's EMA parameters laid out on the shardings of `abstract_params`."""
  ckpt = checkpoints.Checkpointer(base.workdir, read_only=True)
  return ckpt.restore_params(base.step, abstract_params, "ema_params")


def prepare(config: ml_collections.ConfigDict, workdir: str, require_prior: bool = True
            ) -> ml_collections.ConfigDict:
  """Checks the base stage against the config, the subject data and the class images
  (`require_prior`: they must be sampled already), and fixes the base step in the config.

  Returns the config the run trains (finetune.base resolved, base_step fixed). A resumed run
  keeps the base step its checkpoints were trained on. Every problem is reported here, before
  anything is compiled.
  """
  if method(config) == "none":
    return config
  config = config_lib.from_json(config_lib.to_json(config))
  stored = _stored_config(workdir)
  if stored is not None and method(stored) != "none" and config.finetune.base_step < 0:
    config.finetune.base_step = stored.finetune.base_step  # resume on the same base
  base = resolve_base(config)
  check_matches_base(config, base)
  config.finetune.base, config.finetune.base_step = base.workdir, base.step
  lora.stage_spec(config)  # a bad rank or layer list fails here
  check_subject(config)
  if uses_prior(config):
    check_prior(config)
    if require_prior and not fileio.exists(prior_captions(config, workdir)):
      raise FinetuneError(
          f"config.finetune.prior_class={config.finetune.prior_class!r} needs its class images "
          f"in {prior_folder(config, workdir)}: `imagen-jax finetune` samples them from the base "
          f"stage first (imagen_jax.workflows.finetune.run)")
  return config


def check_subject(config: ml_collections.ConfigDict) -> None:
  """Converts the subject's source now and raises SourceError if it has no usable example."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top
  data_source, info = sources.get_data_source(config.data)
  sources.check_not_empty(data_source, info)
  logging.info("Fine-tuning on %d examples of %s", len(data_source), config.data.source)


def check_prior(config: ml_collections.ConfigDict) -> None:
  """Class-prior preservation samples from a base stage, at least one image, weight >= 0."""
  ft = config.finetune
  if config.stage != "base":
    raise FinetuneError("class-prior preservation samples class images from a base stage; "
                        f"this is a {config.stage!r} stage: leave config.finetune.prior_class "
                        "empty (SR stages fine-tune on the subject alone)")
  if ft.prior_images < 1 or ft.prior_weight < 0:
    raise FinetuneError(f"config.finetune.prior_images={ft.prior_images} must be >= 1 and "
                        f"prior_weight={ft.prior_weight} >= 0")


def prior_folder(config: ml_collections.ConfigDict, workdir: str) -> str:
  """WORKDIR/prior/N: the class images (named by their count, so a run asking for another
  count samples and converts a dataset of its own)."""
  return fileio.join(fileio.resolve(workdir), PRIOR_DIR, str(int(config.finetune.prior_images)))


def prior_captions(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The class images' captions.jsonl: written last, so the folder is complete once it exists."""
  return fileio.join(prior_folder(config, workdir), "captions.jsonl")


def _stored_config(workdir: str) -> ml_collections.ConfigDict | None:
  if not fileio.exists(str(checkpoints.checkpoint_dir(workdir))):
    return None
  try:
    return checkpoints.restore_config(workdir)[0]
  except FileNotFoundError:
    return None


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in leaves}


def _describe(shape: tuple[int, ...] | None) -> str:
  return "absent" if shape is None else f"shaped {shape}"


def make_data(config: ml_collections.ConfigDict, workdir: str, tokenize_fn: Any = None,
              embedding_lookup: Any = None) -> Any:
  """The run's input pipeline: the stage's own, or with class-prior preservation a `Mixture`
  of the subject's examples and the class images, half the batch each (DreamBooth's batches),
  the class examples' loss weighted by `finetune.prior_weight`."""
  from imagen_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if not uses_prior(config):
    return pipeline_lib.make_pipeline(config, tokenize_fn=tokenize_fn,
                                      embedding_lookup=embedding_lookup)
  if config.batch_size % 2:
    raise FinetuneError(f"class-prior preservation fills half of each batch with class images: "
                        f"config.batch_size={config.batch_size} must be even")
  if config.data.embed_cache:
    raise FinetuneError("class-prior preservation encodes the class images' captions on the fly: "
                        f"clear config.data.embed_cache={config.data.embed_cache!r}")
  instance = config_lib.from_json(config_lib.to_json(config))
  instance.batch_size = config.batch_size // 2
  prior = config_lib.from_json(config_lib.to_json(instance))
  folder = prior_folder(config, workdir)
  prior.data.update(source=f"folder:{folder}", data_dir=fileio.join(folder, "tfds"),
                    split="train", image_key="image", caption_key="caption",
                    min_resolution=0, random_crop=False)
  prior.seed = int(config.seed) + 1  # its own shuffle
  parts = [pipeline_lib.make_pipeline(c, tokenize_fn=tokenize_fn) for c in (instance, prior)]
  return pipeline_lib.Mixture(parts, [1.0, float(config.finetune.prior_weight)])
