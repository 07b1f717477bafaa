"""`imagen-jax inspect`: the resolved config and the model's parameter table, without training.

Parameters are shaped with `jax.eval_shape`, so the paper-size models cost no memory:

    imagen-jax inspect --config=configs/base64.py:paper
"""

from __future__ import annotations

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from imagen_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/base64.py:tiny.")
flags.mark_flag_as_required("config")


def parameter_table(config) -> tuple[str, int]:
  """Returns (a table of every parameter's path, shape and count; the total count)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from imagen_jax import models  # pylint: disable=g-import-not-at-top
  shapes = models.param_shapes(config)
  rows = [("/".join(str(getattr(k, "key", k)) for k in path), tuple(leaf.shape),
           int(np.prod(leaf.shape)))
          for path, leaf in _flatten(shapes)]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'parameter'.ljust(width)}  {'shape':>20}  {'count':>12}"]
  lines += [f"{name.ljust(width)}  {str(shape):>20}  {count:>12,}" for name, shape, count in rows]
  total = sum(r[2] for r in rows)
  return "\n".join(lines), total


def _flatten(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  print(config_lib.to_json(config))
  from imagen_jax import models  # pylint: disable=g-import-not-at-top
  if not hasattr(models, "param_shapes"):
    print("parameter table: the models are not built yet in this version")
    return
  if "model" in config and config.model:
    table, total = parameter_table(config)
    print(table)
    print(f"total_params: {total}")
