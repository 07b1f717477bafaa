"""What a run trains and where it starts: a stage from scratch, or fine-tuning a trained one.

    plan = Plan.from_config(config)                       # no I/O: sampling asks it too
    config, plan = prepare(config, workdir)               # training: checks, once, before compute
    shapes = plan.trainable_shapes(config, model)         # boxed: the network's, or LoRA adapters
    params = plan.initial_trainable(config, model, abstract_network)   # how a fresh run starts
    frozen = plan.frozen_base(abstract_network)           # what the step reads but never updates
    apply_fn = plan.apply_fn(model)                       # (params, frozen, *inputs) -> prediction
    network = plan.network_params(params, frozen)         # what sampling runs

`config.finetune.method`:
- "none": the stage trains from random initialization;
- "full": every parameter starts from the base stage's EMA parameters, with a fresh optimizer;
- "lora": the base's EMA parameters stay frozen (outside the train state: no optimizer state,
  not checkpointed) and low-rank adapters train (`models/lora.py`); the workdir's checkpoints
  hold the adapters, and its config names the base workdir and step that sampling merges them
  into.
With `finetune.prior_class` (DreamBooth's class-prior preservation) half of every batch holds
class images sampled from the base stage beforehand (`workflows/finetune.py`), their loss
weighted by `finetune.prior_weight`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax import text
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.core import random_streams
from imagen_jax.models import lora

METHODS = ("none", "full", "lora")
PRIOR_DIR = "prior"


class FinetuneError(ValueError):
  """A fine-tuning run that cannot start: the message names the workdir, folder or parameter."""


@dataclasses.dataclass(frozen=True)
class Base:
  """The trained stage a run starts from: its workdir and checkpoint step."""
  workdir: str
  step: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a run's trained parameters relate to the stage's network (see the module docstring)."""
  method: str = "none"
  lora: lora.LoraSpec | None = None        # the adapters of a "lora" run
  base: Base | None = None                 # the trained stage of a "full" or "lora" run
  prior_weight: float | None = None        # class-prior preservation: the class images' weight

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Plan":
    """The plan `config` describes (a config that predates fine-tuning trains from scratch).

    The base is taken as the config names it (`prepare` resolves and checks it for training)."""
    ft = config.get("finetune")
    method = "none" if ft is None else ft.method
    if method not in METHODS:
      raise config_lib.ConfigError(f"config.finetune.method={method!r}: use one of {METHODS}")
    if method == "none":
      return cls()
    spec = None
    if method == "lora":
      layers = ft.lora_layers
      layers = tuple(g.strip() for g in layers.split(",") if g.strip()) if isinstance(
          layers, str) else tuple(layers)
      try:
        spec = lora.LoraSpec(int(ft.lora_rank), float(ft.lora_alpha), layers)
      except ValueError as e:
        raise config_lib.ConfigError(f"config.finetune.{e}") from e
    base = Base(str(ft.base), int(ft.base_step)) if ft.base else None
    prior = float(ft.prior_weight) if ft.prior_class else None
    return cls(method, spec, base, prior)

  @property
  def uses_prior(self) -> bool:
    return self.prior_weight is not None

  # --- What the state holds and how it starts ----------------------------------------------

  def trainable_shapes(self, config: ml_collections.ConfigDict, model: nn.Module) -> Any:
    """The trained parameters as boxed ShapeDtypeStructs: the network's, or the adapters."""
    if self.lora is not None:
      return lora.adapter_shapes(model, config, self.lora)
    return models.param_shapes(config)

  def initial_trainable(self, config: ml_collections.ConfigDict, model: nn.Module,
                        abstract_network: Any) -> Callable[[], Any]:
    """A function (traced under jit) that returns the trained parameters of a fresh run:
    random initialization, fresh adapters (a ~ N(0, 1/fan_in), b = 0), or the base's EMA
    parameters restored on `abstract_network`'s shardings."""
    if self.method == "full":
      restored = self._restore_base(abstract_network)
      return lambda: restored
    if self.lora is not None:
      key = random_streams.stream_key(config.seed, "lora_adapters")
      return lambda: nn.unbox(lora.init_adapters(key, model, config, self.lora))
    key = jax.random.PRNGKey(config.seed)
    return lambda: nn.unbox(model.init(key, **models.init_inputs(config))["params"])

  def frozen_base(self, abstract_network: Any, restore: bool = True) -> Any:
    """The frozen network a LoRA run's adapters apply to (restored, or `abstract_network`
    itself when not `restore`); None for any other run."""
    if self.lora is None:
      return None
    return self._restore_base(abstract_network) if restore else abstract_network

  def _restore_base(self, abstract_network: Any) -> Any:
    ckpt = checkpoints.Checkpointer(self.base.workdir, read_only=True)
    return ckpt.restore_params(self.base.step, abstract_network, "ema_params")

  # --- How the network runs and what sampling uses -----------------------------------------

  def apply_fn(self, model: nn.Module, scale: float = 1.0) -> Callable[..., Any]:
    """apply_fn(params, frozen_base, *inputs, **kw): the model's own apply, or the frozen base
    with the adapters `params` added (unmerged)."""
    return lora.network(model, self.lora, scale)

  def network_params(self, params: Any, frozen_base: Any, scale: float = 1.0) -> Any:
    """The network's parameters for trained `params`: themselves, or the adapters merged into
    the base once (W + scale * alpha / rank * a b)."""
    if self.lora is None:
      return params
    return lora.merge(frozen_base, params, self.lora, scale)

  def restore_network(self, config: ml_collections.ConfigDict, workdir: str, step: int,
                      abstract_network: Any, which: str = "ema_params",
                      scale: float = 1.0) -> Any:
    """The network parameters of a stage's checkpoint, laid out as `abstract_network`: its own,
    or for a LoRA workdir its base's EMA parameters with the adapters merged in."""
    ckpt = checkpoints.Checkpointer(workdir, read_only=True)
    if self.lora is None:
      return ckpt.restore_params(step, abstract_network, which)
    try:
      base = self._restore_base(abstract_network)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"the LoRA stage {workdir} adapts {self.base.workdir} at step "
                              f"{self.base.step}, which cannot be read: {e}") from e
    model = models.build_model(config)
    shapes = self.trainable_shapes(config, model)
    sharding = jax.tree_util.tree_leaves(abstract_network)[0].sharding
    adapters = ckpt.restore_params(step, checkpoints.abstract_like(nn.unbox(shapes), sharding),
                                   which)
    return self.network_params(adapters, base, scale)


