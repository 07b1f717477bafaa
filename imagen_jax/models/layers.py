"""Layers shared by the U-Net (paper F.1) and the Efficient U-Net (F.2, F.3).

Conventions
- Images are NHWC. Parameters are float32; `dtype` is the compute dtype (bfloat16 on
  accelerators). Norms and softmax run in float32.
- Every parameter carries logical axis names from `imagen_jax/core/partitioning.py`: conv kernels
  [kh, kw, in, out] are ("conv_h", "conv_w", "embed", "mlp"), dense kernels [in, out] name their
  axes at the call site, norm scales and biases are ("norm",). Large activations are constrained
  to ("batch", "height", "width", "act_embed") or ("batch", "length", "act_heads", None).
- Text arrives as embeddings [B, L, D] with a mask [B, L] (True = real token). Padded positions
  never reach the output: they are zeroed, masked out of every attention and out of pooling.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import schedules
from imagen_jax.models import chunked_attention
from imagen_jax.models import conv as conv_lib

Dtype = Any
IMAGE_AXES = ("batch", "height", "width", "act_embed")
HEADS_AXES = ("batch", "length", "act_heads", None)
TEXT_AXES = ("batch", "length", "act_embed")
CONV_AXES = ("conv_h", "conv_w", "embed", "mlp")


# --- Parameterized building blocks --------------------------------------------------------------

def dot_general_f32_accumulation(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                                 precision: Any = None, preferred_element_type: Any = None,
                                 **kwargs) -> jax.Array:
  """`lax.dot_general` that accumulates in float32 and returns the inputs' dtype.

  Accelerators accumulate 16-bit products in float32 anyway; XLA:CPU does so only when asked,
  and only then runs bf16 matmuls on the CPU's bf16 dot-product instructions, which are much
  faster than its default path. A no-op for float32 inputs.
  """
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32, **kwargs)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def dense(features: int, axes: tuple[str, str], dtype: Dtype, *, zero_init: bool = False,
          name: str | None = None) -> nn.Dense:
  """A Dense layer [in, out] whose kernel and bias carry logical axis names."""
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  dot_general=dot_general_f32_accumulation,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def conv(features: int, dtype: Dtype, *, kernel: int = 3, strides: int = 1,
         zero_init: bool = False, impl: str = "auto", name: str | None = None) -> nn.Conv:
  """A 'SAME'-padded NHWC convolution with kernel [k, k, in, out] and named axes.

  `impl` ("auto", "xla", "matmul_grad") picks how it is computed (`models/conv.py`); the
  parameters and the function are the same for every choice.
  """
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=conv_lib.conv_function(impl),
                 kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))


def _norm_inits() -> dict[str, Any]:
  return dict(scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
              dtype=jnp.float32, param_dtype=jnp.float32)


def group_norm(x: jax.Array, name: str | None = None, max_groups: int = 32) -> jax.Array:
  """GroupNorm over the channels of x [..., C], computed and returned in float32.

  32 groups as in ADM; narrower (CPU-sized) layers use the largest group count dividing C.
  """
  groups = math.gcd(max_groups, x.shape[-1])
  return nn.GroupNorm(num_groups=groups, name=name, **_norm_inits())(x.astype(jnp.float32))


def layer_norm(x: jax.Array, name: str | None = None) -> jax.Array:
  """LayerNorm over the last axis, in float32."""
  return nn.LayerNorm(name=name, **_norm_inits())(x.astype(jnp.float32))


# --- Parameter-free helpers ---------------------------------------------------------------------

REMAT_POLICIES = ("none", "full", "dots")


def maybe_remat(module: type[nn.Module], remat: bool | str, static_argnums: tuple[int, ...] = ()
                ) -> type[nn.Module]:
  """`module` rematerialized per block by `model.remat`:
  - "none" (or False): every activation the backward pass needs is kept;
  - "full" (or True): only each block's inputs are kept, the block is recomputed in the backward
    pass (about one more forward of the network);
  - "dots": the outputs of matmuls and convolutions are kept, norms and activations recomputed
    (cheap elementwise work instead of memory).
  """
  name = {False: "none", True: "full"}.get(remat, remat)
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown model.remat {remat!r}: use one of {REMAT_POLICIES}")
  if name == "none":
    return module
  policy = None
  if name == "dots":
    policy = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names(conv_lib.CHECKPOINT_NAME))
  return nn.remat(module, static_argnums=static_argnums, policy=policy)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint (a no-op outside `partitioning.mesh_context`)."""
  return nn.with_logical_constraint(x, tuple(axes))


