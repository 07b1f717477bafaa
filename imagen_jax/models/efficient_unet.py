"""The super-resolution stages' Efficient U-Net (paper appendix F.2 for SR 1, F.3 for SR 2).

Layout (paper figures A.27-A.30):
- input: the noisy image z_t concatenated on channels with the low-res conditioning image,
  up-sampled (bicubic) to z_t's size; a 3x3 stem conv to `channels[0]`;
- DBlock per level i: a stride-2 3x3 conv to `channels[i]` first (down-sampling *before* the
  convolutions, so they run at the lower resolution), then `num_res_blocks[i]` residual blocks;
  the lowest level ends with an attention block;
- UBlock per level, lowest first: the DBlock's output (scaled by 1/sqrt(2)) concatenated on
  channels, `num_res_blocks[i]` residual blocks, attention at the lowest level, then a 3x3 conv
  to the next level's width followed by 2x nearest up-sampling (up-sampling *after* the
  convolution);
- at full resolution the stem's output (scaled by 1/sqrt(2)) joins one last residual block, then
  GroupNorm, SiLU and a zero-initialized 3x3 conv to 3 channels.
Parameters sit at the low resolutions (channels 128 -> 1024 with 2, 4, 8, 8 blocks); the full
resolution sees only the stem, one residual block and the head.

Text: `text_attention` "self_and_text" (SR 1) puts self-attention with the LayerNorm'd text
tokens in its keys/values in the lowest block; "cross" (SR 2) has text cross-attention there and no
self-attention. The attention-pooled text vector and the noise-augmentation level's embedding
are added to the noise-level embedding, which every residual block reads through scale-shift norm.

Choices where the paper is silent (stated so they can be checked):
- "skip connections scaled by 1/sqrt(2)": applied to the U-Net skips (before concatenation) and
  to the residual sum inside every residual block, which keeps the activation scale steady through
  the 8-block stacks;
- every level down-samples, so the first DBlock already runs at half resolution; the full-
  resolution residual block fed by the stem (as imagen-pytorch's `final_resnet_block` and
  `init_conv_to_final_conv_residual`) keeps a pixel-level path to the output: without it a tiny
  net cannot fit eps-prediction at low noise, not even on a handful of images;
- conditioning enters every residual block (scale-shift norm, as in the base U-Net) rather than
  once per DBlock/UBlock; conditioning and text-pooling widths (`emb_dim`, `pool_width`) 2048;
- attention heads: `num_heads` (8) over the level's width.
With T5-XXL text, SR 1 (F.2's widths and blocks) has 0.59B parameters (paper: 600M). F.3 gives
SR 2 400M; with F.2's blocks and cross-attention only it would have 0.58B, so configs/sr1024.py
uses 4 residual blocks per side at the lowest level (0.40B).
The network is fully convolutional apart from attention, so SR 2 trains on 256 crops and samples
at 1024.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models import layers


class EfficientUNet(nn.Module):
  """Text- and low-res-conditioned Efficient U-Net; see the module docstring."""
  channels: Sequence[int]
  num_res_blocks: Sequence[int]
  text_attention: str = "self_and_text"   # or "cross"
  num_heads: int = 8
  emb_dim: int = 2048
  pool_width: int = 2048
  text_dim: int = 0            # 0: text keys/values projected from the encoder's width
  text_pooling: bool = True    # False: no pooled text vector in the conditioning embedding
  text_positions: bool = False  # True: token positions join the attention's text (layers.py)
  dropout: float = 0.0
  remat: bool | str = "none"   # per block: "none", "full" or "dots" (layers.maybe_remat)
  stem_patch: int = 1
  out_channels: int = 3
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = "auto"
  conv_impl: str = "auto"        # models/conv.py: "auto", "xla" or "matmul_grad"

  @nn.compact
  def __call__(self, x: jax.Array, log_snr: jax.Array, text_emb: jax.Array,
               text_mask: jax.Array, lowres: jax.Array | None = None,
               aug_log_snr: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B, H, W, 3] (z_t), log_snr [B], text_emb [B, L, D], text_mask [B, L],
    lowres [B, h, w, 3] (noise-augmented low-res image), aug_log_snr [B] -> [B, H, W, 3].

    H and W may differ from the training size (any multiple of 2^levels * stem_patch).
    `train` enables dropout (needs a "dropout" rng when `dropout` > 0).
    """
    if len(self.channels) != len(self.num_res_blocks):
      raise ValueError(f"channels {self.channels} and num_res_blocks {self.num_res_blocks} "
                       "must have one entry per level")
    if lowres is None:
      raise ValueError("the Efficient U-Net is a super-resolution net: pass `lowres`")
    emb, text = layers.Conditioning(
        emb_dim=self.emb_dim, feature_dim=self.channels[0], pool_width=self.pool_width,
        text_dim=self.text_dim, text_pooling=self.text_pooling,
        text_positions=self.text_positions, dtype=self.dtype,
        implementation=self.attention_impl, name="conditioning")(
            log_snr, text_emb, text_mask, aug_log_snr)
    text_mask = text_mask.astype(bool)

    res_block = layers.maybe_remat(layers.ResBlock, self.remat, static_argnums=(3,))
    attn_block = layers.maybe_remat(layers.AttentionBlock, self.remat)
    skip_scale = 1.0 / math.sqrt(2.0)
    lowest = len(self.channels) - 1

    def res_blocks(h, level, prefix):
      for i in range(self.num_res_blocks[level]):
        h = res_block(self.channels[level], skip_scale=skip_scale, dropout=self.dropout,
                      dtype=self.dtype, conv_impl=self.conv_impl,
                      name=f"{prefix}{level}_res{i}")(h, emb, train)
      if level == lowest:
        h = attn_block(num_heads=self.num_heads, mode=self.text_attention, dtype=self.dtype,
                       implementation=self.attention_impl, name=f"{prefix}{level}_attn")(
                           h, text, text_mask)
      return h

    height, width = x.shape[1:3]
    h = jnp.concatenate([x, layers.upsample_lowres(lowres, height, width)], axis=-1)
    h = layers.space_to_depth(h.astype(self.dtype), self.stem_patch)
    stem = h = layers.conv(self.channels[0], self.dtype, impl=self.conv_impl, name="stem")(h)

    skips = []
    for level, features in enumerate(self.channels):
      h = layers.conv(features, self.dtype, strides=2, impl=self.conv_impl,
                      name=f"down{level}_conv")(h)
      h = res_blocks(h, level, "down")
      skips.append(h)

    for level in reversed(range(len(self.channels))):
      h = jnp.concatenate([h, skips.pop() * skip_scale], axis=-1)
      h = res_blocks(h, level, "up")
      h = layers.conv(self.channels[max(level - 1, 0)], self.dtype, impl=self.conv_impl,
                      name=f"up{level}_conv")(h)
      h = layers.constrain(layers.upsample(h), layers.IMAGE_AXES)
    # Full resolution: the stem's features join a last residual block, a path at full resolution
    # that lets the output follow z_t pixel by pixel (eps- and x0-prediction at low noise need it).
    h = jnp.concatenate([h, stem * skip_scale], axis=-1)
    h = res_block(self.channels[0], skip_scale=skip_scale, dropout=self.dropout, dtype=self.dtype,
                  conv_impl=self.conv_impl, name="final_res")(h, emb, train)
    return layers.output_head(h, self.out_channels, self.stem_patch, self.dtype,
                              self.conv_impl)