# --- Before training: the base stage, the subject data, the class images, checked once ----------

def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict,
                                                                      Plan]:
  """The config a run trains (finetune.base resolved, base_step fixed) and its plan, with every
  problem of a fine-tuning run (the base stage, the network against its checkpoint, the subject
  data, the prior settings) reported before anything is compiled. A resumed run keeps the base
  step its checkpoints were trained on."""
  plan = Plan.from_config(config)
  if plan.method == "none":
    return config, plan
  config = config_lib.copy(config)
  stored = _stored_config(workdir)
  if (stored is not None and Plan.from_config(stored).method != "none"
      and config.finetune.base_step < 0):
    config.finetune.base_step = stored.finetune.base_step  # resume on the same base
  base = resolve_base(config)
  check_matches_base(config, base)
  config.finetune.base, config.finetune.base_step = base.workdir, base.step
  check_subject(config)
  if plan.uses_prior:
    check_prior(config)
  if plan.lora is not None:  # a layer group that matches no layer of the network fails here
    try:
      lora.targets(models.build_model(config), config, plan.lora)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.finetune.{e}") from e
  return config, Plan.from_config(config)


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


def check_subject(config: ml_collections.ConfigDict) -> None:
  """Converts the subject's source now and raises SourceError if it has no usable example."""
  from imagen_jax.data import sources  # pylint: disable=g-import-not-at-top  # heavy: tfds, which sampling (it imports the plan) never needs
  data_source, info = sources.get_data_source(config.data)
  sources.check_not_empty(data_source, info)
  logging.info("Fine-tuning on %d examples of %s", len(data_source), config.data.source)


