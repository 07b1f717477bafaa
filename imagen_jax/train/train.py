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
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
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
from imagen_jax import text
from imagen_jax.models import lora
from imagen_jax.text import cache
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.train import metric_writers
from imagen_jax.train import mfu
from imagen_jax.train import plan as plan_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss, a config that does not fit the mesh."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence[jax.Device] | None = None,
                       stop_at_step: int | None = None,
                       before_data: Callable[[ml_collections.ConfigDict, plan_lib.Plan], None]
                       | None = None) -> state_lib.TrainState:
  """Trains `config`'s stage in `workdir` up to config.total_steps; returns the final state.

  `devices` (default: all) is the mesh's device set; tests use it to compare meshes.
  `stop_at_step`: save a checkpoint at this step and return, the schedules still those of
  config.total_steps, so that a later call (on any mesh) continues the same run. The demo trains
  its base stage's first steps on one core this way while the SR stage trains on the other.
  `before_data(config, plan)` runs once everything is checked, before the input pipeline opens:
  fine-tuning samples its class images there (`workflows/finetune.py`).
  """
  if stop_at_step is not None and not 0 < stop_at_step <= config.total_steps:
    raise config_lib.ConfigError(f"stop_at_step={stop_at_step}: it must be a step of the run, "
                                 f"1 to total_steps={config.total_steps}")
  last_step = config.total_steps if stop_at_step is None else stop_at_step
  # --- 1. Check the config, the workdir and what the run starts from, before any compute -----
  workdir = fileio.resolve(str(workdir))  # Orbax refuses relative paths (in a background thread)
  mesh = partitioning.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  check_workdir_writable(workdir)
  # Fine-tuning: the base stage checked against the config and its step fixed.
  config, plan = plan_lib.prepare(config, workdir)
  if before_data is not None:
    before_data(config, plan)
  lead = jax.process_index() == 0

  # --- 2. Text encoder and data: this process's shard of the global batch ------------------
  text_encoder = load_text_encoder_if_needed(config)
  data = plan_lib.make_data(config, plan, workdir,
                            text_encoder.tokenize if text_encoder else None,
                            open_embedding_cache(config))

  # --- 3. State (restored, or created sharded), frozen inputs, the step compiled ahead of time
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
  layout = state_layout(config, mesh, plan)
  start_step = ckpt.latest_step() or 0
  if start_step:
    logging.info("Resuming from the checkpoint at step %d in %s", start_step, ckpt.directory)
    state, data_state = ckpt.restore(start_step, layout.abstract_state)
    data.set_state(data_state)
  else:
    state = create_state(config, layout, plan)
  frozen = frozen_inputs(layout, plan, text_encoder, mesh,
                         null_text=empty_prompt_embedding(config, text_encoder))
  step_fn = compile_train_step(config, mesh, layout, plan, text_encoder, frozen)
  distributed.barrier("compiled_train_step")  # hosts compile at different speeds
  peak_flops, _ = mfu.peak_tflops_per_device()

  # --- 4. Writers: TensorBoard (lead process only), console, config, parameter table -------
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not lead)
  progress = metric_writers.ReportProgress(config.total_steps, config.batch_size)
  if lead:
    fileio.write_text(fileio.join(workdir, "config.json"), config_lib.to_json(config))
    logging.info("Parameters:\n%s\ntotal_params: %d", *models.parameter_table(config))
    if plan.lora is not None:
      logging.info("LoRA adapters (%s): %d trained parameters; the base is frozen",
                   plan.lora, lora.count(state.params))
  logging.info("Compiled the train step in %.1f s; %s FLOPs per step per device",
               step_fn.compile_seconds,
               f"{step_fn.flops_per_step:.3g}" if step_fn.flops_per_step else "unknown")
  preview = None
  if config.sample_every:
    preview = make_preview(config, layout.model, text_encoder, mesh,
                           lambda params: plan.network_params(params, frozen["base"]))
  preemption = PreemptionWatcher()

  # --- 5. The loop -------------------------------------------------------------------------
  try:
    train_metrics = None
    progress.start(start_step)
    for step in range(start_step + 1, last_step + 1):
      batch = pipeline_lib.global_batch(device_part(next(data), step_fn.batch_shapes), mesh)
      state, metrics = step_fn.compiled(state, batch, frozen)
      train_metrics = metrics if train_metrics is None else merge_metrics(train_metrics, metrics)
      ckpt.check()  # a checkpoint that failed in the background stops the run here

      if step % config.log_every == 0 or step == last_step:
        # The host waits for the device only here, for previews and for checkpoints.
        check_finite(state, config)
        scalars = {k: float(v) for k, v in train_metrics.compute().items()}
        scalars.update(mfu.throughput(progress.report(step), config.batch_size,
                                      step_fn.flops_per_step, peak_flops))
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


