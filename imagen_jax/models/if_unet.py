"""DeepFloyd IF's U-Net: diffusers' `UNet2DConditionModel` as IF's stages configure it, in Flax.

    config = if_unet.from_diffusers_config(json.load(open("unet/config.json")))
    model = if_unet.IFUNet(config, dtype=jnp.bfloat16)
    out = model.apply({"params": params}, sample, timesteps, encoder_hidden_states,
                      encoder_attention_mask=None, class_labels=None)   # [B, H, W, C_out] f32

Inputs are diffusers' in NHWC: sample [B, H, W, C_in] (IF-I: the noisy image; IF-II: the noisy
image and the noise-augmented up-sampled low-res image, 6 channels), timesteps [B] (float: need
not be integers), encoder_hidden_states [B, L, D] (T5 outputs), encoder_attention_mask [B, L]
bool (True = attend) or None, class_labels [B] (IF-II: the augmentation's noise level, embedded
like a timestep). The output holds IF's epsilon and variance values on the channels.

What IF uses, and only that: levels of `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D`
and their up-sampling twins (residual blocks whose resampling happens inside a residual block),
`UNetMidBlock2DSimpleCrossAttn`, attention whose keys and values are the projected text followed
by the image positions (or the text only, `only_cross_attention`), an attention-pooled text
vector added to the time embedding (`addition_embed_type="text"`). `from_diffusers_config`
refuses every setting outside that with a ValueError naming the key and its value.

Masks as diffusers applies them: `encoder_attention_mask` only removes text keys from the
attention (diffusers adds -10000 to their logits: the same softmax in float32). The pooled text
vector and the text's GroupNorm (`cross_attention_norm`) read every position, padding included.
IF's pipelines pass no mask: the U-Net attends to all 77 T5 positions.

Parameters are float32 and carry logical axis names (imagen_jax/core/partitioning.py); their
tree mirrors diffusers' state dict names (`down_blocks.0.resnets.1.conv1.weight` lives at
`down_blocks_0/resnets_1/conv1/kernel`), which imagen_jax/interop/diffusers_format.py maps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import schedules
from imagen_jax.models import layers

Dtype = Any
DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCK = "UNetMidBlock2DSimpleCrossAttn"
_ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu,
                "gelu": functools.partial(jax.nn.gelu, approximate=False)}
_ATTENTION_NORM_EPS = 1e-5  # diffusers' Attention norms ignore norm_eps
_CROSS_NORM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
  """The settings of an IF U-Net, per level where diffusers allows lists (names as diffusers')."""
  block_out_channels: tuple[int, ...]
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  layers_per_block: tuple[int, ...]
  attention_head_dim: tuple[int, ...]
  only_cross_attention: tuple[bool, ...]
  mid_block_only_cross_attention: bool
  cross_attention_dim: int
  in_channels: int = 3
  out_channels: int = 6
  encoder_hid_dim: int | None = None
  addition_embed_type: str | None = None
  addition_embed_type_num_heads: int = 64
  class_embed_type: str | None = None
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  mid_block_scale_factor: float = 1.0
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_norm: str | None = None

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def text_dim(self) -> int:
    """The width of encoder_hidden_states."""
    return self.encoder_hid_dim or self.cross_attention_dim

  def to_diffusers_config(self) -> dict[str, Any]:
    """The config.json dict `UNet2DConditionModel.from_pretrained` builds this network from."""
    fields = dataclasses.asdict(self)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "attention_head_dim", "only_cross_attention"):
      fields[key] = list(fields[key])
    return {"_class_name": "UNet2DConditionModel", **_FIXED, **fields,
            "mid_block_type": MID_BLOCK,
            "encoder_hid_dim_type": "text_proj" if self.encoder_hid_dim else None}


# Settings of UNet2DConditionModel that IF leaves at these values (others are refused).
_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "dropout": 0.0,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "num_class_embeds": None, "num_attention_heads": None,
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "dual_cross_attention": False, "addition_time_embed_dim": None,
}
_CHOICES = {
    "in_channels": (3, 6), "out_channels": (3, 6), "mid_block_type": (MID_BLOCK,),
    "act_fn": tuple(_ACTIVATIONS), "time_embedding_act_fn": (None, *_ACTIVATIONS),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "cross_attention_norm": (None, "group_norm"), "addition_embed_type": (None, "text"),
    "class_embed_type": (None, "timestep"), "encoder_hid_dim_type": (None, "text_proj"),
}
# UNet2DConditionModel's defaults for the keys read here (a config.json may omit a key).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "encoder_hid_dim": None, "attention_head_dim": 8,
    "class_embed_type": None, "addition_embed_type": None, "addition_embed_type_num_heads": 64,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# Read by diffusers but without effect on these blocks (the simple cross-attention blocks are