def check_prior(config: ml_collections.ConfigDict) -> None:
  """Class-prior preservation samples from a base stage, at least one image, weight >= 0, and
  fills half of each batch with class images whose captions it encodes on the fly."""
  ft = config.finetune
  if config.stage != "base":
    raise FinetuneError("class-prior preservation samples class images from a base stage; "
                        f"this is a {config.stage!r} stage: leave config.finetune.prior_class "
                        "empty (SR stages fine-tune on the subject alone)")
  if ft.prior_images < 1 or ft.prior_weight < 0:
    raise FinetuneError(f"config.finetune.prior_images={ft.prior_images} must be >= 1 and "
                        f"prior_weight={ft.prior_weight} >= 0")
  if config.batch_size % 2:
    raise FinetuneError(f"class-prior preservation fills half of each batch with class images: "
                        f"config.batch_size={config.batch_size} must be even")
  if config.data.embed_cache:
    raise FinetuneError("class-prior preservation encodes the class images' captions on the fly: "
                        f"clear config.data.embed_cache={config.data.embed_cache!r}")


def prior_folder(config: ml_collections.ConfigDict, workdir: str) -> str:
  """WORKDIR/prior/N: the class images (named by their count, so a run asking for another
  count samples and converts a dataset of its own)."""
  return fileio.join(fileio.resolve(workdir), PRIOR_DIR, str(int(config.finetune.prior_images)))


def prior_captions(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The class images' captions.jsonl: written last, so the folder is complete once it exists."""
  return fileio.join(prior_folder(config, workdir), "captions.jsonl")


def prior_seed(config: ml_collections.ConfigDict) -> int:
  """The sampling seed of the class images: a random stream of its own, apart from the
  training steps' keys."""
  return random_streams.stream_seed(int(config.seed), "class_prior")


def make_data(config: ml_collections.ConfigDict, plan: Plan, workdir: str,
              tokenize_fn: Any = None, embedding_lookup: Any = None) -> Any:
  """The run's input pipeline: the stage's own, or with class-prior preservation a `Mixture`
  of the subject's examples and the class images, half the batch each (DreamBooth's batches),
  the class examples' loss weighted by the plan's prior weight."""
  from imagen_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top  # heavy: grain and tfds, which sampling never needs
  if not plan.uses_prior:
    return pipeline_lib.make_pipeline(config, tokenize_fn=tokenize_fn,
                                      embedding_lookup=embedding_lookup)
  if not fileio.exists(prior_captions(config, workdir)):
    raise FinetuneError(
        f"config.finetune.prior_class={config.finetune.prior_class!r} needs its class images "
        f"in {prior_folder(config, workdir)}: `imagen-jax finetune` samples them from the base "
        "stage first (imagen_jax.workflows.finetune.run)")
  instance = config_lib.copy(config)
  instance.batch_size = config.batch_size // 2
  prior = config_lib.copy(instance)
  folder = prior_folder(config, workdir)
  prior.data.update(source=f"folder:{folder}", data_dir=fileio.join(folder, "tfds"),
                    split="train", image_key="image", caption_key="caption",
                    min_resolution=0, random_crop=False)
  prior.seed = int(config.seed) + 1  # its own shuffle
  parts = [pipeline_lib.make_pipeline(c, tokenize_fn=tokenize_fn) for c in (instance, prior)]
  return pipeline_lib.Mixture(parts, [1.0, plan.prior_weight])


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


def sampling_params(config: ml_collections.ConfigDict, workdir: str, step: int,
                    sharding: jax.sharding.Sharding, use_ema: bool = True,
                    lora_scale: float = 1.0) -> Any:
  """The parameters a stage samples with, on `sharding`: its checkpoint's (EMA) parameters,
  or for a LoRA workdir its base's EMA parameters with the adapters merged in once, weighted
  by `lora_scale`."""
  abstract = checkpoints.abstract_like(nn.unbox(models.param_shapes(config)), sharding)
  return Plan.from_config(config).restore_network(
      config, workdir, step, abstract, "ema_params" if use_ema else "params", lora_scale)


def load_network(workdir: str, step: int | None = None, use_ema: bool = True,
                 lora_scale: float = 1.0) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, the parameters it samples with on the first device, step) of a stage workdir at
  checkpoint `step` (the latest if None): `sampling_params` for one stage on its own."""
  workdir = fileio.resolve(workdir)
  config, step = checkpoints.restore_config(workdir, step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return config, sampling_params(config, workdir, step, device, use_ema, lora_scale), step

