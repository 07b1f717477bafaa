"""FLOP counting for MFU: `mfu.model_flops` against closed forms and XLA's own count."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import models
from imagen_jax.core import config_lib
from imagen_jax.models import chunked_attention
from imagen_jax.models import layers
from imagen_jax.train import mfu


def _flops(fn, *args):
  return mfu.model_flops(jax.jit(fn).trace(*args).jaxpr)


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_matmul_and_batched_einsum_count_two_flops_per_multiply_add():
  a, b = jnp.ones((7, 5)), jnp.ones((5, 3))
  assert _flops(lambda a, b: a @ b, a, b) == 2 * 7 * 5 * 3
  q, k = jnp.ones((2, 9, 4, 6)), jnp.ones((2, 11, 4, 6))
  assert _flops(lambda q, k: jnp.einsum("btnh,bsnh->bnts", q, k), q, k) == 2 * 2 * 4 * 9 * 11 * 6


def test_convolution_and_its_two_gradients_each_count_the_forward_flops():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  forward = 2 * (2 * 8 * 8 * 5) * 3 * 9
  assert _flops(_conv, x, w) == forward
  grads = jax.grad(lambda x, w: _conv(x, w).sum(), argnums=(0, 1))
  assert _flops(grads, x, w) == 3 * forward  # forward, input gradient, weight gradient


def test_the_cpu_convolution_counts_the_same_flops_as_xlas():
  from imagen_jax.models import conv  # pylint: disable=g-import-not-at-top
  ours = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  grads = lambda f: jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1))
  assert _flops(ours, x, w) == _flops(_conv, x, w)
  assert _flops(grads(ours), x, w) == _flops(grads(_conv), x, w)  # no dead forward in the VJP


def test_loop_bodies_count_once_per_iteration_where_xla_counts_them_once():
  x, w = jnp.ones((6, 4, 8)), jnp.ones((8, 16))
  per_iteration = 2 * 4 * 8 * 16
  mapped = lambda x, w: jax.lax.map(lambda a: a @ w, x)
  assert _flops(mapped, x, w) == 6 * per_iteration
  compiled = jax.jit(mapped).lower(x, w).compile().cost_analysis()
  compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
  assert compiled["flops"] < 2 * per_iteration  # the undercount this counter exists to fix


def test_cond_counts_the_larger_branch():
  x = jnp.ones((4, 4))
  fn = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)
  assert _flops(fn, True, x) == 2 * (2 * 4 * 4 * 4)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_attention_gradient_counts_match_the_closed_form(impl):
  b, t, s, n, h = 4, 16, 24, 2, 8
  q, k = jnp.ones((b, t, n, h)), jnp.ones((b, s, n, h))
  mask = jnp.ones((b, s), bool)
  grads = jax.grad(lambda q, k, v: layers.attention(q, k, v, mask, impl).sum(), argnums=(0, 1, 2))
  got = _flops(grads, q, k, k)
  # Forward: logits and output (2 products). Backward: dvalue, dprobs, dquery, dkey (4), plus
  # for the chunked version the recomputed logits (1) and the row sums dout . out (B T N H).
  expected = {"xla": 12 * b * n * t * s * h,
              "chunked": 14 * b * n * t * s * h + 2 * b * t * n * h}[impl]
  assert got == expected


def test_unet_forward_counts_the_same_with_chunked_and_xla_attention():
  config = config_lib.load_config("configs/base64.py:tiny", {"model.attention_impl": "xla"})
  inputs = models.init_inputs(config, batch_size=4)
  counts = {}
  for impl in ("xla", "chunked"):
    config.model.attention_impl = impl
    model = models.build_model(config)
    params = jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0), **inputs))
    # One example per chunk: the chunked attention runs as a loop of 4 iterations.
    with mock.patch.object(chunked_attention, "examples_per_chunk", lambda *_: 1):
      counts[impl] = _flops(lambda p: model.apply(p, **inputs), params)
  assert counts["xla"] > 0
  np.testing.assert_equal(counts["chunked"], counts["xla"])


def test_cudnn_fused_attention_is_counted_from_its_shapes():
  # Traced (not run) on the CPU with cuDNN's version checks stubbed: the jaxpr holds cuDNN's
  # fused forward and backward primitives, whose FLOPs XLA's cost analysis cannot see.
  # JAX is pinned (setup.py); if a new JAX moves these internals, this fails and needs updating.
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  b, t, s, n, h = 2, 128, 96, 4, 64
  q, k = (jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((b, t, n, h), (b, s, n, h)))
  loss = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn").astype(jnp.float32).sum()
  with mock.patch.object(fa, "check_cudnn_version", lambda: 91000), \
       mock.patch.object(fa, "check_compute_capability", lambda _: True), \
       mock.patch.object(fa, "is_cuda_compute_capability_equal", lambda _: False):
    jaxpr = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).jaxpr
  assert "dot_product_attention_bwd" in str(jaxpr)
  assert mfu.model_flops(jaxpr) == (4 + 10) * b * n * t * s * h