# not passed them; no convolutional down-sampler), or only a record of the training size.
_NO_EFFECT = ("sample_size", "downsample_padding", "use_linear_projection", "upcast_attention")


def _refuse(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported diffusers UNet setting {key}={value!r}: {why}")


def _per_level(cfg: Mapping[str, Any], key: str, levels: int, kind: type) -> tuple:
  value = cfg[key]
  values = [value] * levels if isinstance(value, kind) else list(value)
  if len(values) != levels or not all(isinstance(v, kind) for v in values):
    raise _refuse(key, value, f"needs one {kind.__name__} or a list of {levels}")
  return tuple(values)


def from_diffusers_config(cfg: Mapping[str, Any]) -> IFUNetConfig:
  """An IFUNetConfig from diffusers' UNet config.json dict, or a ValueError naming the setting
  (key and value) that IF's U-Net does not have."""
  cfg = {**_DIFFUSERS_DEFAULTS, **cfg}
  if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise _refuse("_class_name", cfg["_class_name"], "only UNet2DConditionModel is read")
  known = {f.name for f in dataclasses.fields(IFUNetConfig)} | set(_FIXED) | set(_CHOICES)
  for key, value in cfg.items():
    if key.startswith("_") or key in _NO_EFFECT:
      continue
    if key not in known:
      raise _refuse(key, value, "not a setting this reader knows")
    if key in _FIXED and value != _FIXED[key]:
      raise _refuse(key, value, f"IF's U-Nets use {_FIXED[key]!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
      pixels = " (IF's stages work on pixels: 4 channels is a latent U-Net's)" if value == 4 else ""
      raise _refuse(key, value, f"supported: {list(_CHOICES[key])}{pixels}")
  channels = tuple(cfg["block_out_channels"])
  levels = len(channels)
  down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
  for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                              ("up_block_types", up, UP_BLOCKS)):
    bad = [t for t in types if t not in allowed]
    if bad or len(types) != levels:
      raise _refuse(key, list(types), f"needs {levels} blocks (block_out_channels) of "
                    f"{list(allowed)}" + (f"; {bad[0]!r} is another model's" if bad else ""))
  cross_dim = cfg["cross_attention_dim"]
  if not isinstance(cross_dim, int):
    raise _refuse("cross_attention_dim", cross_dim, "IF's U-Nets use one int")
  only_cross, mid_only_cross = cfg["only_cross_attention"], cfg["mid_block_only_cross_attention"]
  if mid_only_cross is None:  # diffusers' rule: a single bool applies to the middle block too
    mid_only_cross = only_cross if isinstance(only_cross, bool) else False
  groups = cfg["norm_num_groups"]
  if not isinstance(groups, int) or any(c % groups for c in channels):
    raise _refuse("norm_num_groups", groups, f"needs an int dividing {list(channels)}")
  if cfg.get("encoder_hid_dim_type") and not cfg.get("encoder_hid_dim"):
    raise _refuse("encoder_hid_dim", cfg.get("encoder_hid_dim"), "encoder_hid_dim_type needs it")
  names = {f.name for f in dataclasses.fields(IFUNetConfig)}
  scalars = {k: v for k, v in cfg.items() if k in names}
  config = IFUNetConfig(**{
      **scalars, "block_out_channels": channels, "down_block_types": down, "up_block_types": up,
      "layers_per_block": _per_level(cfg, "layers_per_block", levels, int),
      "attention_head_dim": _per_level(cfg, "attention_head_dim", levels, int),
      "only_cross_attention": _per_level(cfg, "only_cross_attention", levels, bool),
      "mid_block_only_cross_attention": bool(mid_only_cross)})
  heads = config.attention_head_dim
  widths = [(heads[-1], channels[-1])]  # (head width, channels) of each attention block
  widths += [(heads[i], channels[i]) for i, t in enumerate(down) if "Attn" in t]
  widths += [(heads[i], channels[levels - 1 - i]) for i, t in enumerate(up) if "Attn" in t]
  if any(head > width for head, width in widths):
    raise _refuse("attention_head_dim", cfg["attention_head_dim"],
                  "wider than an attention block's channels (no head would be left)")
  if config.cross_attention_norm and cross_dim % _CROSS_NORM_GROUPS:
    raise _refuse("cross_attention_dim", cross_dim, "group_norm needs a multiple of 32")
  if config.addition_embed_type and config.text_dim % config.addition_embed_type_num_heads:
    raise _refuse("addition_embed_type_num_heads", config.addition_embed_type_num_heads,
                  f"must divide the text width {config.text_dim}")
  return config


# --- Layers where diffusers differs from models/layers.py ---------------------------------------

def _norm(kind: type[nn.Module], x: jax.Array, name: str, **kwargs) -> jax.Array:
  """GroupNorm or LayerNorm in float32 with torch's two-pass variance and named axes."""
  return kind(name=name, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
              scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
              **kwargs)(x.astype(jnp.float32))


def _group_norm(x: jax.Array, groups: int, eps: float, name: str) -> jax.Array:
  """GroupNorm over [B, ..., C]: statistics per group of channels over every other axis."""
  return _norm(nn.GroupNorm, x, name, num_groups=groups, epsilon=eps)


def _heads(x: jax.Array, heads: int) -> jax.Array:
  b, t, d = x.shape
  return layers.constrain(x.reshape(b, t, heads, d // heads), layers.HEADS_AXES)


def timestep_features(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                      freq_shift: float) -> jax.Array:
  """diffusers' `get_timestep_embedding`: timesteps [B] float -> [B, dim] sinusoids."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(features, ((0, 0), (0, dim - 2 * half)))


class _MLP(nn.Module):
  """diffusers' TimestepEmbedding: linear_1, activation, linear_2."""
  features: int
  act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.features, ("embed", "mlp"), self.dtype, name="linear_1")(
        x.astype(self.dtype))
    h = _ACTIVATIONS[self.act](h)
    return layers.dense(self.features, ("mlp", "embed"), self.dtype, name="linear_2")(h).astype(
        jnp.float32)


class _TextTimeEmbedding(nn.Module):
  """diffusers' TextTimeEmbedding: LayerNorm, attention pooling (a query from the mean token plus
  a learned vector attends over itself and every token), projection, LayerNorm.
  text [B, L, D] -> [B, features]."""
  features: int
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    x = _norm(nn.LayerNorm, text, "norm1", epsilon=1e-5)
    pooled = _AttentionPool(self.heads, self.dtype, self.implementation, name="pool")(x)
    h = layers.dense(self.features, ("joined_kv", "embed"), self.dtype, name="proj")(pooled)
    return _norm(nn.LayerNorm, h, "norm2", epsilon=1e-5)


class _AttentionPool(nn.Module):
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, width = x.shape
    position = self.param("positional_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(width ** -0.5), (None, "embed")), (1, width), jnp.float32)
    query_token = x.mean(axis=1, keepdims=True) + position
    tokens = jnp.concatenate([query_token, x], axis=1).astype(self.dtype)
    proj = functools.partial(layers.dense, width, ("embed", "joined_kv"), self.dtype)
    out = layers.attention(
        _heads(proj(name="q_proj")(query_token.astype(self.dtype)), self.heads),
        _heads(proj(name="k_proj")(tokens), self.heads),
        _heads(proj(name="v_proj")(tokens), self.heads),
        jnp.ones((b, length + 1), bool), self.implementation)
    return out.reshape(b, width)


class _Resnet(nn.Module):
  """diffusers' ResnetBlock2D: x [B, H, W, C] and emb [B, E] -> [B, H', W', features]."""
  features: int
  groups: int
  eps: float
  act: str
  scale_shift: bool
  skip_time_act: bool
  output_scale: float = 1.0
  resample: str = "none"  # "down" (2x2 average pool) or "up" (nearest) inside the block
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.act]
    h = act(_group_norm(x, self.groups, self.eps, "norm1")).astype(self.dtype)
    if self.resample != "none":
      fn = layers.downsample if self.resample == "down" else layers.upsample
      h, x = fn(h), fn(x)
    h = layers.conv(self.features, self.dtype, impl=self.conv_impl, name="conv1")(h)
    t = emb if self.skip_time_act else act(emb)
    t = layers.dense(self.features * (2 if self.scale_shift else 1), ("embed", "mlp"), self.dtype,
                     name="time_emb_proj")(t.astype(self.dtype))
    t = t.astype(jnp.float32)[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = _group_norm(h, self.groups, self.eps, "norm2") * (1.0 + scale) + shift
    else:
      h = _group_norm(h.astype(jnp.float32) + t, self.groups, self.eps, "norm2")
    h = layers.conv(self.features, self.dtype, impl=self.conv_impl, name="conv2")(
        act(h).astype(self.dtype))
    if x.shape[-1] != self.features:
      x = layers.conv(self.features, self.dtype, kernel=1, impl=self.conv_impl,
                      name="conv_shortcut")(x.astype(self.dtype))
    return layers.constrain((x.astype(self.dtype) + h) / self.output_scale, layers.IMAGE_AXES)


class _Attention(nn.Module):
  """diffusers' Attention with AttnAddedKVProcessor: x [B, H, W, C], text [B, L, D], text_mask
  [B, L] -> x + attention of GroupNorm(x) over [projected text; GroupNorm(x)] (the text only
  when `only_cross`). Where every text key of an example is masked and there is nothing else to
  attend, it attends to all of them (what a constant -10000 on every logit does)."""
  heads: int
  head_dim: int
  only_cross: bool
  cross_norm: bool
  groups: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = _group_norm(x, self.groups, _ATTENTION_NORM_EPS, "group_norm")
    h = h.astype(self.dtype).reshape(b, height * width, c)
    if self.cross_norm:
      text = _group_norm(text, _CROSS_NORM_GROUPS, _ATTENTION_NORM_EPS, "norm_cross")
    text = text.astype(self.dtype)
    proj = functools.partial(layers.dense, self.heads * self.head_dim, ("embed", "joined_kv"),
                             self.dtype)
    query = proj(name="to_q")(h)
    key, value = proj(name="add_k_proj")(text), proj(name="add_v_proj")(text)
    if self.only_cross:
      key_mask = text_mask | ~jnp.any(text_mask, axis=1, keepdims=True)
    else:
      key = jnp.concatenate([key, proj(name="to_k")(h)], axis=1)
      value = jnp.concatenate([value, proj(name="to_v")(h)], axis=1)
      key_mask = jnp.concatenate([text_mask, jnp.ones((b, height * width), bool)], axis=1)
    out = layers.attention(_heads(query, self.heads), _heads(key, self.heads),
                           _heads(value, self.heads), key_mask, self.implementation)
    out = layers.dense(c, ("joined_kv", "embed"), self.dtype, name="to_out_0")(
        out.reshape(b, height * width, self.heads * self.head_dim))
    return layers.constrain(x + out.reshape(b, height, width, c).astype(x.dtype),
                            layers.IMAGE_AXES)


# --- Blocks -------------------------------------------------------------------------------------

class _Block(nn.Module):
  """One level of the encoder ("down"), the middle ("mid") or one of the decoder ("up");
  `level` counts from the top for "down" and from the bottom for "up", as diffusers' lists do."""
  config: IFUNetConfig
  kind: str
  level: int = 0
  dtype: Dtype = jnp.float32
  remat: bool | str = "none"
  attention_impl: str = "auto"
  conv_impl: str = "auto"

  def _resnet(self, features: int, name: str, resample: str = "none",
              output_scale: float | None = None) -> nn.Module:
    cfg = self.config
    return layers.maybe_remat(_Resnet, self.remat)(
        features=features, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act=cfg.act_fn,
        scale_shift=cfg.resnet_time_scale_shift == "scale_shift",
        skip_time_act=cfg.resnet_skip_time_act,
        output_scale=output_scale or cfg.resnet_out_scale_factor, resample=resample,
        dtype=self.dtype, conv_impl=self.conv_impl, name=name)

  def _attention(self, features: int, head_dim: int, only_cross: bool, name: str) -> nn.Module:
    cfg = self.config
    return layers.maybe_remat(_Attention, self.remat)(
        heads=features // head_dim, head_dim=head_dim, only_cross=only_cross,
        cross_norm=cfg.cross_attention_norm is not None, groups=cfg.norm_num_groups,
        dtype=self.dtype, implementation=self.attention_impl, name=name)

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, text: jax.Array, text_mask: jax.Array,
               skips: tuple[jax.Array, ...] = ()) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """-> (h, the activations a "down" level hands to the decoder)."""
    cfg, i = self.config, self.level
    levels = len(cfg.block_out_channels)
    if self.kind == "mid":
      features = cfg.block_out_channels[-1]
      h = self._resnet(features, "resnets_0", output_scale=cfg.mid_block_scale_factor)(h, emb)
      h = self._attention(features, cfg.attention_head_dim[-1],
                          cfg.mid_block_only_cross_attention, "attentions_0")(h, text, text_mask)
      return self._resnet(features, "resnets_1",
                          output_scale=cfg.mid_block_scale_factor)(h, emb), ()
    down = self.kind == "down"
    level = i if down else levels - 1 - i
    features = cfg.block_out_channels[level]
    attends = "Attn" in (cfg.down_block_types if down else cfg.up_block_types)[i]
    # diffusers indexes the heads' width by the up block's own position, not its level's.
    head_dim = cfg.attention_head_dim[i]
    only_cross = cfg.only_cross_attention[level]
    outputs, skips = [], list(skips)
    for j in range(cfg.layers_per_block[level] + (0 if down else 1)):
      if not down:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self._resnet(features, f"resnets_{j}")(h, emb)
      if attends:
        h = self._attention(features, head_dim, only_cross, f"attentions_{j}")(h, text, text_mask)
      outputs.append(h)
    if level != (levels - 1 if down else 0):
      h = self._resnet(features, "downsamplers_0" if down else "upsamplers_0",
                       "down" if down else "up")(h, emb)
      outputs.append(h)
    return h, tuple(outputs) if down else ()


class IFUNet(nn.Module):
  """DeepFloyd IF's U-Net (diffusers' UNet2DConditionModel); see the module docstring."""
  config: IFUNetConfig
  dtype: Dtype = jnp.float32
  remat: bool | str = "none"  # per residual and attention block (layers.maybe_remat)
  attention_impl: str = "auto"
  conv_impl: str = "auto"

  def _embedding(self, timesteps: jax.Array, text: jax.Array,
                 class_labels: jax.Array | None) -> jax.Array:
    cfg = self.config
    features = functools.partial(timestep_features, dim=cfg.block_out_channels[0],
                                 flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    mlp = functools.partial(_MLP, cfg.time_embed_dim, cfg.act_fn, self.dtype)
    emb = mlp(name="time_embedding")(features(timesteps))
    if cfg.class_embed_type == "timestep":
      if class_labels is None:
        raise ValueError("this U-Net (class_embed_type='timestep') needs class_labels "
                         "(IF-II: the low-res image's noise level)")
      emb = emb + mlp(name="class_embedding")(features(jnp.reshape(class_labels, (-1,))))
    elif class_labels is not None:
      raise ValueError("class_labels given to a U-Net without a class embedding")
    if cfg.addition_embed_type == "text":
      emb = emb + _TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                     self.dtype, self.attention_impl, name="add_embedding")(text)
    if cfg.time_embedding_act_fn:
      emb = _ACTIVATIONS[cfg.time_embedding_act_fn](emb)
    return emb

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None,
               class_labels: jax.Array | None = None) -> jax.Array:
    """sample [B, H, W, C_in], timesteps [B], encoder_hidden_states [B, L, D], mask [B, L] bool
    or None, class_labels [B] or None -> [B, H, W, C_out] float32."""
    cfg = self.config
    b, height, width, _ = sample.shape
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} must be a multiple of {factor} "
                       f"({len(cfg.block_out_channels)} levels)")
    timesteps = jnp.broadcast_to(jnp.reshape(timesteps, (-1,)), (b,))
    text = encoder_hidden_states.astype(jnp.float32)
    emb = self._embedding(timesteps, text, class_labels)
    if cfg.encoder_hid_dim:
      text = layers.dense(cfg.cross_attention_dim, ("embed", "mlp"), self.dtype,
                          name="encoder_hid_proj")(text.astype(self.dtype))
    text = layers.constrain(text, layers.TEXT_AXES)
    mask = (jnp.ones(text.shape[:2], bool) if encoder_attention_mask is None
            else encoder_attention_mask.astype(bool))

    block = functools.partial(_Block, cfg, dtype=self.dtype, remat=self.remat,
                              attention_impl=self.attention_impl, conv_impl=self.conv_impl)
    h = layers.conv(cfg.block_out_channels[0], self.dtype, impl=self.conv_impl,
                    name="conv_in")(sample.astype(self.dtype))
    skips = [h]
    for i in range(len(cfg.down_block_types)):
      h, outputs = block("down", i, name=f"down_blocks_{i}")(h, emb, text, mask)
      skips += outputs
    h, _ = block("mid", name="mid_block")(h, emb, text, mask)
    for i in range(len(cfg.up_block_types)):
      count = cfg.layers_per_block[len(cfg.block_out_channels) - 1 - i] + 1
      h, _ = block("up", i, name=f"up_blocks_{i}")(h, emb, text, mask, tuple(skips[-count:]))
      skips = skips[:-count]
    assert not skips, "every encoder activation feeds one decoder block"
    h = _ACTIVATIONS[cfg.act_fn](_group_norm(h, cfg.norm_num_groups, cfg.norm_eps,
                                             "conv_norm_out"))
    h = layers.conv(cfg.out_channels, self.dtype, impl=self.conv_impl, name="conv_out")(
        h.astype(self.dtype))
    return h.astype(jnp.float32)


