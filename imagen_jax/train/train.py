"""Training one cascade stage, sharded over a device mesh, resumable (`imagen-jax train`).

    state = train_and_evaluate(config_lib.load_config("configs/base64.py:tiny"), "/tmp/w")

One readable loop in sections, in the manner of big_vision's train.py. Calling it again with the
same workdir resumes from the latest complete checkpoint; SIGTERM (preemption) saves and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imagen_jax import models
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import distributed
from imagen_jax.core import fileio
from imagen_jax.core import images as images_lib
from imagen_jax.core import partitioning
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import preprocess
from imagen_jax.diffusion import stage_sampler
from imagen_jax.models import lora
from imagen_jax.train import finetune
from imagen_jax.train import metric_writers
from imagen_jax.train import mfu
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss, a config that does not fit the mesh."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence[jax.Device] | None = None,
                       stop_at_step: int | None = None) -> state_lib.TrainState:
  """Trains `config`'s stage in `workdir` up to config.total_steps; returns the final state.

  `devices` (default: all) is the mesh's device set; tests use it to compare meshes.
  `stop_at_step`: save a checkpoint at this step and return, the schedules still those of
  config.total_steps, so that a later call (on any mesh) continues the same run. The demo trains
  its base stage's first steps on one core this way while the SR stage trains on the other.
  """
  if stop_at_step is not None and not 0 < stop_at_step <= config.total_steps:
    raise config_lib.ConfigError(f"stop_at_step={stop_at_step}: it must be a step of the run, "
                                 f"1 to total_steps={config.total_steps}")
  last_step = config.total_steps if stop_at_step is None else stop_at_step
  # --- 1. Check the config and the workdir before anything is compiled ----------------------
  workdir = fileio.resolve(str(workdir))  # Orbax refuses relative paths (in a background thread)
  mesh = partitioning.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  check_workdir_writable(workdir)
  # Fine-tuning: the base stage checked against the config, its step fixed, class images made.
  config = finetune.prepare(config, workdir)
  lead = jax.process_index() == 0

  # --- 2. Text encoder and data: this process's shard of the global batch ------------------
  text_encoder = load_text_encoder_if_needed(config)
  data = finetune.make_data(config, workdir, text_encoder.tokenize if text_encoder else None,
                            open_embedding_cache(config))

  # --- 3. Model, state (created sharded or restored), the step compiled ahead of time ------
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
  setup = build_train_step(config, mesh, text_encoder=text_encoder, checkpointer=ckpt)
  model, state, start_step = setup.model, setup.state, setup.start_step
  if setup.data_state is not None:
    logging.info("Resuming from the checkpoint at step %d in %s", start_step, ckpt.directory)
    data.set_state(setup.data_state)
  compiled_step, frozen, batch_shapes = setup.compiled_step, setup.frozen, setup.batch_shapes
  distributed.barrier("compiled_train_step")  # hosts compile at different speeds
  peak_flops, _ = mfu.peak_tflops_per_device()

  # --- 4. Writers: TensorBoard (lead process only), console, config, parameter table -------
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not lead)
  progress = metric_writers.ReportProgress(config.total_steps, config.batch_size)
  if lead:
    fileio.write_text(fileio.join(workdir, "config.json"), config_lib.to_json(config))
    logging.info("Parameters:\n%s\ntotal_params: %d", *models.parameter_table(config))
    if setup.lora_spec is not None:
      logging.info("LoRA adapters (%s): %d trained parameters; the base is frozen",
                   setup.lora_spec, lora.count(state.params))
  flops_per_step = setup.flops_per_step
  logging.info("Compiled the train step in %.1f s; %s FLOPs per step per device",
               setup.compile_seconds, f"{flops_per_step:.3g}" if flops_per_step else "unknown")
  preview = (make_preview(config, model, text_encoder, mesh, setup.sampling_params)
             if config.sample_every else None)
  preemption = PreemptionWatcher()

  # --- 5. The loop -------------------------------------------------------------------------
  try:
    train_metrics = None
    progress.start(start_step)
    for step in range(start_step + 1, last_step + 1):
      batch = pipeline_lib.global_batch(device_part(next(data), batch_shapes), mesh)
      state, metrics = compiled_step(state, batch, frozen)
      train_metrics = metrics if train_metrics is None else merge_metrics(train_metrics, metrics)
      ckpt.check()  # a checkpoint that failed in the background stops the run here

      if step % config.log_every == 0 or step == last_step:
        # The host waits for the device only here, for previews and for checkpoints.
        check_finite(state, config)
        scalars = {k: float(v) for k, v in train_metrics.compute().items()}
        scalars.update(mfu.throughput(progress.report(step), config.batch_size, flops_per_step,
                                      peak_flops))
        scalars.update({f"data/skipped_{k}": v for k, v in data.skip_counts().items()})
        scalars.update({f"data/converted_{k}": v for k, v in data.convert_counts().items()})
        writer.write_scalars(step, scalars)
        train_metrics = None

      if preview is not None and step % config.sample_every == 0:
        writer.write_images(step, {"samples": preview(state.ema_params)})

      preempted = preemption.reached(step)
      if preempted or step % config.checkpoint_every == 0 or step == last_step:
        check_finite(state, config)  # never save a state that follows a non-finite update
        ckpt.save(step, state, data.get_state(), config)
        writer.flush()  # logs on gs:// are uploaded on flush: keep them in step with checkpoints
      if preempted:
        logging.warning("Preempted: saved the checkpoint at step %d; exiting.", step)
        break
  except BaseException:
    # --- 6. Finish: complete any save in flight, even when stopping on an error ---------------
    finish(ckpt, data, writer, reraise=False)  # the loop's error is the one to report
    raise
  finish(ckpt, data, writer)  # a failed final checkpoint or log upload fails the run
  return state


@dataclasses.dataclass
class TrainSetup:
  """A stage's training step compiled for a mesh, and the state it steps from."""
  model: nn.Module
  optimizer: optax.GradientTransformation
  abstract_state: state_lib.TrainState    # ShapeDtypeStructs carrying their shardings
  state_shardings: state_lib.TrainState
  state: state_lib.TrainState | None      # restored, created, or None (init_state=False)
  start_step: int                         # the restored checkpoint's step, or 0
  data_state: Any                         # the input pipeline's state saved with it, or None
  # What the step reads but never updates: {"text": the frozen encoder's params on the mesh or
  # None, "base": a LoRA run's frozen base params (abstract unless `init_state`) or None}.
  frozen: dict[str, Any]
  batch_shapes: dict[str, jax.ShapeDtypeStruct]  # the global batch, with its shardings
  lora_spec: lora.LoraSpec | None = None  # a LoRA run's adapters (state.params are adapters)
  compiled_step: Any = None               # (state, batch, frozen) -> (state, metrics)
  compile_seconds: float = 0.0
  flops_per_step: float = 0.0             # per device, from the traced step

  def sampling_params(self, params: Any) -> Any:
    """The network's parameters for trained `params` (a LoRA run's: merged into the base)."""
    if self.lora_spec is None:
      return params
    return lora.merge(self.frozen["base"], params, self.lora_spec)


