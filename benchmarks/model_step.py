"""Compile time and forward+backward step time of a stage's network (no optimizer, no data).

    python -m benchmarks.model_step --config=configs/base64.py:tiny --batch_size=16
    python -m benchmarks.model_step --config=configs/sr256.py:tiny --config.model.stem_patch=2

Times the gradient of the mean squared output with respect to the parameters at training size,
on random inputs, under `jax.jit`: the network's share of a training step.
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from imagen_jax.core import hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base64.py:tiny.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Examples per step.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after the compiling one.")


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax import models  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  model = models.build_model(config)
  inputs = models.init_inputs(config, _BATCH.value)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  inputs = {k: (v if v is None or v.dtype == bool else jax.random.normal(next(keys), v.shape))
            for k, v in inputs.items()}
  params = jax.jit(model.init)(jax.random.PRNGKey(1), **inputs)["params"]

  @jax.jit
  def step(params, inputs):
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))
    return jax.value_and_grad(loss)(params)

  start = time.perf_counter()
  compiled = step.lower(params, inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, inputs))
  times = harness.timeit(lambda: jax.block_until_ready(compiled(params, inputs)),
                         repeats=_REPEATS.value)
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  row = {"config": config.model.name, "params": count, "batch_size": _BATCH.value,
         "compile_s": round(compile_s, 2), **{k: round(v, 4) for k, v in
                                               harness.summarize(times).items()},
         "images_per_s": round(_BATCH.value / min(times), 1)}
  harness.report("model_step", [row])


if __name__ == "__main__":
  hugepages.reexecute_with_huge_pages()  # as `imagen-jax` runs (core/hugepages.py)
  flags.mark_flag_as_required("config")
  app.run(main)
