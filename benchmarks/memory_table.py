"""Per-device training memory of the paper-size stages on 1, 8 and 64 devices (fsdp), by remat policy.

    python -m benchmarks.memory_table                       # the RESULTS.md table (slow: minutes
                                                           # per compile of a paper-size step)
    python -m benchmarks.memory_table --configs=configs/base64.py:tiny --devices=1,8 \
        --remat=none,full --batch_sizes=2                  # seconds (what the GPU suite's CPU check runs)

Each row is `imagen-jax inspect --memory`'s figure (`train/memory.py`): the real sharded training
step compiled for fake CPU devices, state bytes exact, activations XLA:CPU's estimate; "fits"
compares the total with an H100 (80 GB) and an H200 (141 GB). Compute FLOPs per step (traced,
`train/mfu.py`) show remat's recomputation cost.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list(
    "configs", ["configs/base64.py:500m", "configs/base64.py:paper", "configs/sr256.py:paper",
                "configs/sr1024.py:paper"], "Stage configs.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["64", "16", "64", "64"],
                             "Per-device batch per config (JAX-Toolbox's: 64 for 500M and the "
                             "SR stages, 16 for the 2B base).")
_DEVICES = flags.DEFINE_list("devices", ["1", "8", "64"], "fsdp mesh sizes.")
_REMAT = flags.DEFINE_list("remat", ["none", "dots", "full"], "model.remat policies.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import memory  # pylint: disable=g-import-not-at-top
  memory.use_fake_cpu_devices(max(int(d) for d in _DEVICES.value))

  batches = [int(b) for b in _BATCHES.value]
  if len(batches) == 1:
    batches *= len(_CONFIGS.value)
  rows = []
  for spec, batch in zip(_CONFIGS.value, batches):
    for remat in _REMAT.value:
      config = config_lib.load_config(spec, {"model.remat": remat, "dtype": _DTYPE.value})
      for devices in (int(d) for d in _DEVICES.value):
        mesh = memory.mesh_for({"data": 1, "fsdp": devices, "model": 1})
        est = memory.train_step_memory(config, mesh, batch)
        gib = lambda b: round(b / memory.GIB, 2)
        rows.append({
            "config": spec, "remat": remat, "devices": devices, "batch_per_device": batch,
            "params_gib": gib(est.params), "optimizer_gib": gib(est.optimizer),
            "ema_gib": gib(est.ema), "activations_gib": gib(est.temporaries),
            "total_gib": gib(est.total),
            "fits_h100": est.total <= memory.DEVICE_MEMORY["h100"],
            "fits_h200": est.total <= memory.DEVICE_MEMORY["h200"],
            "tflop_per_step_per_device": round(est.flops_per_device / 1e12, 2)})
        print(rows[-1], flush=True)
  harness.report("memory_table", rows)


if __name__ == "__main__":
  app.run(main)