def build_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                     text_encoder: Any = None, checkpointer: checkpoints.Checkpointer | None = None,
                     step: int | None = None, init_state: bool = True,
                     compile_step: bool = True) -> TrainSetup:
  """Everything before the first step, in one place for the loop, restores and benchmarks.

  The abstract state and its shardings come from the boxed parameter shapes (nothing is
  allocated); the state is restored from `checkpointer` (its latest step, or `step`) when it
  has one, otherwise created directly sharded (unless `init_state=False`): from random
  initialization, or for fine-tuning (`config.finetune`, already `finetune.prepare`d) from the
  base stage's EMA parameters ("full") or as fresh adapters on them ("lora", whose frozen base
  is restored whenever `init_state`). The step is traced and AOT-compiled with the state
  donated, as maxdiffusion does.
  """
  model = models.build_model(config)
  method, spec = finetune.method(config), lora.stage_spec(config)
  optimizer, lr_schedule = state_lib.make_optimizer(config.optimizer, config.total_steps)
  key = jax.random.PRNGKey(config.seed)
  model_shapes = jax.eval_shape(functools.partial(init_params, config, model), key)
  if spec is None:
    init_trainable = lambda k: nn.unbox(init_params(config, model, k))
    param_shapes = model_shapes
  else:  # the trained parameters are the adapters
    init_trainable = lambda k: nn.unbox(lora.init_adapters(k, model, config, spec))
    param_shapes = lora.adapter_shapes(model, config, spec)
  state_shardings, abstract_state = make_state_shardings(param_shapes, optimizer, mesh)
  base_shardings = partitioning.tree_shardings(model_shapes, mesh)
  abstract_base = checkpoints.abstract_like(nn.unbox(model_shapes), base_shardings)
  base = finetune.Base(config.finetune.base, config.finetune.base_step) if method != "none" else None
  state, start_step, data_state = None, 0, None
  if checkpointer is not None:
    step = checkpointer.latest_step() if step is None else step
    if step is not None:
      state, data_state = checkpointer.restore(step, abstract_state)
      start_step = step
  if state is None and init_state:
    with partitioning.mesh_context(mesh):
      if method == "full":  # every parameter starts from the base's EMA parameters
        state = jax.jit(lambda p: state_lib.create(p, optimizer), out_shardings=state_shardings)(
            finetune.restore_base_params(base, abstract_base))
      else:
        state = jax.jit(lambda k: state_lib.create(init_trainable(k), optimizer),
                        out_shardings=state_shardings)(key)
  text_params, text_shardings = place_text_params(text_encoder, mesh)
  frozen_base, frozen_base_shardings = None, None
  if spec is not None:
    frozen_base = (finetune.restore_base_params(base, abstract_base) if init_state
                   else abstract_base)
    frozen_base_shardings = base_shardings
  frozen = {"text": text_params, "base": frozen_base}
  setup = TrainSetup(model, optimizer, abstract_state, state_shardings, state, start_step,
                     data_state, frozen, batch_spec(config, mesh), spec)
  if compile_step:
    train_step = step_lib.make_train_step(config, model, optimizer, lr_schedule,
                                          text_encoder.apply if text_encoder else None,
                                          lora.network(model, spec))
    frozen_shardings = {"text": text_shardings, "base": frozen_base_shardings}
    with partitioning.mesh_context(mesh):
      start = time.perf_counter()
      traced = jax.jit(
          train_step, in_shardings=(state_shardings, batch_shardings(setup.batch_shapes),
                                    frozen_shardings),
          out_shardings=(state_shardings, None), donate_argnums=(0,)
      ).trace(abstract_state, setup.batch_shapes, frozen)
      setup.compiled_step = traced.lower().compile()
      setup.compile_seconds = time.perf_counter() - start
    setup.flops_per_step = mfu.model_flops(traced.jaxpr) / mesh.size
  return setup


