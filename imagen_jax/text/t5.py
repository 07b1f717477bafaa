"""The T5 v1.1 encoder in Flax linen: RMSNorm, gated-GELU, shared relative position bias.

Parameter names follow t5x (`token_embedder/embedding`, `layers_3/attention/query/kernel`, ...), so
t5x checkpoints map one to one and Hugging Face ones by a fixed rename and transpose
(`weights.py`). Every parameter carries logical axis names from `core/partitioning.py`, so the
4.6B-parameter XXL encoder is sharded over the mesh ('embed' over fsdp; heads, d_ff and vocab over
model) by the same rules as the U-Nets.

Numerics match Hugging Face's `T5EncoderModel` (the reference): no attention scaling (T5 folds
it into the query initialisation), RMSNorm and softmax in float32, the tanh GELU ("gelu_new"),
and the relative position buckets computed in float32 exactly as it does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape of a T5 v1.1 encoder. `d_kv` is the per-head width (num_heads * d_kv may != d_model)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_heads: int = 64
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# The released T5 v1.1 encoders (Raffel et al. 2020; google/t5-v1_1-* and t5x's t5_1_1_*).
SIZES: dict[str, T5Config] = {
    "small": T5Config(d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "base": T5Config(d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "large": T5Config(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": T5Config(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": T5Config(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
}


def size_name(config: T5Config) -> str:
  """"xxl" etc. for a released shape (any vocabulary), else "custom"."""
  for name, preset in SIZES.items():
    if dataclasses.replace(preset, vocab_size=config.vocab_size) == config:
      return name
  return "custom"


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets for key - query offsets: int32 [length (query), length (key)].

  Computed with NumPy at trace time (the length is static) in float32 with truncation, as the
  reference does, so bucket boundaries agree exactly.
  """
  context = np.arange(length)[:, None]
  memory = np.arange(length)[None, :]
  relative = memory - context
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  is_small = distance < max_exact
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  if_large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (buckets + np.where(is_small, distance, if_large)).astype(np.int32)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
           init: Any, dtype: Any) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


class Embed(nn.Module):
  """Token embedding [vocab, d_model] (t5x: token_embedder/embedding)."""
  num_embeddings: int
  features: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    embedding = _param(self, "embedding", (self.num_embeddings, self.features),
                       ("vocab", "embed"), _normal(1.0), self.param_dtype)
    return jnp.take(embedding, ids, axis=0).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """The [1, H, L, L] float32 bias from a [H, buckets] table (t5x: relpos_bias/rel_embedding)."""
  config: T5Config
  param_dtype: Any

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    c = self.config
    table = _param(self, "rel_embedding", (c.num_heads, c.relative_attention_num_buckets),
                   ("heads", "relpos_buckets"), _normal(c.d_model ** -0.5), self.param_dtype)
    buckets = relative_position_buckets(length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    return jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=1)[None]


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, statistics in float32."""
  epsilon: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones,
                   self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free projection of the last axis; the kernel is [in, out] with logical names."""
  features: int
  names: tuple[str, str]
  stddev: float
  dtype: Any
  param_dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _param(self, "kernel", (x.shape[-1], self.features), self.names,
                    _normal(self.stddev), self.param_dtype)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)


def _dense_maker(module: nn.Module):
  """dense(name, features, axis names, init stddev) with `module`'s dtypes and precision."""
  return lambda name, n, names, std: Dense(n, names, std, module.dtype, module.param_dtype,
                                           module.precision, name=name)


class Attention(nn.Module):
  """Bidirectional multi-head self-attention with an additive [B or 1, H, L, L] bias."""
  config: T5Config
  dtype: Any
  param_dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    inner = c.num_heads * c.d_kv
    dense = _dense_maker(self)
    # T5's initialisation carries the 1/sqrt(d_kv) attention scale in the query.
    q = dense("query", inner, ("embed", "joined_kv"), (c.d_model * c.d_kv) ** -0.5)(x)
    k = dense("key", inner, ("embed", "joined_kv"), c.d_model ** -0.5)(x)
    v = dense("value", inner, ("embed", "joined_kv"), c.d_model ** -0.5)(x)
    split = lambda t: t.reshape(t.shape[:2] + (c.num_heads, c.d_kv))
    q, k, v = split(q), split(k), split(v)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "kv"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    weights = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    out = out.reshape(out.shape[:2] + (inner,))
    return dense("out", c.d_model, ("joined_kv", "embed"), inner ** -0.5)(out)


