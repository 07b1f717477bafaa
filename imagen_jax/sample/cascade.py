"""A cascade stitched from stage workdirs: text -> base -> SR -> SR.

    cascade = Cascade.from_workdirs(["gs://b/base64", "gs://b/sr256", "gs://b/sr1024"])
    images = cascade.sample(["a corgi in a red bow tie"], seed=0,
                            settings=cascade.default_settings(guidance=8.0))[-1]
    # uint8 [1, 1024, 1024, 3]: the last stage's images

Each workdir's checkpoint carries its resolved config, so nothing but the workdirs is needed.
The same cascade edits images (`edit_inputs`: inpaint, img2img; `first_stage="sr"`: upscale):

    images = cascade.sample(prompts, edit=edit_inputs.Edit("inpaint"), images=x, masks=m)[-1]

The chain is checked before any parameter is loaded: the first stage is a base stage, each SR
stage's low-res input is the previous stage's output resolution, and all stages expect the same
text encoder and width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax import text
from imagen_jax.core import checkpoints
from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.data import preprocess
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import stage_sampler
from imagen_jax.sample import edit_inputs
from imagen_jax.train import plan as plan_lib


class ChainError(ValueError):
  """Stage workdirs that do not form a cascade; the message names the stages and values."""


@dataclasses.dataclass
class Stage:
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  lora: dict[str, Any] | None = None  # a LoRA stage: its base workdir, base step and scale


def check_chain(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                first_stage: str = "base") -> None:
  """Raises ChainError naming the first mismatch between consecutive stages. `first_stage`
  "sr" checks a chain of SR stages only (upscaling a user's image)."""
  if not configs:
    raise ChainError("no stages given")
  if len(configs) > 3:
    raise ChainError(f"a cascade has at most 3 stages, got {len(configs)}")
  name = lambda i: f"stage {i + 1} ({workdirs[i]})"
  if first_stage == "sr" and configs[0].stage != "sr":
    raise ChainError(f"{name(0)} is a {configs[0].stage!r} stage; upscaling an image runs SR "
                     "stages only: give the SR stage workdirs (e.g. --stages=sr256[,sr1024])")
  if first_stage == "base" and configs[0].stage != "base":
    raise ChainError(f"{name(0)} is a {configs[0].stage!r} stage; the first stage must be a "
                     "base stage (are the stages in the wrong order? to upscale an image of "
                     "your own with SR stages alone, use `imagen-jax edit --mode=upscale`)")
  for i in range(1, len(configs)):
    prev, cur = configs[i - 1], configs[i]
    if cur.stage != "sr":
      raise ChainError(f"{name(i)} is a {cur.stage!r} stage; stages after the first must be SR "
                       "stages (are the stages in the wrong order?)")
    if cur.lowres.size != prev.image_size:
      raise ChainError(f"{name(i)} takes {cur.lowres.size}x{cur.lowres.size} low-res inputs but "
                       f"{name(i - 1)} outputs {prev.image_size}x{prev.image_size}")
  for i in range(1, len(configs)):
    if difference := text.text_difference(configs[i].text, configs[0].text):
      key, mine, base = difference
      raise ChainError(f"{name(i)} expects text.{key}={mine!r} but {name(0)} uses {base!r}: "
                       "every stage needs the same encoder")


def sampling_mesh() -> jax.sharding.Mesh:
  """Every device on the batch axis: each device samples its share of the images, with every
  stage's parameters replicated (sampling has no optimizer state to shard)."""
  return partitioning.make_mesh({"data": -1, "fsdp": 1, "model": 1})


class Cascade:
  """Stages plus the base stage's text encoder; samples batches sharded over all devices."""

  def __init__(self, stages: Sequence[Stage], text_encoder: Any,
               mesh: jax.sharding.Mesh | None = None):
    self.stages = list(stages)
    self.text_encoder = text_encoder
    self.mesh = mesh or sampling_mesh()
    self._compiled: dict[Any, Callable[..., jax.Array]] = {}
    # The running sample() call's progress callback. The compiled samplers report to whichever
    # is current, so one compiled program serves every call (a callback baked into the program
    # would make each call compile anew).
    self._progress: Callable[[int, int, int], None] | None = None
    self._empty: tuple[np.ndarray, np.ndarray] | None = None  # the encoded empty caption

  @classmethod
  def from_workdirs(cls, workdirs: Sequence[str], steps: Sequence[int | None] | None = None,
                    use_ema: bool = True, text_encoder: Any = None,
                    first_stage: str = "base", lora_scale: float = 1.0) -> "Cascade":
    """Loads each stage's (EMA) params from its latest or given checkpoint step. `first_stage`
    "sr": a chain of SR stages that upscales given images (`edit_inputs.Edit("upscale")`). A LoRA
    workdir (`imagen-jax finetune`) in place of a stage samples its base stage with the
    adapters merged in, weighted by `lora_scale` (0: the base stage itself)."""
    workdirs = [fileio.resolve(str(w)) for w in workdirs]  # the records name them from anywhere
    steps = list(steps) if steps is not None else [None] * len(workdirs)
    if len(steps) != len(workdirs):
      raise ChainError(f"{len(steps)} checkpoint steps given for {len(workdirs)} stages")
    configs, found_steps = [], []
    for workdir, step in zip(workdirs, steps):
      try:
        config, step = checkpoints.restore_config(workdir, step)
      except FileNotFoundError as e:
        raise FileNotFoundError(f"stage workdir {workdir!r} has no checkpoint to sample from "
                                f"({e})") from e
      configs.append(config)
      found_steps.append(step)
    check_chain(configs, list(workdirs), first_stage)
    mesh = sampling_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    stages = []
    for workdir, step, config in zip(workdirs, found_steps, configs):
      params = plan_lib.sampling_params(config, workdir, step, replicated, use_ema, lora_scale)
      lora = None
      if plan_lib.Plan.from_config(config).lora is not None:
        lora = {"base": config.finetune.base, "base_step": int(config.finetune.base_step),
                "scale": float(lora_scale)}
      stages.append(Stage(workdir, step, config, models.build_model(config), params, lora))
      logging.info("Loaded %s (%s, %dx%d) at step %d%s", workdir, config.stage, config.image_size,
                   config.image_size, step, f", LoRA on {lora['base']}" if lora else "")
    if text_encoder is None:
      base = configs[0]
      text_encoder = text.load_configured(base.text)
    return cls(stages, text_encoder, mesh)

  def default_settings(self, **overrides) -> list[stage_sampler.StageSettings]:
    """Each stage's `config.sample` settings, with per-run overrides."""
    return [stage_sampler.StageSettings.from_config(s.config.sample, **overrides) for s in self.stages]

  @property
  def upscales(self) -> bool:
    """Whether the first stage is an SR stage: the cascade upscales given images."""
    return self.stages[0].config.stage == "sr"

  def input_size(self, edit: edit_inputs.Edit) -> int:
    """The size an edit's inputs are brought to: the first SR stage's low-res size to upscale,
    the last stage's output size otherwise (each stage resizes from there)."""
    if edit.mode == "upscale":
      return self.stages[0].config.lowres.size
    return self.stages[-1].config.image_size

  def sample(self, prompts: Sequence[str], *, seed: int = 0,
             indices: Sequence[int] | None = None,
             settings: Sequence[stage_sampler.StageSettings] | None = None,
             progress: Callable[[int, int, int], None] | None = None,
             edit: edit_inputs.Edit | None = None, images: np.ndarray | None = None,
             masks: np.ndarray | None = None) -> list[np.ndarray]:
    """uint8 images of every stage, [N, S_k, S_k, 3] for stage k, for N prompts.

    Image i is sampled from keys derived from (seed, indices[i]) alone (default indices 0..N-1),
    so the same seed gives the same pixels whatever the batch. `progress(stage, step, steps)`
    is called from the sampling loop. With an `edit` (`edit_inputs`), `images` uint8 [N, S, S, 3]
    are the inputs (any square size) and, for inpainting, `masks` bool [N, S, S] (True:
    regenerate).
    """
    if not prompts:
      raise ValueError("no prompts to sample")
    settings = list(settings or self.default_settings())
    if len(settings) != len(self.stages):
      raise ValueError(f"{len(settings)} stage settings for {len(self.stages)} stages")
    if edit is None and self.upscales:
      raise ValueError("this cascade starts at an SR stage: it upscales given images "
                       "(edit=edit_inputs.Edit('upscale') and images)")
    if edit is not None:
      self.check_edit(edit, settings)
      self._check_edit_inputs(edit, images, masks, len(prompts))
    indices = np.arange(len(prompts)) if indices is None else np.asarray(indices)
    n = len(prompts)
    multiple = self.mesh.size
    padded = -(-n // multiple) * multiple
    emb, mask = self.text_encoder.encode(list(prompts) + [""] * (padded - n))
    pad = lambda a: None if a is None else np.concatenate(
        [a, np.zeros((padded - n,) + a.shape[1:], a.dtype)])
    images, masks = pad(images), pad(masks)
    keys = stage_sampler.image_keys(seed, np.concatenate([indices, np.arange(padded - n) + 2**31]))
    outputs = self.sample_encoded(emb, mask, keys, settings=settings, progress=progress,
                                  edit=edit, images=images, masks=masks)
    return [out[:n] for out in outputs]

  def sample_encoded(self, text_emb: np.ndarray, text_mask: np.ndarray, keys: Any, *,
                     settings: Sequence[stage_sampler.StageSettings],
                     rows: Sequence[stage_sampler.RowSettings] | None = None,
                     progress: Callable[[int, int, int], None] | None = None,
                     edit: edit_inputs.Edit | None = None, images: np.ndarray | None = None,
                     masks: np.ndarray | None = None,
                     on_stage: Callable[[int, np.ndarray], None] | None = None
                     ) -> list[np.ndarray]:
    """uint8 images of every stage, [B, S_k, S_k, 3], for a batch already encoded and checked.

    text_emb [B, L, D] and text_mask [B, L] as `text_encoder.encode` gives them, keys [B, 2]
    (`stage_sampler.image_keys`), B a multiple of the mesh's size; `settings`, `progress`, `edit`,
    `images` and `masks` as in `sample`. `rows[k]` gives each image its own guidance weight,
    thresholding and negative prompt at stage k (`stage_sampler.RowSettings`: traced, so a batch
    of mixed values runs one compiled program). `on_stage(k, images)` receives stage k's uint8
    images as soon as they are done.
    """
    batch_sharding = lambda ndim: partitioning.batch_sharding(self.mesh, ndim)
    keys = jax.device_put(keys, batch_sharding(2))
    emb = jax.device_put(text_emb, batch_sharding(3))
    mask = jax.device_put(text_mask, batch_sharding(2))
    outputs, lowres = [], None
    if edit is not None and edit.mode == "upscale":
      lowres = jax.device_put(preprocess.to_model_range(
          edit_inputs.at_size(images, self.stages[0].config.lowres.size)), batch_sharding(4))
    for k, (stage, stage_settings) in enumerate(zip(self.stages, settings)):
      inputs, statics = {}, {}
      if edit is not None and edit.mode != "upscale":
        inputs = {name: jax.device_put(value, batch_sharding(4)) for name, value in
                  edit_inputs.stage_inputs(edit, images, masks, stage.config.image_size).items()}
        statics = {"start": edit.strength, "resample": edit.resample, "jump": edit.jump}
      if rows is not None:
        inputs["rows"] = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, batch_sharding(np.ndim(a))), rows[k])
      if (stage.config.text.get("null", "zeros") == "empty_prompt"
          and (rows is None or rows[k].null_emb is None)):
        inputs["null_text"] = tuple(jax.device_put(a, batch_sharding(a.ndim))
                                    for a in self._empty_prompt(len(text_emb)))
      fn = self._stage_fn(k, stage_settings, progress is not None, **statics)
      self._progress = progress
      try:
        with partitioning.mesh_context(self.mesh):
          out = fn(stage.params, keys, emb, mask, lowres=lowres, **inputs)
        lowres = out
        outputs.append(np.asarray(preprocess.to_uint8(out)))  # waits for the last report
      finally:
        self._progress = None
      if on_stage is not None:
        on_stage(k, outputs[-1])
    return outputs

  def _empty_prompt(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The encoded empty caption for `batch` images (emb [B, L, D], mask [B, L]): the
    unconditional text of stages with `text.null` "empty_prompt" (IF's)."""
    if self._empty is None:
      self._empty = self.text_encoder.encode([""])
    emb, mask = self._empty
    return (np.broadcast_to(emb[:1], (batch,) + emb.shape[1:]),
            np.broadcast_to(mask[:1], (batch,) + mask.shape[1:]))

  def check_edit(self, edit: edit_inputs.Edit, settings: Sequence[stage_sampler.StageSettings]) -> None:
    """Raises EditError naming the problem if this cascade cannot make `edit` with `settings`
    (before any compute)."""
    if edit.mode == "upscale" and not self.upscales:
      raise edit_inputs.EditError(f"upscaling runs SR stages only, but stage 1 "
                              f"({self.stages[0].workdir}) is a base stage")
    if edit.mode != "upscale" and self.upscales:
      raise edit_inputs.EditError(f"mode {edit.mode!r} needs a cascade from its base stage; stage 1 "
                              f"({self.stages[0].workdir}) is an SR stage")
    if edit.resample > 1:
      for k, (stage, stage_settings) in enumerate(zip(self.stages, settings)):
        if samplers.parse_sampler(stage_settings.sampler)[0] not in samplers.ONE_STEP:
          raise edit_inputs.EditError(
              f"resampling jumps need a one-step sampler ({', '.join(samplers.ONE_STEP)}) at "
              f"every stage; stage {k + 1} ({stage.workdir}) samples with "
              f"{stage_settings.sampler!r}: give e.g. --sampler=ddpm")

  def _check_edit_inputs(self, edit: edit_inputs.Edit, images: np.ndarray | None,
                         masks: np.ndarray | None, n: int) -> None:
    if images is None or len(images) != n or images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise edit_inputs.EditError(f"an edit needs one square uint8 input image [S, S, 3] per prompt "
                              f"({n}), got {None if images is None else images.shape}")
    if edit.uses_mask and (masks is None or masks.shape != images.shape[:3]):
      raise edit_inputs.EditError(f"inpainting needs one bool mask [S, S] per image "
                              f"{images.shape[:3]}, got {None if masks is None else masks.shape}")

  def _stage_fn(self, k: int, settings: stage_sampler.StageSettings, reports_progress: bool,
                **statics: float):
    cache_key = (k, settings, reports_progress, tuple(sorted(statics.items())))
    if cache_key not in self._compiled:
      stage = self.stages[k]
      on_step = None
      if reports_progress:
        on_step = lambda i: self._report(k, int(i) + 1, settings.steps)
      sample = functools.partial(stage_sampler.sample_stage, stage.config, stage.model,
                                 settings=settings, on_step=on_step, **statics)
      # Stage k's keys are the images' keys folded with k, inside the program (one dispatch).
      self._compiled[cache_key] = jax.jit(
          lambda params, keys, *args, **kwargs: sample(params, noise_lib.fold_in(keys, k),
                                                       *args, **kwargs))
    return self._compiled[cache_key]

  def _report(self, k: int, step: int, steps: int) -> None:
    if self._progress is not None:
      self._progress(k, step, steps)