# --- Helpers, in the order the loop uses them ------------------------------------------------

# One dispatch per step instead of one per metric field: eager merges cost the host 5-8 ms a
# step on 2 CPU devices, CPU time a CPU-hosted step shares (benchmarks/RESULTS.md).
merge_metrics = jax.jit(lambda total, new: total.merge(new))


def finish(ckpt: checkpoints.Checkpointer, data: Any, writer: Any, reraise: bool = True) -> None:
  """Waits for the last checkpoint and closes the input pipeline and the writers, all of them
  even if one fails; then raises the first failure (or only logs them, `reraise=False`)."""
  errors = []
  for close in (ckpt.wait, ckpt.close, data.close, writer.flush, writer.close):
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      logging.error("while finishing the run: %s: %s", type(e).__name__, e)
  if errors and reraise:
    raise errors[0]


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Fails before compiling, naming the config value that does not fit."""
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = int(config.optimizer.grad_accum_steps)
  problems = []
  if config.stage not in ("base", "sr"):
    problems.append(f"config.stage={config.stage!r} must be 'base' or 'sr'")
  if config.stage == "sr" and config.lowres.size <= 0:
    problems.append("config.lowres.size must be > 0 for an SR stage")
  if accum < 1 or config.batch_size % accum:
    problems.append(f"config.batch_size={config.batch_size} is not divisible by "
                    f"config.optimizer.grad_accum_steps={accum}")
  elif (config.batch_size // accum) % batch_devices:
    problems.append(f"config.batch_size={config.batch_size} (micro-batch {config.batch_size // accum}"
                    f") is not divisible by the {batch_devices} devices of the mesh's data x fsdp "
                    f"axes (config.mesh: {dict(mesh.shape)})")
  if config.batch_size % jax.process_count():
    problems.append(f"config.batch_size={config.batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")
  for key in ("total_steps", "log_every", "checkpoint_every"):
    if config[key] < 1:
      problems.append(f"config.{key}={config[key]} must be >= 1")
  if config.nonfinite not in ("error", "skip"):
    problems.append(f"config.nonfinite={config.nonfinite!r} must be 'error' or 'skip'")
  if problems:
    raise config_lib.ConfigError("; ".join(problems))


def check_workdir_writable(workdir: str) -> None:
  try:
    fileio.makedirs(workdir)
    probe = fileio.join(workdir, f".write_probe_{jax.process_index()}")
    fileio.write_text(probe, "ok")
    fileio.remove(probe)
  except Exception as e:  # pylint: disable=broad-except
    raise TrainingError(f"workdir {workdir!r} is not writable: {e}") from e


def load_text_encoder_if_needed(config: ml_collections.ConfigDict):
  """The frozen T5 for on-the-fly encoding (no embedding cache), checked against text.width."""
  if config.data.embed_cache:
    return None
  from imagen_jax import text  # pylint: disable=g-import-not-at-top
  encoder = text.load_configured(config.text, config.dtype)
  if encoder.width != config.text.width:
    raise config_lib.ConfigError(
        f"config.text.width={config.text.width} but the encoder {config.text.encoder!r} "
        f"has d_model {encoder.width}")
  return encoder


def open_embedding_cache(config: ml_collections.ConfigDict):
  if not config.data.embed_cache:
    return None
  from imagen_jax.text import cache  # pylint: disable=g-import-not-at-top
  embeddings = cache.EmbeddingCache(config.data.embed_cache)
  if embeddings.width != config.text.width or embeddings.max_length != config.text.max_length:
    raise config_lib.ConfigError(
        f"the embedding cache {config.data.embed_cache!r} holds width {embeddings.width}, "
        f"max_length {embeddings.max_length}; the config says text.width={config.text.width}, "
        f"text.max_length={config.text.max_length}")
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  cached_layer, wanted = (encoder_lib.output_layer_of(embeddings.encoder_spec),
                          encoder_lib.output_layer_of(config.text))
  if cached_layer != wanted:
    raise config_lib.ConfigError(
        f"the embedding cache {config.data.embed_cache!r} holds the encoder's output after layer "
        f"{cached_layer} (-1: all) but the config says text.output_layer={wanted}: encode the "
        "captions again with that text.output_layer")
  return embeddings.__getitem__


def init_params(config: ml_collections.ConfigDict, model: nn.Module, key: jax.Array) -> Any:
  """The model's parameters, boxed with their logical axis names."""
  return model.init(key, **models.init_inputs(config, batch_size=1))["params"]


