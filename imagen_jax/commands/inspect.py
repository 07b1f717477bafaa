"""`imagen-jax inspect`: the resolved config and the model's parameter table, without training;
with `--memory`, the per-device memory of the training step (or a sampler) on a mesh.

Parameters are shaped with `jax.eval_shape`, so the paper-size models cost no memory:

    imagen-jax inspect --config=configs/base64.py:paper
    imagen-jax inspect --config=configs/base64.py:500m --memory --mesh=fsdp:8 \
        --batch_size=64 --device=h100

`--memory` compiles the real sharded step for the mesh on fake CPU devices (nothing runs; the
compile takes seconds for tiny configs, minutes for the paper's) and prints parameters,
optimizer state, EMA, inputs and activations per device; with `--device`, whether it fits and
the largest per-device batch that does (a second compile at twice the batch).
"""

from __future__ import annotations

import json
import math
from typing import Sequence

from absl import flags

from imagen_jax import models
from imagen_jax.commands import shared_flags
from imagen_jax.core import config_lib
from imagen_jax.train import memory

shared_flags.use("config", "batch_size")
_MEMORY = flags.DEFINE_bool("memory", False, "Estimate per-device memory by compiling the step.")
_MESH = flags.DEFINE_string("mesh", "fsdp:1", "With --memory: AXIS:SIZE[,AXIS:SIZE] over "
                            "data, fsdp and model, e.g. fsdp:8 or data:8,fsdp:8.")
_DEVICE = flags.DEFINE_enum("device", None, sorted(memory.DEVICE_MEMORY), "With --memory: "
                            "compare with this device's memory; find the largest batch that fits.")
_SAMPLE = flags.DEFINE_bool("sample", False, "With --memory: the stage's sampler (config.sample "
                            "settings) instead of the training step.")


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("config")
  config = shared_flags.CONFIG.value
  if not _MEMORY.value:
    print(config_lib.to_json(config))
    if "model" in config and config.model:
      table, total = models.parameter_table(config)
      print(table)
      print(f"total_params: {total}")
    return
  # --batch_size is per device here; unset, the config's global batch spread over the mesh.
  batch = shared_flags.BATCH_SIZE.value if flags.FLAGS["batch_size"].present else 0
  print_memory(config, _MESH.value, batch, _DEVICE.value, _SAMPLE.value)


def print_memory(config, mesh_spec: str, per_device_batch: int, device: str | None,
                 sample: bool) -> None:
  """Compiles on fake CPU devices and prints the report and one JSON line."""
  sizes = memory.parse_mesh(mesh_spec)
  count = math.prod(sizes.values())
  memory.use_fake_cpu_devices(count)
  mesh = memory.mesh_for(sizes)
  batch_devices = sizes["data"] * sizes["fsdp"]
  if not per_device_batch:
    if config.batch_size % batch_devices:
      raise ValueError(f"config.batch_size={config.batch_size} does not split over the mesh's "
                       f"{batch_devices} batch devices: pass --batch_size (per device)")
    per_device_batch = config.batch_size // batch_devices
  estimate_fn = memory.sampler_memory if sample else memory.train_step_memory
  estimate = estimate_fn(config, mesh, per_device_batch)
  largest = doubled = None
  if device:
    doubled = estimate_fn(config, mesh, 2 * per_device_batch)
    largest = memory.largest_batch(estimate, doubled, memory.DEVICE_MEMORY[device])
  print(memory.format_report(estimate, device, largest,
                             doubled.per_device_batch if doubled else None))
  print("MEMORY_JSON " + json.dumps({**estimate.as_dict(), "device": device,
                                     "largest_per_device_batch": largest}))
