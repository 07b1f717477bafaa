"""Per-device memory of a stage's training step (or sampler) on a mesh, known before launch.

XLA compiles the real sharded step (`train.compile_train_step`: the same model, optimizer, state
shardings and donation as `imagen-jax train`) for a mesh of devices, here fake CPU devices, and
its buffer assignment gives the bytes per device: arguments, outputs and temporaries. The state's
share is computed exactly from its shardings; activations and temporaries are XLA:CPU's figure,
an estimate of what the GPU/TPU compilers assign (they fuse and schedule differently: XLA:CPU's
scheduler favours concurrency over memory, so its figure is likely high, and rematerialization
barely moves it). `imagen-jax inspect --memory` prints it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax.core import partitioning
from imagen_jax.diffusion import stage_sampler
from imagen_jax.train import plan as plan_lib
from imagen_jax.train import train

GIB = 2**30

# Memory per device in bytes, as the vendors state it.
DEVICE_MEMORY = {
    "h100": 80e9, "h200": 141e9, "a100-40gb": 40e9, "a100-80gb": 80e9, "l4": 24e9,
    "tpu-v4": 32 * GIB, "tpu-v5e": 16 * GIB, "tpu-v5p": 95 * GIB, "tpu-v6e": 32 * GIB,
}

ESTIMATE_NOTE = ("XLA:CPU's buffer assignment for the real sharded program: parameters, "
                 "optimizer state and EMA are exact; activations and temporaries are an estimate "
                 "of the GPU/TPU compilers', likely high (XLA:CPU schedules for concurrency, "
                 "they for memory; remat barely moves it).")


@dataclasses.dataclass
class MemoryEstimate:
  """Bytes per device of one compiled program."""
  what: str                     # "train step" or "sampler"
  mesh: dict[str, int]
  per_device_batch: int
  params: int = 0
  optimizer: int = 0
  ema: int = 0
  frozen: int = 0               # a LoRA stage's frozen base parameters
  inputs: int = 0               # the batch (and, for a sampler, text and keys)
  temporaries: int = 0          # activations kept for the backward pass, workspaces
  generated_code: int = 0
  flops_per_device: float = 0.0  # training step: traced matmul/conv FLOPs (remat's recompute shows)

  @property
  def total(self) -> int:
    """Peak bytes: arguments (the donated state's buffers are reused for its outputs) plus
    temporaries."""
    return (self.params + self.optimizer + self.ema + self.frozen + self.inputs
            + self.temporaries)

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "total": self.total}


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp:8' or 'data:2,fsdp:4' -> {'data': 2, 'fsdp': 4, 'model': 1} (unnamed axes are 1)."""
  sizes = {axis: 1 for axis in partitioning.MESH_AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    axis, _, size = part.partition(":")
    if axis not in sizes or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh={spec!r}: each entry is AXIS:SIZE with AXIS one of "
                       f"{partitioning.MESH_AXES} and SIZE a positive integer, got {part!r}")
    sizes[axis] = int(size)
  return sizes


def use_fake_cpu_devices(count: int) -> bool:
  """Before JAX's backend starts: `count` CPU devices, and no LLVM optimization of the compiled
  code (it never runs; buffer assignment is unchanged, compiles are several times faster).
  Returns False when the backend had already started (then the devices are what they are)."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
  try:
    jax.config.update("jax_platforms", "cpu")
  except RuntimeError:
    return False
  return partitioning.use_cpu_devices(max(count, jax.config.jax_num_cpu_devices))


def mesh_for(sizes: dict[str, int]) -> jax.sharding.Mesh:
  """A mesh of the first prod(sizes) devices (the caller provides enough, e.g. fake CPUs)."""
  count = math.prod(sizes.values())
  devices = jax.devices()
  if len(devices) < count:
    raise ValueError(f"a mesh {sizes} needs {count} devices; this process has {len(devices)} "
                     f"(set jax_num_cpu_devices to {count} before JAX starts)")
  return partitioning.make_mesh(sizes, devices[:count])


def _bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _for_planning(config: ml_collections.ConfigDict, global_batch: int
                  ) -> ml_collections.ConfigDict:
  """The config with the batch set and text given as precomputed embeddings, as large runs
  train (the frozen encoder is then not part of the step)."""
  config = config.copy_and_resolve_references()
  config.batch_size = global_batch
  if config.model.get("conv_impl", "auto") == "auto":
    config.model.conv_impl = "xla"  # what "auto" runs on GPU/TPU, not the CPU's matmul gradient
  if config.model.get("attention_impl", "auto") == "auto":
    # Not the CPU's chunked attention, which "auto" would pick on the fake devices: under fsdp
    # its chunks are all-gathered across the batch, so its temporaries grow with the device
    # count. XLA's attention keeps the probabilities, as cuDNN's does not: on a GPU with bf16
    # the estimate is high by their size.
    config.model.attention_impl = "xla"
  config.data.embed_cache = config.data.embed_cache or "(memory estimate: precomputed)"
  return config


def train_step_memory(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      per_device_batch: int) -> MemoryEstimate:
  """Per-device bytes of `imagen-jax train`'s step for `config` on `mesh` (its own compile:
  the SPMD partitioner lays out collectives and gathered weights per mesh)."""
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  config = _for_planning(config, per_device_batch * batch_devices)
  plan = plan_lib.Plan.from_config(config)
  layout = train.state_layout(config, mesh, plan)
  frozen = train.frozen_inputs(layout, plan, None, mesh, restore=False)
  step = train.compile_train_step(config, mesh, layout, plan, None, frozen)
  analysis = step.compiled.memory_analysis()
  state = layout.abstract_state
  return MemoryEstimate(
      what="train step", mesh=dict(mesh.shape), per_device_batch=per_device_batch,
      params=_bytes_per_device(state.params), ema=_bytes_per_device(state.ema_params),
      optimizer=_bytes_per_device(state.opt_state),
      frozen=_bytes_per_device(frozen["base"]),  # None (no LoRA): 0
      inputs=_bytes_per_device(step.batch_shapes),
      temporaries=int(analysis.temp_size_in_bytes),
      generated_code=int(analysis.generated_code_size_in_bytes),
      flops_per_device=step.flops_per_step)


def sampler_memory(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   per_device_batch: int) -> MemoryEstimate:
  """Per-device bytes of one stage's sampler (`diffusion.stage_sampler.sample_stage`, the config's
  `sample.*` settings) with the parameters sharded by their logical names."""
  batch = per_device_batch * mesh.shape["data"] * mesh.shape["fsdp"]
  model = models.build_model(config)
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **models.init_inputs(config))["params"])
  shardings = partitioning.tree_shardings(boxed, mesh)
  params = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      nn.unbox(boxed), shardings)
  on_batch = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
  length, width = config.text.max_length, config.text.width
  inputs = dict(keys=on_batch((batch, 2), np.uint32),
                text_emb=on_batch((batch, length, width), np.float32),
                text_mask=on_batch((batch, length), np.bool_))
  lowres = None
  if config.stage == "sr":
    lowres = on_batch((batch, config.lowres.size, config.lowres.size, 3), np.float32)
  settings = stage_sampler.StageSettings.from_config(config.sample)
  fn = jax.jit(functools.partial(stage_sampler.sample_stage, config, model, settings=settings))
  with partitioning.mesh_context(mesh):
    compiled = fn.trace(params, inputs["keys"], inputs["text_emb"], inputs["text_mask"],
                        lowres=lowres).lower().compile()
  analysis = compiled.memory_analysis()
  return MemoryEstimate(
      what="sampler", mesh=dict(mesh.shape), per_device_batch=per_device_batch,
      params=_bytes_per_device(params),
      inputs=_bytes_per_device(inputs) + (_bytes_per_device(lowres) if lowres else 0),
      temporaries=int(analysis.temp_size_in_bytes),
      generated_code=int(analysis.generated_code_size_in_bytes))


def largest_batch(at_b: MemoryEstimate, at_2b: MemoryEstimate, device_bytes: float) -> int:
  """The largest per-device batch whose total fits `device_bytes`, by a straight line through
  two compiles (per-example memory is constant; XLA's buffer reuse makes it near-linear)."""
  b = at_b.per_device_batch
  slope = (at_2b.total - at_b.total) / (at_2b.per_device_batch - b)
  fixed = at_b.total - slope * b
  if slope <= 0:
    return 0 if fixed > device_bytes else -1  # -1: does not depend on the batch
  return max(0, int((device_bytes - fixed) // slope))


def format_report(estimate: MemoryEstimate, device: str | None = None,
                  largest: int | None = None, compared_with: int | None = None) -> str:
  """A table of the estimate, against `device`'s memory when given."""
  mesh = ", ".join(f"{k}={v}" for k, v in estimate.mesh.items())
  lines = [f"Memory per device of the {estimate.what}: mesh {mesh} "
           f"({math.prod(estimate.mesh.values())} devices), batch {estimate.per_device_batch} "
           "per device"]
  rows = [("parameters", estimate.params), ("optimizer state", estimate.optimizer),
          ("EMA parameters", estimate.ema), ("frozen base parameters (LoRA)", estimate.frozen),
          ("inputs", estimate.inputs),
          ("activations and temporaries", estimate.temporaries), ("total", estimate.total)]
  for name, value in rows:
    if value or name in ("parameters", "total"):
      lines.append(f"  {name:<30} {value / GIB:10.3f} GiB")
  if device:
    capacity = DEVICE_MEMORY[device]
    verdict = "fits" if estimate.total <= capacity else "does NOT fit"
    lines.append(f"  {device}: {capacity / GIB:.1f} GiB per device: {verdict} "
                 f"({100 * estimate.total / capacity:.0f}% used)")
    if largest is not None:
      if largest < 0:
        lines.append("  the total does not grow with the batch here")
      else:
        lines.append(f"  largest per-device batch that fits: {largest} (a line through compiles "
                     f"at batch {estimate.per_device_batch} and {compared_with})")
  lines.append(f"Note: {ESTIMATE_NOTE}")
  return "\n".join(lines)