class IFStage(nn.Module):
  """An IF U-Net as a stage's network (`models.build_model`'s inputs: x, log_snr, text_emb,
  text_mask, lowres, aug_log_snr): the noise levels become the discrete timesteps the U-Net was
  trained on (`schedules.DiscreteSchedule`), the low-res input joins the noisy image on the
  channels (upsampled to its size if it is not already), and its augmentation level becomes
  the U-Net's class label. Parameters live under `unet/`. IF's pipelines give the U-Net no text
  mask; `text_mask=True` passes the framework's."""
  config: IFUNetConfig
  schedule: str = "cosine"
  timesteps: int = 1000
  aug_schedule: str = "cosine"
  aug_timesteps: int = 1000
  text_mask: bool = False
  dtype: Dtype = jnp.float32
  remat: bool | str = "none"
  attention_impl: str = "auto"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, log_snr: jax.Array, text_emb: jax.Array,
               text_mask: jax.Array, lowres: jax.Array | None = None,
               aug_log_snr: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B, H, W, 3], log_snr [B], text_emb [B, L, D], text_mask [B, L], lowres [B, h, w, 3]
    and aug_log_snr [B] (SR) -> [B, H, W, out_channels] float32 (eps, then the variance)."""
    del train  # IF's U-Nets have no dropout
    steps = schedules.discrete_schedule(self.schedule, self.timesteps).timestep(log_snr)
    sample, labels = x, None
    if lowres is not None:
      if lowres.shape[1:3] != x.shape[1:3]:
        lowres = augmentation.upsample_align_corners(lowres, x.shape[1])
      sample = jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)
      labels = schedules.discrete_schedule(self.aug_schedule, self.aug_timesteps).timestep(
          aug_log_snr)
    unet = IFUNet(self.config, self.dtype, self.remat, self.attention_impl, self.conv_impl,
                  name="unet")
    return unet(sample, steps, text_emb, text_mask if self.text_mask else None, labels)


def init_inputs(config: IFUNetConfig, batch_size: int = 1, image_size: int | None = None,
                text_length: int = 77) -> dict[str, Any]:
  """Zero inputs for `IFUNet.init` (kwargs); the smallest image the levels allow by default."""
  size = image_size or 2 ** (len(config.block_out_channels) - 1)
  return dict(
      sample=jnp.zeros((batch_size, size, size, config.in_channels), jnp.float32),
      timesteps=jnp.zeros((batch_size,), jnp.float32),
      encoder_hidden_states=jnp.zeros((batch_size, text_length, config.text_dim), jnp.float32),
      encoder_attention_mask=None,
      class_labels=(jnp.zeros((batch_size,), jnp.float32)
                    if config.class_embed_type == "timestep" else None))


def param_shapes(config: IFUNetConfig) -> Any:
  """The parameter tree as ShapeDtypeStructs in `nn.Partitioned` boxes (nothing allocated)."""
  return jax.tree_util.tree_map(lambda x: x, _param_shapes(config))  # a copy of the cached tree


@functools.lru_cache(maxsize=8)
def _param_shapes(config: IFUNetConfig) -> Any:
  # Tracing IF-I-XL takes seconds; reading and writing weights both need its shapes.
  model = IFUNet(config)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **init_inputs(config, text_length=1))["params"])


def count_parameters(config: IFUNetConfig | Mapping[str, Any]) -> int:
  """Parameters of the U-Net an IFUNetConfig or a diffusers config dict describes."""
  if not isinstance(config, IFUNetConfig):
    config = from_diffusers_config(config)
  leaves = jax.tree_util.tree_leaves(nn.unbox(param_shapes(config)))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
