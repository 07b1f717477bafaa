"""The optimizers built from config: Muon's split of the parameters, its orthogonalized updates,
and the shardings of every optimizer's state (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from helpers import short_run_config  # pylint: disable=g-bad-import-order
from imagen_jax import models
from imagen_jax.core import partitioning
from imagen_jax.train import state as state_lib
from imagen_jax.train import train as train_lib


def muon_config(**overrides):
  return short_run_config(**{"optimizer.name": "muon", "optimizer.warmup_steps": 0,
                             "model.text_positions": True,
                             "optimizer.schedule": "constant", **overrides})


def test_muon_reads_kernels_as_matrices_and_leaves_the_rest_to_adam():
  params = nn.unbox(models.param_shapes(muon_config()))
  dims = state_lib.muon_dimensions(params)
  conv = dims["down0_res0"]["conv1"]["kernel"]
  assert (conv.reduction_axis, conv.output_axis) == ((0, 1, 2), (3,))  # [3*3*in, out]
  dense = dims["mid_attn"]["query"]["kernel"]
  assert (dense.reduction_axis, dense.output_axis) == ((0,), (1,))
  assert dims["stem"]["kernel"] is None and dims["out_conv"]["kernel"] is None
  assert dims["conditioning"]["text_position"] is None  # an embedding table
  # What reads the conditioning vector goes to Adam too.
  assert dims["conditioning"]["noise_dense1"]["kernel"] is None
  assert dims["down0_res0"]["emb_proj"]["kernel"] is None
  assert dims["down0_res0"]["conv1"]["bias"] is None
  # Every >= 2-D parameter outside the excluded layers goes to Muon.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  flat_dims = jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_dims)[0]
  assert len(flat_dims) == len(flat)
  names = lambda path: {str(getattr(k, "key", k)) for k in path}
  for (path, p), (_, d) in zip(flat, flat_dims):
    expected = p.ndim >= 2 and not names(path) & set(state_lib.MUON_EXCLUDED)
    assert (d is not None) == expected, path


def test_muon_update_is_an_orthogonalized_gradient_at_adams_scale():
  config = muon_config(**{"optimizer.lr": 1e-2, "optimizer.clip_norm": 0.0})
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  nn.unbox(models.param_shapes(config)))
  optimizer, _ = state_lib.make_optimizer(config.optimizer, config.total_steps)
  # A dominant rank-one gradient for one convolution (what plain SGD or Adam would follow along
  # one direction); noise elsewhere.
  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype) * 1e-3,
                                 params)
  kernel = params["down0_res0"]["conv1"]["kernel"]
  u, v = rng.normal(size=(int(np.prod(kernel.shape[:-1])), 1)), rng.normal(size=(1, kernel.shape[-1]))
  low_rank = u @ v + 0.05 * rng.normal(size=(u.shape[0], v.shape[1]))
  grads["down0_res0"]["conv1"]["kernel"] = jnp.asarray(low_rank.reshape(kernel.shape), jnp.float32)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)

  matrix = np.asarray(updates["down0_res0"]["conv1"]["kernel"]).reshape(low_rank.shape)
  singular = np.linalg.svd(matrix, compute_uv=False)
  grad_singular = np.linalg.svd(low_rank, compute_uv=False)
  assert grad_singular[0] / grad_singular[-1] > 30  # (five Newton-Schulz steps lift a
  # direction ~500x at most: far weaker ones than this stay small)
  # Newton-Schulz's quintic leaves singular values within ~[0.7, 1.2] of one: every direction
  # moves, not only the gradient's dominant one; scaled to RMS `muon_rms` per unit of lr.
  assert singular.max() / singular.min() < 2.0, singular
  rms = np.sqrt(np.mean(matrix ** 2))
  np.testing.assert_allclose(rms, 1e-2 * config.optimizer.muon_rms, rtol=0.35)
  # The first and last layers take Adam's first step: sign-like, one size on every entry (lr,
  # times 1 + b1 (1 - b1) / (1 - b1^2) from the Nesterov look-ahead of the Adam inside Muon),
  # whatever each gradient's size.
  stem = np.abs(np.asarray(updates["stem"]["kernel"]))
  np.testing.assert_allclose(stem, 1e-2 * (1 + 0.9 * 0.1 / (1 - 0.9 ** 2)), rtol=5e-3)


def per_device_bytes(abstract, shardings):
  """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
  return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(
      jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)))


def leaf_at(tree, *names):
  """The leaf whose path ends with `names` inside the first node named names[0]."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = lambda path: [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  found = [leaf for path, leaf in flat if names[0] in keys(path)
           and keys(path)[-(len(names) - 1):] == list(names[1:])]
  assert len(found) == 1, (names, len(found))
  return found[0]


@pytest.mark.parametrize("name", ["adam", "muon", "adafactor"])
def test_optimizer_state_is_sharded_like_its_parameters(name):
  overrides = {"optimizer.name": name, "mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2}
  if name == "adafactor":  # widths where Adafactor factors some second moments
    overrides.update({"model.emb_dim": 128, "model.pool_width": 128})
  config = short_run_config(**overrides)
  optimizer, _ = state_lib.make_optimizer(config.optimizer, config.total_steps)
  mesh = partitioning.make_mesh(config.mesh)
  boxed = models.param_shapes(config)
  shardings, abstract = train_lib.make_state_shardings(boxed, optimizer, mesh)
  kernel = ("down0_res0", "conv1", "kernel")
  kernel_sharding = leaf_at(shardings.params, *kernel)
  assert kernel_sharding.spec != jax.sharding.PartitionSpec()  # sharded, so the test can tell
  params = per_device_bytes(abstract.params, shardings.params)
  full = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract.params))
  assert params < full / 2
  state = per_device_bytes(abstract.opt_state, shardings.opt_state)
  small = 4096  # step counts and other scalars, replicated
  if name == "adam":  # two moments per parameter, each laid out like it
    assert 2 * params <= state <= 2 * params + small
    assert leaf_at(shardings.opt_state, "mu", *kernel) == kernel_sharding
    assert leaf_at(shardings.opt_state, "nu", *kernel) == kernel_sharding
  if name == "muon":  # one momentum per matrix, Adam's two moments for the rest
    dims = state_lib.muon_dimensions(nn.unbox(boxed))
    is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
    on_muon = [d is not None for d in jax.tree_util.tree_leaves(dims, is_leaf=is_dims)]
    pick = lambda tree, keep: [x for x, k in zip(jax.tree_util.tree_leaves(tree), on_muon)
                               if k == keep]
    matrices = per_device_bytes(pick(abstract.params, True), pick(shardings.params, True))
    rest = params - matrices
    assert 0 < matrices and 0 < rest
    assert matrices + 2 * rest <= state <= matrices + 2 * rest + small
  if name == "adafactor":  # factored statistics are small and replicated; the rest sharded
    assert state < params
  # Scalars (counts) are replicated.
  for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract.opt_state),
                            jax.tree_util.tree_leaves(shardings.opt_state)):
    if leaf.ndim == 0:
      assert sharding.spec == jax.sharding.PartitionSpec()


def test_unknown_optimizer_is_refused_naming_the_key():
  config = short_run_config(**{"optimizer.name": "sgd"})
  with pytest.raises(ValueError, match="config.optimizer.name.*'sgd'.*muon"):
    state_lib.make_optimizer(config.optimizer, 10)