class GatedGeluMlp(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's feed-forward block."""
  config: T5Config
  dtype: Any
  param_dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = _dense_maker(self)
    gate = jax.nn.gelu(dense("wi_0", c.d_ff, ("embed", "mlp"), c.d_model ** -0.5)(x),
                       approximate=True)
    hidden = gate * dense("wi_1", c.d_ff, ("embed", "mlp"), c.d_model ** -0.5)(x)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
    return dense("wo", c.d_model, ("mlp", "embed"), c.d_ff ** -0.5)(hidden)


class EncoderLayer(nn.Module):
  config: T5Config
  dtype: Any
  param_dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(c.layer_norm_epsilon, name="pre_attention_layer_norm", **kw)(x)
    x = x + Attention(c, precision=self.precision, name="attention", **kw)(h, bias)
    h = RMSNorm(c.layer_norm_epsilon, name="pre_mlp_layer_norm", **kw)(x)
    x = x + GatedGeluMlp(c, precision=self.precision, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def check_output_layer(output_layer: int, config: T5Config) -> None:
  """`output_layer` must be -1 or 0..num_layers: a ValueError naming `text.output_layer`."""
  if not -1 <= output_layer <= config.num_layers:
    raise ValueError(f"text.output_layer={output_layer}: the encoder has {config.num_layers} "
                     "layers; use -1 (all), or 0 (token embeddings) to num_layers")


class T5Encoder(nn.Module):
  """T5 v1.1 encoder: token ids [B, L] int32 and mask [B, L] bool -> [B, L, d_model] (or
  [B, L, 2 * d_model] with `append_token_embeddings`).

  The output is float32, and zero at masked (padding) positions unless `keep_padding`. `dtype`
  is the compute dtype
  (float32 or bfloat16); `param_dtype` the dtype parameters are created in.
  """
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # The residual stream after this many layers, through the final norm, is the output (-1: all
  # layers, T5's own output; 0: the token embeddings alone, with no context). See
  # `check_output_layer`.
  output_layer: int = -1
  # True: padding positions keep what the layers computed there (Hugging Face's T5 output, which
  # DeepFloyd IF's U-Nets read), instead of zeros.
  keep_padding: bool = False
  # True: each token's output is followed by its own embedding through the final norm (the
  # `output_layer=0` reading, no context): [B, L, 2 * d_model].
  append_token_embeddings: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    check_output_layer(self.output_layer, c)
    # float32 matmuls at full precision: TPUs and GPUs (TF32) otherwise round the inputs.
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=precision)
    x = Embed(c.vocab_size, c.d_model, self.dtype, self.param_dtype, name="token_embedder")(ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    embeddings = x

    # One bias table [H, buckets] shared by all layers (only layer 0 has it in Hugging Face).
    position_bias = RelativePositionBias(c, self.param_dtype, name="relpos_bias")(ids.shape[1])
    # Padding keys get -1e10 (as t5x): exp underflows to exactly 0 like the reference's finfo.min,
    # and an all-padding row (batch filler) stays finite instead of turning into NaN.
    mask_bias = jnp.where(mask[:, None, None, :], 0.0, -1e10)
    bias = position_bias + mask_bias  # [B, H, L, L]

    for i in range(c.num_layers if self.output_layer < 0 else self.output_layer):
      x = EncoderLayer(c, name=f"layers_{i}", **kw)(x, bias)
    final_norm = RMSNorm(c.layer_norm_epsilon, self.dtype, self.param_dtype, name="encoder_norm")
    x = final_norm(x)
    if self.append_token_embeddings:
      x = jnp.concatenate([x, final_norm(embeddings)], axis=-1)
    if self.keep_padding:
      return x.astype(jnp.float32)
    return jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)

