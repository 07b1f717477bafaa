"""Convolutions that XLA:CPU runs fast: XLA's forward and input gradient, the weight gradient as
matmuls.

Why: on XLA:CPU the weight gradient of a 3x3 convolution is the slow third of a training step:
XLA's own kernel for it runs at a small fraction of the rate of its forward and input-gradient
kernels. The same weight gradient as one matmul per kernel tap (the input shifted by the tap,
contracted with the output gradient over batch and positions) is several times faster. The
forward and input gradient stay XLA's: as matmuls too (im2col or shifted-input matmuls) they
are slower, since XLA:CPU's matmuls with a short contraction are slower than its convolution
kernels and im2col's copies cost more than they save. bf16 inputs accumulate in float32 here
as well.

Which CPUs: the weakness is XLA:CPU's kernel on x86 CPUs without AVX-512. With AVX-512, XLA's
weight gradient is about as fast as the per-tap matmuls or faster, most of all at the demo's
small feature maps, where the matmuls' transposing copies of each tap dominate.

`conv_impl` selects it like `attention_impl`: "auto" is "matmul_grad" on x86 CPUs without
AVX-512 and "xla" everywhere else (AVX-512 CPUs, other CPUs, GPU and TPU); both compute the
same function.
"""

from __future__ import annotations

import functools
import platform
from typing import Any, Callable, Sequence

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name as _checkpoint_name
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "matmul_grad")
# The output's name for rematerialization policies (`model.remat="dots"` keeps it): a custom-VJP
# call is not a `conv_general_dilated` primitive to `jax.checkpoint_policies.dots_saveable`.
CHECKPOINT_NAME = "conv_out"


def resolve(impl: str) -> str:
  """"auto" -> "matmul_grad" on x86 CPUs without AVX-512, "xla" elsewhere; other names are
  checked and returned."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown model.conv_impl {impl!r}: use one of {IMPLEMENTATIONS}")
  if impl == "auto":
    slow = jax.default_backend() == "cpu" and slow_xla_weight_gradient()
    return "matmul_grad" if slow else "xla"
  return impl


@functools.lru_cache(maxsize=None)
def slow_xla_weight_gradient(machine: str | None = None, cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether the host CPU is one where XLA:CPU's weight gradient is slow: x86 without AVX-512
  (no `avx512f` among Linux's /proc/cpuinfo flags; an x86 host without that file counts as
  without). Other architectures: False (untested there, so XLA's own kernels stay the default)."""
  machine = (machine or platform.machine()).lower()
  if machine not in ("x86_64", "amd64", "i386", "i686"):
    return False
  try:
    with open(cpuinfo) as f:
      return not any(line.startswith("flags") and "avx512f" in line.split() for line in f)
  except OSError:
    return True


def conv_function(impl: str) -> Callable[..., jax.Array] | None:
  """The `conv_general_dilated` for `flax.linen.Conv` (None: flax's default, XLA's)."""
  return None if resolve(impl) == "xla" else conv_general_dilated


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` with a matmul weight gradient, for NHWC x HWIO convolutions.

  lhs [B, H, W, C_in], rhs [kh, kw, C_in, C_out] -> [B, H', W', C_out]. Dilated, grouped or
  otherwise laid-out convolutions go to `lax.conv_general_dilated` unchanged.
  """
  plain = (all(d == 1 for d in (lhs_dilation or (1, 1))) and
           all(d == 1 for d in (rhs_dilation or (1, 1))) and
           feature_group_count == 1 and batch_group_count == 1 and lhs.ndim == 4 and
           _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out = _checkpoint_name(_conv(lhs, rhs, strides, pads), CHECKPOINT_NAME)
  return out if preferred_element_type is None else out.astype(preferred_element_type)


def _is_nhwc_hwio(dimension_numbers: Any, lhs_shape: Sequence[int],
                  rhs_shape: Sequence[int]) -> bool:
  if dimension_numbers is None:
    return False
  nhwc = lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
  given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return given == nhwc


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, pads,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
          pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return _xla_conv(x, w, strides, pads)


def _conv_forward(x, w, strides, pads):
  return _xla_conv(x, w, strides, pads), (x, w)


def _conv_backward(strides, pads, residuals, dy):
  x, w = residuals
  # The input gradient: XLA's own (a transposed convolution it runs as fast as a forward).
  # linear_transpose, not vjp: no dead forward convolution in the traced step (FLOP counts).
  transpose = jax.linear_transpose(lambda x_: _xla_conv(x_, w, strides, pads),
                                   jax.ShapeDtypeStruct(x.shape, x.dtype))
  (dx,) = transpose(dy.astype(x.dtype))
  return dx, weight_gradient(x, dy, w.shape[:2], strides, pads).astype(w.dtype)


_conv.defvjp(_conv_forward, _conv_backward)


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_size: Sequence[int],
                    strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> jax.Array:
  """d(loss)/d(kernel) [kh, kw, C_in, C_out] of a convolution, as one matmul per kernel tap.

  x [B, H, W, C_in] the convolution's input, dy [B, H', W', C_out] the output's gradient. Tap
  (i, j) saw the padded input at rows i, i + s, ..., so its gradient is that strided slice
  contracted with dy over (batch, row, column), accumulated in float32.
  """
  (kh, kw), (sh, sw) = kernel_size, strides
  padded = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  b, out_h, out_w, _ = dy.shape
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(padded, (0, i, j, 0),
                         (b, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, x.shape[-1]),
                         (1, sh, sw, 1))
      taps.append(jnp.einsum("bhwi,bhwo->io", window, dy,
                             preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, x.shape[-1], dy.shape[-1])
