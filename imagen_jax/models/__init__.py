"""U-Nets (paper F.1) and Efficient U-Nets (F.2, F.3), built from a stage config.

    model = build_model(config)
    params = model.init(rng, **init_inputs(config))["params"]
    out = model.apply({"params": params}, x, log_snr, text_emb, text_mask,
                      lowres=None, aug_log_snr=None)    # [B, H, W, 3] float32

Inputs: x [B, H, W, 3] the noisy image z_t; log_snr [B] its noise level as log-SNR; text_emb
[B, L, D] and text_mask [B, L] bool (True = real token); for SR stages lowres [B, h, w, 3] (the
noise-augmented low-res image) and aug_log_snr [B] its augmentation level. The output is the
network's prediction in the configured parameterization. Parameters are float32 and boxed in
`nn.Partitioned` with logical axis names (see imagen_jax/core/partitioning.py); the compute
dtype is `config.dtype`. Pass `train=True` (and a "dropout" rng) to apply `config.model.dropout`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax.core import config_lib
from imagen_jax.models import if_unet
from imagen_jax.models.efficient_unet import EfficientUNet
from imagen_jax.models.unet import UNet

__all__ = ["EfficientUNet", "UNet", "build_model", "init_inputs", "param_shapes",
           "parameter_table"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The stage's network from `config.model` ("unet", "efficient_unet" or "if_unet") and
  `config.dtype`."""
  m = config.model
  if config.dtype not in _DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
  if m.name == "if_unet":
    return if_stage(config)
  common = dict(dropout=m.dropout, remat=m.remat, stem_patch=m.get("stem_patch", 1),
                dtype=_DTYPES[config.dtype], attention_impl=m.get("attention_impl", "auto"),
                conv_impl=m.get("conv_impl", "auto"), text_pooling=m.get("text_pooling", True),
                text_positions=m.get("text_positions", False))
  if m.name == "unet":
    return UNet(model_dim=m.model_dim, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
                attn_every_block=m.get("attn_every_block", True),
                cross_attn_resolutions=tuple(m.get("cross_attn_resolutions", ())),
                head_dim=m.head_dim,
                emb_dim=m.get("emb_dim", 0),
                pool_width=m.get("pool_width", 0), text_dim=m.get("text_dim", 0),
                coord_channels=m.get("coord_channels", False), **common)
  if m.name == "efficient_unet":
    if config.stage != "sr":
      raise ValueError("model.name 'efficient_unet' is a super-resolution net: needs stage 'sr'")
    return EfficientUNet(channels=tuple(m.channels), num_res_blocks=tuple(m.num_res_blocks),
                         text_attention=m.text_attention, num_heads=m.num_heads,
                         emb_dim=m.emb_dim, pool_width=m.pool_width,
                         text_dim=m.get("text_dim", 0), **common)
  raise ValueError(f"unknown config.model.name {m.name!r}: use 'unet', 'efficient_unet' or "
                   "'if_unet'")


def if_stage(config: ml_collections.ConfigDict) -> if_unet.IFStage:
  """The IF U-Net of `config.model.diffusers` (diffusers' config.json) as a stage's network, on
  the stage's discrete schedule; a setting IF's networks cannot take is refused by name."""
  m, d = config.model, config.diffusion
  unet = if_unet.from_diffusers_config(m.diffusers.to_dict()
                                       if hasattr(m.diffusers, "to_dict") else m.diffusers)
  if not d.get("timesteps", 0) or d.formulation != "vp":
    raise ValueError("model.name 'if_unet' is a discrete-time network: it needs "
                     "diffusion.formulation 'vp' and diffusion.timesteps > 0 (IF's: 1000), got "
                     f"{d.formulation!r} and {d.get('timesteps', 0)}")
  channels = 6 if d.get("variance", "fixed") == "learned_range" else 3
  if unet.out_channels != channels:
    raise ValueError(f"model.diffusers.out_channels={unet.out_channels} but diffusion.variance="
                     f"{d.get('variance', 'fixed')!r} needs {channels}")
  wanted_in = 6 if config.stage == "sr" else 3
  if unet.in_channels != wanted_in:
    raise ValueError(f"model.diffusers.in_channels={unet.in_channels}: a {config.stage!r} stage "
                     f"reads {wanted_in} channels")
  if (config.stage == "sr") != (unet.class_embed_type == "timestep"):
    raise ValueError(f"model.diffusers.class_embed_type={unet.class_embed_type!r}: an IF SR stage "
                     "embeds its augmentation level as a timestep, a base stage has none")
  if config.stage == "sr" and not config.lowres.get("aug_timesteps", 0):
    raise ValueError("an IF SR stage embeds the augmentation level as a timestep: it needs "
                     "lowres.aug_timesteps > 0 (IF's: 1000)")
  if unet.text_dim != config.text.width:
    raise ValueError(f"model.diffusers reads text of width {unet.text_dim} but text.width="
                     f"{config.text.width}")
  return if_unet.IFStage(
      unet, d.schedule, d.timesteps, config.lowres.aug_schedule,
      config.lowres.get("aug_timesteps", 0) or 1000, m.get("text_mask", False),
      _DTYPES[config.dtype], m.get("remat", "none"), m.get("attention_impl", "auto"),
      m.get("conv_impl", "auto"))


def init_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, Any]:
  """Dummy inputs (float32 zeros, an all-True mask) at training size: kwargs for init/apply."""
  _, size, lowres_size = config_lib.stage_sizes(config)
  inputs = dict(
      x=jnp.zeros((batch_size, size, size, 3), jnp.float32),
      log_snr=jnp.zeros((batch_size,), jnp.float32),
      text_emb=jnp.zeros((batch_size, config.text.max_length, config.text.width), jnp.float32),
      text_mask=jnp.ones((batch_size, config.text.max_length), bool),
      lowres=None, aug_log_snr=None)
  if config.stage == "sr":
    if config.lowres.get("augment_at", "input") == "output":
      lowres_size = size  # the stage's network reads the low-res image upsampled
    inputs["lowres"] = jnp.zeros((batch_size, lowres_size, lowres_size, 3), jnp.float32)
    inputs["aug_log_snr"] = jnp.zeros((batch_size,), jnp.float32)
  return inputs


def param_shapes(config: ml_collections.ConfigDict) -> Any:
  """The parameter tree as `jax.ShapeDtypeStruct`s inside `nn.Partitioned` boxes (no memory)."""
  model = build_model(config)
  init = lambda: model.init(jax.random.PRNGKey(0), **init_inputs(config))["params"]
  return jax.eval_shape(init)


def parameter_table(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(a table of every parameter's path, shape, logical axes and count; the total count).

  `imagen-jax inspect` prints it. Each `nn.Partitioned` box is one parameter.
  """
  leaves = jax.tree_util.tree_flatten_with_path(
      param_shapes(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  rows = []
  for path, leaf in leaves:
    names = leaf.names if isinstance(leaf, nn.Partitioned) else None
    shape = tuple(nn.unbox(leaf).shape)
    rows.append(("/".join(str(getattr(k, "key", k)) for k in path), str(shape),
                 ",".join(str(n) for n in names) if names else "-", int(np.prod(shape))))
  widths = [max(len(title), *(len(r[i]) for r in rows))
            for i, title in enumerate(("parameter", "shape", "logical axes"))]
  line = lambda r, count: (f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  "
                           f"{r[2].ljust(widths[2])}  {count:>13}")
  lines = [line(("parameter", "shape", "logical axes"), "count")]
  lines += [line(r, f"{r[3]:,}") for r in rows]
  return "\n".join(lines), sum(r[3] for r in rows)
