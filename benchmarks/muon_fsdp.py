"""The optimizer update alone under FSDP: what Muon's Newton-Schulz costs each device.

    python -m benchmarks.muon_fsdp --config=configs/demo_base.py --devices=8 [--fsdp=1,8]

Each row compiles `optimizer.update` + `apply_updates` for the config's parameters laid out as
`imagen-jax train` lays them out (`train.make_state_shardings`) on a mesh of `--devices` CPU
devices with the given fsdp size (the rest data-parallel), and times it with random gradients.
Adam's update is elementwise, so its work per device falls with the fsdp size; Muon
orthogonalizes each weight matrix as a whole, so XLA gathers the sharded momentum and every
device repeats the Newton-Schulz products of every matrix. The `flops_per_device` column is
XLA's count for one device's program: where it does not fall with fsdp, the work is repeated.
Run with fake CPU devices (the script sets them) it measures work, not a pod's wall time.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app
from absl import flags

_DEVICES = flags.DEFINE_integer("devices", 8, "CPU devices to create (fake devices on a CPU).")
_FSDP = flags.DEFINE_list("fsdp", ["1", "8"], "fsdp sizes to compare (each divides --devices).")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adam", "muon"], "config.optimizer.name values.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed updates per row.")


def main(argv: Sequence[str]) -> None:
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES.value}")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  # after the device count
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax import models  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  boxed = models.param_shapes(config)
  rows = []
  for name in _OPTIMIZERS.value:
    config.optimizer.name = name
    optimizer, _ = state_lib.make_optimizer(config.optimizer, config.total_steps)
    for fsdp in map(int, _FSDP.value):
      mesh = partitioning.make_mesh({"data": -1, "fsdp": fsdp, "model": 1})
      shardings, abstract = train.make_state_shardings(boxed, optimizer, mesh)
      rng = np.random.default_rng(0)
      make = lambda a, s: jax.device_put(rng.normal(size=a.shape).astype(a.dtype) * 1e-2, s)
      params = jax.tree_util.tree_map(make, abstract.params, shardings.params)
      grads = jax.tree_util.tree_map(make, abstract.params, shardings.params)
      opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)

      def update(p, s, g):
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s

      with partitioning.mesh_context(mesh):
        compiled = jax.jit(update, donate_argnums=(0, 1),
                           out_shardings=(shardings.params, shardings.opt_state)).lower(
                               params, opt_state, grads).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      state = {"p": params, "s": opt_state}

      def run():
        state["p"], state["s"] = compiled(state["p"], state["s"], grads)
        jax.block_until_ready(state["p"])

      times = harness.timeit(run, repeats=_REPEATS.value, warmup=1)
      rows.append({"optimizer": name, "mesh": f"data:{mesh.shape['data']},fsdp:{fsdp}",
                   "params": sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(boxed))),
                   "update_ms": round(1e3 * harness.summarize(times)["median_s"], 2),
                   "flops_per_device": float(cost.get("flops", 0.0))})
      print(rows[-1], flush=True)
  harness.report("muon_fsdp", rows, extra={"config": harness.config_label()})


if __name__ == "__main__":
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  _CONFIG = config_lib.config_flag("configs/demo_base.py")
  app.run(main, argv=sys.argv)
