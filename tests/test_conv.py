"""The CPU convolution (models/conv.py) against XLA's: values and both gradients."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import models
from imagen_jax.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _ours(x, w, strides, padding):
  return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _value_and_grads(fn, x, w, strides, padding, cotangent):
  out, vjp = jax.vjp(lambda x_, w_: fn(x_, w_, strides, padding), x, w)
  dx, dw = vjp(cotangent.astype(out.dtype))
  return out, dx, dw


# (batch, height, width, in, out, kernel, stride, padding): every shape our networks use (3x3 at
# stride 1 and 2, 1x1 skips, the 12-channel space-to-depth stem) plus odd and non-square sizes.
SHAPES = [
    (2, 8, 8, 16, 8, 3, 1, "SAME"),
    (3, 7, 5, 4, 6, 3, 1, "SAME"),      # odd, non-square
    (2, 8, 8, 8, 16, 3, 2, "SAME"),     # Efficient U-Net down-sampling conv
    (2, 7, 9, 4, 4, 3, 2, "SAME"),      # odd sizes at stride 2
    (2, 6, 6, 8, 4, 1, 1, "SAME"),      # ResBlock skip
    (2, 16, 16, 12, 8, 3, 1, "SAME"),   # stem after a 2x2 space-to-depth of RGB
    (1, 9, 9, 3, 5, 3, 2, "VALID"),
    (1, 6, 6, 3, 5, 3, 1, ((2, 0), (1, 1))),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_xla_in_value_and_both_gradients_float32(shape):
  b, h, w_, cin, cout, k, s, padding = shape
  keys = jax.random.split(jax.random.PRNGKey(sum(shape[:6])), 3)
  x = jax.random.normal(keys[0], (b, h, w_, cin))
  w = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
  out_shape = jax.eval_shape(lambda: _reference(x, w, (s, s), padding)).shape
  cotangent = jax.random.normal(keys[2], out_shape)
  ref = _value_and_grads(_reference, x, w, (s, s), padding, cotangent)
  got = jax.jit(_value_and_grads, static_argnums=(0, 3, 4))(_ours, x, w, (s, s), padding,
                                                              cotangent)
  for name, r, g in zip(("value", "input gradient", "weight gradient"), ref, got):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * scale, rtol=1e-5,
                               err_msg=name)


def test_matches_xla_in_bfloat16_within_bfloat16_precision():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 32)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 16)) / 17).astype(jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 16))
  exact = _value_and_grads(_reference, x.astype(jnp.float32), w.astype(jnp.float32), (1, 1),
                           "SAME", cotangent.astype(jnp.bfloat16).astype(jnp.float32))
  got = _value_and_grads(_ours, x, w, (1, 1), "SAME", cotangent)
  for name, e, g in zip(("value", "input gradient", "weight gradient"), exact, got):
    assert g.dtype == jnp.bfloat16, name
    error = float(jnp.max(jnp.abs(g.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
    assert error < 2e-2, (name, error)  # bf16 keeps 8 bits: 2^-8 = 0.4% per rounding


def test_weight_gradient_is_the_matmul_path_and_is_exact_on_a_hand_example():
  # One 3x3 input, kernel 3x3 SAME, output gradient 1 at the centre only: the weight gradient is
  # the input itself (tap (i, j) saw x[i, j] at the centre).
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  dy = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
  dw = conv.weight_gradient(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(np.asarray(dw[:, :, 0, 0]), np.arange(9.0).reshape(3, 3))


def test_unsupported_layouts_fall_back_to_xla():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 2))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 3))
  dilated = conv.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                      dimension_numbers=NHWC)
  np.testing.assert_allclose(
      dilated, lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                        dimension_numbers=NHWC), rtol=1e-6)


def test_auto_is_the_matmul_gradient_on_x86_cpus_without_avx512_and_bad_names_are_named(
    tmp_path):
  avx2 = tmp_path / "avx2"
  avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                  "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n")
  avx512 = tmp_path / "avx512"
  avx512.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n")
  assert conv.slow_xla_weight_gradient("x86_64", str(avx2))
  assert not conv.slow_xla_weight_gradient("x86_64", str(avx512))
  assert conv.slow_xla_weight_gradient("AMD64", str(tmp_path / "missing"))
  assert not conv.slow_xla_weight_gradient("arm64", str(avx2))
  assert jax.default_backend() == "cpu"
  expected = "matmul_grad" if conv.slow_xla_weight_gradient() else "xla"
  assert conv.resolve("auto") == expected
  assert conv.conv_function("auto") is (None if expected == "xla" else conv.conv_general_dilated)
  assert conv.conv_function("xla") is None
  with pytest.raises(ValueError, match="conv_impl 'cudnn'"):
    conv.resolve("cudnn")


@pytest.mark.parametrize("variant", ["base64.py:tiny", "sr256.py:tiny"])
def test_networks_compute_the_same_loss_and_gradients_with_either_implementation(variant):
  from imagen_jax.core import config_lib
  config = config_lib.load_config(f"configs/{variant}")
  grads = {}
  for impl in ("xla", "matmul_grad"):
    config.model.conv_impl = impl
    model = models.build_model(config)
    inputs = models.init_inputs(config, 2)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 8))
    inputs = {k: (v if v is None or v.dtype == bool else jax.random.normal(next(keys), v.shape))
              for k, v in inputs.items()}
    params = model.init(jax.random.PRNGKey(1), **inputs)["params"]
    # Perturb so the zero-initialized output conv does not hide every other gradient.
    leaves, tree = jax.tree_util.tree_flatten(params)
    noise = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.05 * jax.random.normal(n, jnp.shape(p)) for p, n in
               zip(leaves, noise)])
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))
    grads[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (loss_x, grad_x), (loss_m, grad_m) = grads["xla"], grads["matmul_grad"]
  np.testing.assert_allclose(loss_m, loss_x, rtol=1e-5)
  for gx, gm in zip(jax.tree_util.tree_leaves(grad_x), jax.tree_util.tree_leaves(grad_m)):
    np.testing.assert_allclose(np.asarray(gm), np.asarray(gx), rtol=2e-4,
                               atol=2e-5 * float(jnp.max(jnp.abs(gx)) + 1e-12))
