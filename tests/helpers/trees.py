"""Equality of pytrees."""

from typing import Any


def assert_trees_equal(a: Any, b: Any) -> None:
  """Two pytrees with the same structure and bitwise-equal leaves."""
  import jax  # pylint: disable=g-import-not-at-top  # after conftest's environment
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