def sinusoidal_features(position: jax.Array, dim: int) -> jax.Array:
  """Transformer sinusoids [N, dim] of positions [N] (periods 2 pi to 2 pi * 10^4; an odd dim
  gets a zero last feature)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  args = position.astype(jnp.float32)[:, None] * freqs[None, :]
  features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(features, ((0, 0), (0, dim - 2 * half)))


def noise_level_features(log_snr: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features [B, dim] of a noise level given as log-SNR [B].

  log-SNR in [LOG_SNR_MIN, LOG_SNR_MAX] = [-20, 20] is mapped linearly to a position in
  [0, 1000] (0 = clean, 1000 = pure noise), the range the transformer/ADM frequencies (periods
  from 2 pi to 2 pi * 10^4) were designed for: the fastest feature then resolves log-SNR steps
  of about 0.04 and the slowest varies monotonically over the whole range.
  """
  span = schedules.LOG_SNR_MAX - schedules.LOG_SNR_MIN
  position = (schedules.LOG_SNR_MAX - log_snr.astype(jnp.float32)) * (1000.0 / span)
  return sinusoidal_features(position, dim)


def downsample(x: jax.Array) -> jax.Array:
  """2x2 average pooling of x [B, H, W, C] (BigGAN-style resampling inside a residual block)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x up-sampling of x [B, H, W, C]."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def with_coordinates(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C + 2]: appends each pixel's (row, column) in [-1, 1].

  Convolutions and attention are translation-equivariant: a base net told "at the top left
  corner" has to find where the top left is. Coordinate channels (CoordConv, Liu et al. 2018)
  give it that at the cost of two input channels; SR nets get positions from the low-res image.
  """
  b, h, w, _ = x.shape
  rows = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=x.dtype)[:, None], (h, w))
  cols = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=x.dtype)[None, :], (h, w))
  coords = jnp.broadcast_to(jnp.stack([rows, cols], axis=-1), (b, h, w, 2))
  return jnp.concatenate([x, coords], axis=-1)