def make_state_shardings(param_shapes: Any, optimizer: Any, mesh: jax.sharding.Mesh
                         ) -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """(shardings, abstract state with those shardings) from the boxed parameter shapes.

  Parameters follow their logical names; optimizer leaves shaped like their parameter follow
  it (Adam's moments, unfactored Adafactor stats); other leaves (counts, Adafactor's factored
  row/column stats) are small and replicated.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = partitioning.tree_shardings(param_shapes, mesh)
  params = nn.unbox(param_shapes)
  abstract = jax.eval_shape(lambda p: state_lib.create(p, optimizer), params)
  # An optimizer's state holds copies of the parameter tree (whole, or masked where optimizers
  # are combined, e.g. Muon beside Adam): a leaf whose path ends in a parameter's path and whose
  # shape is that parameter's is sharded like it.
  by_path = {tuple(path): (param.shape, sharding) for (path, param), sharding in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_shardings))}

  def opt_sharding(path, leaf):
    for start in range(len(path)):  # the longest suffix that names a parameter
      if tuple(path[start:]) in by_path:
        shape, sharding = by_path[tuple(path[start:])]
        return sharding if leaf.shape == shape else replicated
    return replicated

  opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, abstract.opt_state)
  shardings = state_lib.TrainState(
      step=replicated, params=param_shardings, ema_params=param_shardings,
      opt_state=opt_shardings, nonfinite_step=replicated, skipped_updates=replicated)
  return shardings, checkpoints.abstract_like(abstract, shardings)


def place_text_params(text_encoder, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """The frozen encoder's params on the mesh (sharded by their logical names) and shardings."""
  if text_encoder is None:
    return None, None
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  shardings = encoder_lib.param_shardings(text_encoder.config, text_encoder.dtype,
                                          text_encoder.max_length, mesh)
  host = jax.tree_util.tree_map(np.asarray, text_encoder.params)
  return encoder_lib.put_sharded(host, shardings), shardings


