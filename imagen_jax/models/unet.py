"""The base stage's U-Net (paper appendix F.1): the ADM U-Net with Imagen's text conditioning.

Layout (ADM, Dhariwal & Nichol 2021, which F.1 adapts):
- a 3x3 stem conv to `model_dim` channels;
- encoder: per level (channels model_dim * channel_mult[i]) `num_res_blocks` BigGAN-style
  residual blocks with scale-shift norm, each followed by an attention block where the feature
  map's resolution is in `attn_resolutions` (with `attn_every_block=False` only the level's last
  one is: imagen-pytorch's and DeepFloyd IF's placement, num_res_blocks times less attention),
  or a text-only cross-attention block where it is in `cross_attn_resolutions` (imagen-pytorch's
  `layer_cross_attns`: the text reaches a resolution whose self-attention would cost too much);
  between levels a residual block that down-samples (2x2 average pool inside the block,
  BigGAN-style);
- middle: residual block, attention block, residual block at the lowest resolution;
- decoder: per level `num_res_blocks + 1` residual blocks, each taking one encoder activation
  by concatenation (ADM's skip wiring), attention where the resolution calls for it, and an
  up-sampling residual block between levels;
- GroupNorm, SiLU, zero-initialized 3x3 conv to the 3 output channels.
Every attention block puts the LayerNorm'd text tokens into its keys and values next to the image
positions; the attention-pooled text vector is added to the noise-level embedding (see
`layers.Conditioning`).

Choices where the paper is silent (stated so they can be checked):
- middle block with attention: yes, as in ADM; decoder blocks per level: num_res_blocks + 1;
- attention heads of `head_dim` = 64 channels; the text tokens are projected once to `text_dim`
  channels, from which each attention block makes its text keys and values (as NVIDIA's
  JAX-Toolbox and NeMo Imagen do), instead of a 4096-wide projection per block;
- conditioning width `emb_dim` and text-pooling width `pool_width`.
configs/base64.py sets emb_dim = pool_width = text_dim = 2 * model_dim: with T5-XXL text that is
2.08B parameters at model_dim 512 (the paper's 2B) and 0.52B at model_dim 256 (JAX-Toolbox's
Imagen-base-500M). ADM's 4 * model_dim conditioning and per-block 4096-wide text projections
would give 2.40B, well over the paper's count.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models import layers


class UNet(nn.Module):
  """Text-conditioned U-Net on [B, H, W, 3] images; see the module docstring."""
  model_dim: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  attn_every_block: bool = True  # False: attention only after a level's last residual block
  cross_attn_resolutions: Sequence[int] = ()  # text-only attention where there is no self-attention
  head_dim: int = 64
  emb_dim: int = 0             # 0: 4 * model_dim (ADM)
  pool_width: int = 0          # 0: emb_dim
  text_dim: int = 0            # 0: text keys/values projected from the encoder's width
  text_pooling: bool = True    # False: no pooled text vector in the conditioning embedding
  text_positions: bool = False  # True: token positions join the attention's text (layers.py)
  dropout: float = 0.0
  remat: bool | str = "none"   # per block: "none", "full" or "dots" (layers.maybe_remat)
  stem_patch: int = 1
  coord_channels: bool = False  # append (row, column) input channels: absolute positions
  out_channels: int = 3
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = "auto"
  conv_impl: str = "auto"        # models/conv.py: "auto", "xla" or "matmul_grad"

  @nn.compact
  def __call__(self, x: jax.Array, log_snr: jax.Array, text_emb: jax.Array,
               text_mask: jax.Array, lowres: jax.Array | None = None,
               aug_log_snr: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B, H, W, 3] (z_t), log_snr [B], text_emb [B, L, D], text_mask [B, L] -> [B, H, W, 3].

    `lowres` and `aug_log_snr` turn the same net into a super-resolution net (the low-res image
    is up-sampled and concatenated on channels; its noise level joins the conditioning).
    `train` enables dropout (needs a "dropout" rng when `dropout` > 0).
    """
    emb_dim = self.emb_dim or 4 * self.model_dim
    emb, text = layers.Conditioning(
        emb_dim=emb_dim, feature_dim=self.model_dim, pool_width=self.pool_width or emb_dim,
        text_dim=self.text_dim, pool_head_dim=self.head_dim, text_pooling=self.text_pooling,
        text_positions=self.text_positions,
        dtype=self.dtype, implementation=self.attention_impl, name="conditioning")(
            log_snr, text_emb, text_mask, aug_log_snr)
    text_mask = text_mask.astype(bool)

    res_block = layers.maybe_remat(layers.ResBlock, self.remat, static_argnums=(3,))
    attn_block = layers.maybe_remat(layers.AttentionBlock, self.remat)

    def block(h, features, name, resample="none"):
      return res_block(features, resample=resample, dropout=self.dropout, dtype=self.dtype,
                       conv_impl=self.conv_impl, name=name)(h, emb, train)

    def maybe_attend(h, name, last_of_level):
      if h.shape[1] in self.attn_resolutions:
        mode = "self_and_text"
      elif h.shape[1] in self.cross_attn_resolutions:
        mode = "cross"  # image positions read the text only: cheap at high resolution
      else:
        return h
      if not (self.attn_every_block or last_of_level):
        return h
      return attn_block(num_heads=max(1, h.shape[-1] // self.head_dim), mode=mode,
                        dtype=self.dtype, implementation=self.attention_impl, name=name)(
                            h, text, text_mask)

    height, width = x.shape[1:3]
    if lowres is not None:
      x = jnp.concatenate([x, layers.upsample_lowres(lowres, height, width)], axis=-1)
    if self.coord_channels:
      x = layers.with_coordinates(x.astype(self.dtype))
    h = layers.space_to_depth(x.astype(self.dtype), self.stem_patch)
    h = layers.conv(self.model_dim, self.dtype, impl=self.conv_impl, name="stem")(h)
    skips = [h]
    levels = len(self.channel_mult)
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(h, self.model_dim * mult, f"down{level}_res{i}")
        h = maybe_attend(h, f"down{level}_attn{i}", i == self.num_res_blocks - 1)
        skips.append(h)
      if level < levels - 1:
        h = block(h, self.model_dim * mult, f"down{level}_downsample", resample="down")
        skips.append(h)

    mid = self.model_dim * self.channel_mult[-1]
    h = block(h, mid, "mid_res0")
    h = attn_block(num_heads=mid // self.head_dim, mode="self_and_text", dtype=self.dtype,
                   implementation=self.attention_impl, name="mid_attn")(h, text, text_mask)
    h = block(h, mid, "mid_res1")

    for level in reversed(range(levels)):
      features = self.model_dim * self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(h, features, f"up{level}_res{i}")
        h = maybe_attend(h, f"up{level}_attn{i}", i == self.num_res_blocks)
      if level > 0:
        h = block(h, features, f"up{level}_upsample", resample="up")
    assert not skips, "every encoder activation feeds one decoder block"
    return layers.output_head(h, self.out_channels, self.stem_patch, self.dtype,
                              self.conv_impl)