# --- The state, the frozen inputs and the compiled step: for the loop, restores, benchmarks ---

@dataclasses.dataclass(frozen=True)
class StateLayout:
  """A stage's train state as abstract arrays on a mesh: what it holds and where it lives."""
  model: nn.Module
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: state_lib.TrainState    # ShapeDtypeStructs carrying their shardings
  state_shardings: state_lib.TrainState
  abstract_network: Any                   # the network's parameters (a LoRA run's frozen base)
  mesh: jax.sharding.Mesh


def state_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 plan: plan_lib.Plan) -> StateLayout:
  """The abstract state and its shardings, from the boxed parameter shapes (nothing is
  allocated): parameters follow their logical names, optimizer leaves their parameter."""
  model = models.build_model(config)
  optimizer, lr_schedule = state_lib.make_optimizer(config.optimizer, config.total_steps)
  state_shardings, abstract_state = make_state_shardings(
      plan.trainable_shapes(config, model), optimizer, mesh)
  network_shapes = models.param_shapes(config)
  abstract_network = checkpoints.abstract_like(
      nn.unbox(network_shapes), partitioning.tree_shardings(network_shapes, mesh))
  return StateLayout(model, optimizer, lr_schedule, abstract_state, state_shardings,
                     abstract_network, mesh)


def create_state(config: ml_collections.ConfigDict, layout: StateLayout,
                 plan: plan_lib.Plan) -> state_lib.TrainState:
  """A fresh state at step 0, created directly sharded: as the plan starts its parameters."""
  initial = plan.initial_trainable(config, layout.model, layout.abstract_network)
  with partitioning.mesh_context(layout.mesh):
    return jax.jit(lambda: state_lib.create(initial(), layout.optimizer),
                   out_shardings=layout.state_shardings)()


def frozen_inputs(layout: StateLayout, plan: plan_lib.Plan, text_encoder: Any,
                  mesh: jax.sharding.Mesh, restore: bool = True,
                  null_text: np.ndarray | None = None) -> dict[str, Any]:
  """What the step reads but never updates, on the mesh: {"text": the frozen encoder's params
  or None, "base": a LoRA run's frozen network or None, and with `null_text` (float32
  [1, L, D], `empty_prompt_embedding`) "null_text", what condition dropout puts in place of a
  caption}; abstract unless `restore`."""
  frozen = {"text": place_text_params(text_encoder, mesh, restore),
            "base": plan.frozen_base(layout.abstract_network, restore)}
  if null_text is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen["null_text"] = (jax.ShapeDtypeStruct(null_text.shape, jnp.float32,
                                                sharding=replicated) if not restore
                           else jax.device_put(np.asarray(null_text, np.float32), replicated))
  return frozen