def space_to_depth(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, C p^2]: an optional stem that runs the net at 1/p resolution."""
  if patch == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: jax.Array, patch: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  if patch == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, patch, patch, c // (patch * patch)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch, w * patch, c // (patch * patch))


def attention(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
              implementation: str = "auto") -> jax.Array:
  """Multi-head attention: query [B, T, N, H], key/value [B, S, N, H], key_mask [B, S] bool
  (True = attend) -> [B, T, N, H].

  `implementation`: "xla" or "cudnn" (`jax.nn.dot_product_attention`'s), "chunked" (exact
  attention a few examples at a time with a recomputing gradient, `chunked_attention.py`:
  faster on CPUs, where XLA's version is memory-bound), or "auto" = cuDNN's fused flash attention
  on a GPU with 16-bit inputs (JAX 0.10's `implementation=None` always picks XLA), falling back
  to XLA where cuDNN rejects the shapes at trace time; "chunked" on a CPU; XLA elsewhere.
  """
  if implementation == "chunked" or (implementation == "auto" and jax.default_backend() == "cpu"):
    return chunked_attention.chunked_attention(query, key, value, key_mask)
  mask = key_mask[:, None, None, :]
  if implementation == "auto":
    if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
      except Exception as e:  # pylint: disable=broad-except  (unsupported shape: use XLA's kernel)
        _warn_cudnn_fallback(e)
    implementation = None
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)


_cudnn_fallback_warned = False


def _warn_cudnn_fallback(error: Exception) -> None:
  """Says once per process why cuDNN attention was refused: XLA's kernel is slower and needs
  memory quadratic in the sequence length, so a silent swap would hide the cause of both. Once
  only: a model traces attention at every level, and again for each new shape."""
  global _cudnn_fallback_warned
  if _cudnn_fallback_warned:
    return
  _cudnn_fallback_warned = True
  logging.warning("cuDNN attention is unavailable (%s: %s); using XLA's attention instead "
                  "(slower, more memory). Further fallbacks are not reported.",
                  type(error).__name__, error)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, N*H] -> [B, T, N, H], constrained to the heads layout."""
  b, t, d = x.shape
  return constrain(x.reshape(b, t, num_heads, d // num_heads), HEADS_AXES)


# --- Modules ------------------------------------------------------------------------------------

class ResBlock(nn.Module):
  """BigGAN-style residual block with scale-shift norm (ADM), used by both U-Nets.

  x [B, H, W, C_in], emb [B, E] -> [B, H', W', features]. GroupNorm, SiLU, optional resampling of
  both paths (`resample` "down" = 2x2 average pool, "up" = nearest), 3x3 conv, then
  GroupNorm(h) * (1 + scale) + shift with (scale, shift) projected from the conditioning vector,
  SiLU, dropout and a zero-initialized 3x3 conv, so each block starts as the identity. The skip
  path gets a 1x1 conv where the width changes; the sum is multiplied by `skip_scale`.
  """
  features: int
  resample: str = "none"       # "none", "down" or "up"
  skip_scale: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    h = nn.silu(group_norm(x, "norm1")).astype(self.dtype)
    if self.resample != "none":
      fn = downsample if self.resample == "down" else upsample
      h, x = fn(h), fn(x)
    h = conv(self.features, self.dtype, impl=self.conv_impl, name="conv1")(h)
    scale_shift = dense(2 * self.features, ("embed", "mlp"), self.dtype, name="emb_proj")(
        nn.silu(emb))
    scale, shift = jnp.split(scale_shift.astype(jnp.float32)[:, None, None, :], 2, axis=-1)
    h = group_norm(h, "norm2") * (1.0 + scale) + shift
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.features, self.dtype, zero_init=True, impl=self.conv_impl, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, kernel=1, impl=self.conv_impl, name="skip")(x)
    return constrain((x.astype(self.dtype) + h) * self.skip_scale, IMAGE_AXES)


class AttentionBlock(nn.Module):
  """Residual multi-head attention over image positions, conditioned on text tokens.

  x [B, H, W, C], text [B, L, D] (already LayerNorm'd), text_mask [B, L] -> [B, H, W, C].
  mode "self_and_text" (base, SR 1): queries from the image; keys and values are the image
  positions followed by the text tokens (text keys/values from their own projections), so self-
  and cross-attention share one softmax. mode "cross" (SR 2): keys and values are the text tokens
  only; an example without real tokens gets no update (instead of attending to padding).
  The output projection starts at zero, so the block starts as the identity.
  """
  num_heads: int
  mode: str = "self_and_text"
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    proj = functools.partial(dense, c, ("embed", "joined_kv"), self.dtype)
    h = group_norm(x, "norm").astype(self.dtype).reshape(b, height * width, c)
    query = proj(name="query")(h)
    key = proj(name="text_key")(text)
    value = proj(name="text_value")(text)
    key_mask = text_mask
    if self.mode == "self_and_text":
      key = jnp.concatenate([proj(name="key")(h), key], axis=1)
      value = jnp.concatenate([proj(name="value")(h), value], axis=1)
      key_mask = jnp.concatenate([jnp.ones((b, height * width), bool), text_mask], axis=1)
    elif self.mode != "cross":
      raise ValueError(f"unknown attention mode {self.mode!r}: use 'self_and_text' or 'cross'")
    out = attention(_heads(query, self.num_heads), _heads(key, self.num_heads),
                    _heads(value, self.num_heads), key_mask, self.implementation)
    out = dense(c, ("joined_kv", "embed"), self.dtype, zero_init=True, name="out")(
        out.reshape(b, height * width, c))
    if self.mode == "cross":
      out = out * jnp.any(text_mask, axis=1)[:, None, None].astype(out.dtype)
    return constrain(x + out.reshape(b, height, width, c).astype(x.dtype), IMAGE_AXES)


def _sinusoidal_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
  del key  # deterministic: the table every transformer starts from
  return sinusoidal_features(jnp.arange(shape[0]), shape[1]).astype(dtype)


class Conditioning(nn.Module):
  """The conditioning vector and the text tokens shared by every block of a U-Net.

  Returns (emb [B, emb_dim], text [B, L, D] in the compute dtype):
  - emb = MLP(sinusoidal features of log_snr), plus MLP(features of aug_log_snr) for SR stages
    (noise conditioning augmentation), plus a projection of the attention-pooled text vector
    (unless `text_pooling` is False).
  - text = LayerNorm(text_emb) with padded positions zeroed first (the paper's LayerNorm'd text
    embeddings, which every attention block concatenates into its keys and values), plus a
    learned embedding of each token's position when `text_positions` (initialized to the
    transformer's sinusoids), projected once to `text_dim` channels when `text_dim` > 0.
  Attention pooling (CLIP-style) of the LayerNorm'd tokens without positions: they are projected
  to `pool_width`; a query made from their masked mean attends over the real tokens; an example
  with no real token pools to zeros.
  """
  emb_dim: int
  feature_dim: int
  pool_width: int
  text_dim: int = 0
  pool_head_dim: int = 64
  text_pooling: bool = True  # False: text reaches the blocks through their attention only
  text_positions: bool = False  # True: a learned [L, D] position embedding (sinusoids at init)
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  def _mlp(self, features: jax.Array, name: str) -> jax.Array:
    h = dense(self.emb_dim, ("embed", "mlp"), self.dtype, name=f"{name}_dense1")(features)
    h = dense(self.emb_dim, ("mlp", "embed"), self.dtype, name=f"{name}_dense2")(nn.silu(h))
    return h.astype(jnp.float32)

  @nn.compact
  def __call__(self, log_snr: jax.Array, text_emb: jax.Array, text_mask: jax.Array,
               aug_log_snr: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    emb = self._mlp(noise_level_features(log_snr, self.feature_dim), "noise")
    if aug_log_snr is not None:
      emb = emb + self._mlp(noise_level_features(aug_log_snr, self.feature_dim), "aug")

    text_mask = text_mask.astype(bool)
    text = jnp.where(text_mask[..., None], text_emb.astype(jnp.float32), 0.0)
    text = layer_norm(text, "text_norm")
    text = constrain(text.astype(self.dtype), TEXT_AXES)
    # The pooled vector stays a bag of words (colors and shapes combine additively, which is
    # how unseen color-shape pairs are drawn); word order goes to the attention blocks only.
    pool_source = text
    if self.text_positions:
      # T5 encodes word order only through relative attention biases, which a small or
      # untrained frozen encoder can leave too faint to tell "a red circle to the left of a
      # blue square" from its mirror image. A learned absolute position per token, starting
      # from the transformer's sinusoids, lets every attention block read the order.
      position = self.param(
          "text_position", nn.with_logical_partitioning(_sinusoidal_init,
                                                        ("text_length", "embed")),
          text.shape[1:], jnp.float32)
      # Padded positions stay masked in every attention.
      text = constrain((text + position).astype(self.dtype), TEXT_AXES)
    if self.text_dim:  # one shared projection instead of a wide key/value projection per block
      text = dense(self.text_dim, ("embed", "mlp"), self.dtype, name="text_proj")(text)
      text = constrain(text, TEXT_AXES)

    if not self.text_pooling:
      return emb, text
    # Attention pooling of the text into one vector, added to the noise-level embedding.
    width, heads = self.pool_width, max(1, self.pool_width // self.pool_head_dim)
    tokens = dense(width, ("embed", "mlp"), self.dtype, name="pool_in")(pool_source)
    weights = text_mask.astype(jnp.float32)[..., None]
    count = weights.sum(axis=1)
    mean = (tokens.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(count, 1.0)
    proj = functools.partial(dense, width, ("embed", "joined_kv"), self.dtype)
    query = proj(name="pool_query")(mean.astype(self.dtype))[:, None, :]
    pooled = attention(_heads(query, heads), _heads(proj(name="pool_key")(tokens), heads),
                       _heads(proj(name="pool_value")(tokens), heads), text_mask,
                       self.implementation)
    pooled = pooled.reshape(pooled.shape[0], width) * (count > 0).astype(pooled.dtype)
    emb = emb + dense(self.emb_dim, ("joined_kv", "embed"), self.dtype, name="pool_out")(
        pooled).astype(jnp.float32)
    return emb, text


def upsample_lowres(lowres: jax.Array, height: int, width: int) -> jax.Array:
  """The SR conditioning image [B, h, w, 3] resized (bicubic) to [B, height, width, 3]."""
  b, _, _, c = lowres.shape
  return jax.image.resize(lowres.astype(jnp.float32), (b, height, width, c), "bicubic")


def output_head(h: jax.Array, channels: int, patch: int, dtype: Dtype,
                conv_impl: str = "auto") -> jax.Array:
  """GroupNorm, SiLU and a zero-initialized 3x3 conv to the image channels (undoing the stem's
  space-to-depth); returns float32 [B, H, W, channels]."""
  h = nn.silu(group_norm(h, "out_norm")).astype(dtype)
  h = conv(channels * patch * patch, dtype, zero_init=True, impl=conv_impl, name="out_conv")(h)
  return depth_to_space(h.astype(jnp.float32), patch)
