"""DeepFloyd IF stage II: text + 64x64 -> 256x256, on IF's own network (models/if_unet.py),
schedule, noise augmentation and sampling.

Variants: `l` (IF-II-L, 1.2B parameters, the default), `m` (IF-II-M, 450M) and `tiny` (CPU-sized,
16 -> 32, the shapes encoder). Each takes `,finetune` (common.finetuning).

`l` is the network of DeepFloyd/IF-II-L-v1.0's published unet/config.json (model_channels 160,
channel_mult 1,2,4,6,8, residual blocks 2,2,3,5,5 per level, attention at 32 and 16, T5's 4096
projected to 1280; the augmentation level is embedded like a timestep; diffusers'
scripts/convert_if.py sets the time embedding, activations and residual scales). `m` is NOT read
from its config.json (not found): IF-II-L's layout with narrower levels (96 wide at the top) and
one residual block fewer at 32x32, sized to its model card's count. The released M checkpoint
loads with the config.json that ships with it.

The low-res image is upsampled to 256 and noised there with IF's image_noising_scheduler (cosine,
1000 steps); IF's pipeline samples at noise_level 250, time (250 + 1) / 1000.
"""

import ml_collections

from imagen_jax.configs import common
from imagen_jax.configs import if_stage1

# IF-II sizes: (model_channels, blocks per level, batch, steps).
_SIZES = {
    "l": (160, (2, 2, 3, 5, 5), 1536, 2_500_000),   # DeepFloyd/IF-II-L-v1.0's config.json
    "m": (96, (2, 2, 3, 4, 5), 1536, 2_500_000),    # inferred from the model card's size
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="l")
  c = common.stage_config()
  c.stage = "sr"
  c.image_size = 256
  c.lowres.size = 64
  if variant in _SIZES:
    width, blocks, batch, steps = _SIZES[variant]
    channels = tuple(width * m for m in (1, 2, 4, 6, 8))
    unet = if_stage1.diffusers_unet(
        image_size=256, channels=channels, attention=(False, False, False, True, True),
        layers=blocks, in_channels=6, text_width=common.T5_WIDTHS["xxl"],
        cross_attention_dim=channels[-1], pool_heads=64, sr=True)
    if_stage1.if_settings(c, unet)
    c.batch_size = batch
    c.total_steps = steps
  elif variant == "tiny":
    unet = if_stage1.diffusers_unet(
        image_size=32, channels=(32, 64), attention=(False, True), layers=(1, 1), in_channels=6,
        text_width=64, cross_attention_dim=64, pool_heads=4, head_dim=32, sr=True)
    if_stage1.if_settings(c, unet)
    common.tiny_cpu(c)
    c.image_size = 32
    c.lowres.size = 16
  else:
    raise ValueError(f"unknown if_stage2 variant {variant!r}: use l, m or tiny")
  c.lowres.aug_timesteps = 1000
  c.lowres.aug_schedule = "cosine"
  c.lowres.augment_at = "output"
  # IF-II's pipeline: 50 DDPM steps, guidance 4, noise level 250, dynamic thresholding up to 1.0
  # (its scheduler's sample_max_value).
  c.sample.steps = 50 if variant != "tiny" else 25
  c.sample.guidance = 4.0 if variant != "tiny" else 3.0
  c.sample.aug_level = 0.251
  c.sample.threshold_max = 1.0
  return common.finetuning(c) if finetune else c