def empty_prompt_embedding(config: ml_collections.ConfigDict, text_encoder: Any = None
                           ) -> np.ndarray | None:
  """The encoded empty caption [1, L, D] where `config.text.null` is "empty_prompt" (IF's
  unconditional text; the stage's own encoder is loaded if `text_encoder` is None), else None."""
  if config.text.get("null", "zeros") != "empty_prompt":
    return None
  encoder = text_encoder or text.load_configured(config.text)
  return np.asarray(encoder.encode([""])[0][:1], np.float32)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The training step compiled ahead of time for a mesh, with the state donated."""
  compiled: Any                           # (state, batch, frozen) -> (state, metrics)
  batch_shapes: dict[str, jax.ShapeDtypeStruct]  # the global batch, with its shardings
  compile_seconds: float
  flops_per_step: float                   # per device, from the traced step


def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       layout: StateLayout, plan: plan_lib.Plan, text_encoder: Any,
                       frozen: dict[str, Any]) -> CompiledStep:
  """Traces and AOT-compiles the step for `layout` on `mesh` (as maxdiffusion does)."""
  train_step = step_lib.make_train_step(config, layout.model, layout.optimizer,
                                        layout.lr_schedule,
                                        text_encoder.apply if text_encoder else None,
                                        plan.apply_fn(layout.model))
  batch_shapes = batch_spec(config, mesh, plan)
  frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  with partitioning.mesh_context(mesh):
    start = time.perf_counter()
    traced = jax.jit(
        train_step, in_shardings=(layout.state_shardings, batch_shardings(batch_shapes),
                                  frozen_shardings),
        out_shardings=(layout.state_shardings, None), donate_argnums=(0,)
    ).trace(layout.abstract_state, batch_shapes, frozen)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
  return CompiledStep(compiled, batch_shapes, seconds, mfu.model_flops(traced.jaxpr) / mesh.size)


# --- Helpers, in the order the loop uses them ------------------------------------------------

# One dispatch per step instead of one per metric field: eager merges dispatch an op per field,
# host time that a CPU-hosted step would otherwise get.
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
  encoder = text.load_configured(config.text, config.dtype)
  if encoder.width != config.text.width:
    raise config_lib.ConfigError(
        f"config.text.width={config.text.width} but the encoder {config.text.encoder!r} "
        f"outputs width {encoder.width}")
  return encoder


def open_embedding_cache(config: ml_collections.ConfigDict):
  if not config.data.embed_cache:
    return None
  embeddings = cache.EmbeddingCache(config.data.embed_cache)
  if embeddings.width != config.text.width or embeddings.max_length != config.text.max_length:
    raise config_lib.ConfigError(
        f"the embedding cache {config.data.embed_cache!r} holds width {embeddings.width}, "
        f"max_length {embeddings.max_length}; the config says text.width={config.text.width}, "
        f"text.max_length={config.text.max_length}")
  cached, wanted = (encoder_lib.reading_of(embeddings.encoder_spec),
                    encoder_lib.reading_of(config.text))
  if cached != wanted:
    raise config_lib.ConfigError(
        f"the embedding cache {config.data.embed_cache!r} holds the encoder's output after layer "
        f"{cached[0]} (-1: all), token embeddings appended: {cached[1]}; the config says "
        f"text.output_layer={wanted[0]}, text.append_token_embeddings={wanted[1]}: encode the "
        "captions again with those settings")
  return embeddings.__getitem__


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


def place_text_params(text_encoder, mesh: jax.sharding.Mesh, restore: bool = True) -> Any:
  """The frozen encoder's params on the mesh, sharded by their logical names (abstract, with
  their shardings, unless `restore`); None without an encoder."""
  if text_encoder is None:
    return None
  shardings = encoder_lib.param_shardings(text_encoder.config, text_encoder.dtype,
                                          text_encoder.max_length, mesh)
  if not restore:
    return checkpoints.abstract_like(text_encoder.params, shardings)
  host = jax.tree_util.tree_map(np.asarray, text_encoder.params)
  return encoder_lib.put_sharded(host, shardings)


def batch_spec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               plan: plan_lib.Plan) -> dict[str, jax.ShapeDtypeStruct]:
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
  if plan.uses_prior:
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
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
  layout = state_layout(config, partitioning.make_mesh(config.mesh, devices),
                        plan_lib.Plan.from_config(config))
  return ckpt.restore(step, layout.abstract_state)[0]


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
    return multihost_utils.reached_preemption_sync_point(step)