def batch_spec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
               ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step sees, sharded over ('data', 'fsdp'): images stay uint8 until
  the step (4x less host-to-device traffic than float32)."""
  b, length = config.batch_size, config.text.max_length
  _, size, low = config_lib.stage_sizes(config)
  shapes = {"image": ((b, size, size, 3), jnp.uint8), "text_mask": ((b, length), jnp.bool_)}
  if low:
    shapes["lowres"] = ((b, low, low, 3), jnp.uint8)
  if config.data.embed_cache:
    shapes["text_emb"] = ((b, length, config.text.width), jnp.float32)
  else:
    shapes["tokens"] = ((b, length), jnp.int32)
  if finetune.uses_prior(config):
    shapes["loss_weight"] = ((b,), jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def device_part(local_batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """The arrays the step consumes (host-only fields such as `index` stay behind)."""
  return {k: local_batch[k] for k in spec}


def batch_shardings(batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  return {k: v.sharding for k, v in batch_shapes.items()}


def check_finite(state: state_lib.TrainState, config: ml_collections.ConfigDict) -> None:
  """Raises, naming the step, if a non-finite loss or gradient was seen (config.nonfinite=error)."""
  bad_step = int(jax.device_get(state.nonfinite_step))
  if bad_step >= 0:
    raise TrainingError(
        f"non-finite loss or gradient at step {bad_step + 1} (the update was not applied; the "
        f"last checkpoint is intact). Lower config.optimizer.lr, check the data, or set "
        f"config.nonfinite='skip' to drop such updates and count them.")


def make_preview(config: ml_collections.ConfigDict, model: nn.Module, text_encoder, mesh,
                 sampling_params=lambda params: params):
  """preview(ema_params) -> uint8 grid [H, W, 3] of samples for fixed prompts / examples.

  `sampling_params` turns the trained parameters into the network's (LoRA: merged adapters).

  Base stages with an encoder sample `config.sample.prompts`; otherwise the text (and SR
  low-res inputs) of the first examples of a fresh training pipeline, fixed by the seed.
  """
  n = int(config.sample.num_images)
  first = next(pipeline_lib.make_pipeline(
      config, tokenize_fn=text_encoder.tokenize if text_encoder else None,
      embedding_lookup=open_embedding_cache(config)))
  first = {k: v[:n] for k, v in first.items()}
  if config.stage == "base" and text_encoder is not None:
    emb, mask = text_encoder.encode(list(config.sample.prompts)[:n])
  elif "text_emb" in first:
    emb, mask = first["text_emb"], first["text_mask"]
  else:
    emb = np.asarray(text_encoder.apply(text_encoder.params, first["tokens"], first["text_mask"]))
    mask = first["text_mask"]
  lowres = preprocess.to_model_range(first["lowres"][:len(emb)]) if config.stage == "sr" else None
  _, size, _ = config_lib.stage_sizes(config)
  settings = stage_sampler.StageSettings.from_config(config.sample)
  sample_fn = jax.jit(functools.partial(stage_sampler.sample_stage, config, model, settings=settings,
                                        image_size=size))
  keys = stage_sampler.image_keys(config.seed, np.arange(len(emb)))

  def preview(ema_params):
    with partitioning.mesh_context(mesh):
      images = sample_fn(sampling_params(ema_params), keys, jnp.asarray(emb), jnp.asarray(mask),
                         lowres=lowres)
    return images_lib.image_grid(np.asarray(preprocess.to_uint8(images)))

  return preview


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                  devices: Sequence[jax.Device] | None = None) -> state_lib.TrainState:
  """The TrainState of a checkpoint laid out on `config.mesh` over `devices` (any count)."""
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  setup = build_train_step(config, partitioning.make_mesh(config.mesh, devices),
                           checkpointer=ckpt, step=step, init_state=False, compile_step=False)
  if setup.state is None:
    raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
  return setup.state


class PreemptionWatcher:
  """True at the step where the job must save and stop: SIGTERM on one host, or JAX's
  preemption sync point (all hosts agree on the step) when running multi-process."""

  def __init__(self):
    self._signalled = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)
