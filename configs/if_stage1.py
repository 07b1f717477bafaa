"""DeepFloyd IF stage I: text -> 64x64, on IF's own network (diffusers' UNet2DConditionModel as IF
builds it: models/if_unet.py), schedule, text conditioning and sampling.

Variants: `xl` (IF-I-XL, 4.3B parameters, the default), `l` (IF-I-L, 900M), `m` (IF-I-M, 400M)
and `tiny` (CPU-sized, 32x32, the shapes encoder). Each takes `,finetune` (common.finetuning).

`xl` is the network of DeepFloyd/IF-I-XL-v1.0's published unet/config.json (diffusers'
scripts/convert_if.py derives it from IF's config.yml: model_channels 704, channel_mult 1,2,3,4,
num_res_blocks 3, attention at 32,16,8, heads of 64 channels, T5's 4096 projected to 2816).
`l` and `m` are NOT read from their config.json (not found): they keep IF-I-XL's layout with
narrower levels (multiples of 64, whole heads), sized to the parameter counts of their model
cards; `m` projects the text to 1536 (twice its last level) to reach its count. IF-I-M uses SiLU
where L and XL use GELU (deep-floyd/IF issue #117). Weights of the released L and M checkpoints
load with the config.json that ships with them, not with these variants.

`if_settings` holds what every IF stage shares (if_stage2.py applies it too); batch sizes and
step counts are those of IF's model zoo table (deep-floyd/IF README).
"""

import ml_collections

from imagen_jax.configs import common

# diffusers' block names for IF's levels: residual levels resample inside a residual block.
_RES_DOWN, _ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
_RES_UP, _ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"


def diffusers_unet(*, image_size: int, channels: tuple[int, ...], attention: tuple[bool, ...],
                   layers: tuple[int, ...], in_channels: int, text_width: int,
                   cross_attention_dim: int, pool_heads: int, head_dim: int = 64,
                   act: str = "gelu", sr: bool = False) -> dict:
  """diffusers' config.json of an IF U-Net (UNet2DConditionModel's arguments, written as IF's
  published files write them; models/if_unet.py reads it). `attention[i]`: level i (from the
  top) attends to the text and itself; `sr`: IF-II's additions (the augmentation level embedded
  like a timestep, a GELU on the joined embedding, a time embedding as wide as the last level,
  residuals scaled by 1/0.7071: scripts/convert_if.py's settings)."""
  scale = 1 / 0.7071 if sr else 1.0
  return {
      "_class_name": "UNet2DConditionModel",
      "sample_size": image_size,
      "in_channels": in_channels,
      "out_channels": 6,                    # epsilon, then the learned variance's interpolation
      "block_out_channels": list(channels),
      "down_block_types": [_ATTN_DOWN if a else _RES_DOWN for a in attention],
      "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
      "up_block_types": [_ATTN_UP if a else _RES_UP for a in reversed(attention)],
      "layers_per_block": layers[0] if len(set(layers)) == 1 else list(layers),
      "attention_head_dim": head_dim,
      "only_cross_attention": False,
      "mid_block_only_cross_attention": None,
      "cross_attention_dim": cross_attention_dim,
      "cross_attention_norm": "group_norm",
      "encoder_hid_dim": text_width,         # T5's output projected to cross_attention_dim
      "encoder_hid_dim_type": "text_proj",
      "addition_embed_type": "text",         # attention-pooled text joins the time embedding
      "addition_embed_type_num_heads": pool_heads,
      "class_embed_type": "timestep" if sr else None,
      "time_embedding_dim": channels[-1] if sr else None,
      "time_embedding_act_fn": "gelu" if sr else None,
      "act_fn": act,
      "resnet_time_scale_shift": "scale_shift",
      "resnet_skip_time_act": sr,
      "resnet_out_scale_factor": scale,
      "mid_block_scale_factor": scale,
      "norm_num_groups": 32,
      "norm_eps": 1e-5,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "center_input_sample": False,
      "time_embedding_type": "positional",
      "conv_in_kernel": 3,
      "conv_out_kernel": 3,
      "dual_cross_attention": False,
      "upcast_attention": False,
      "use_linear_projection": False,
  }


def if_settings(c: ml_collections.ConfigDict, unet: dict) -> ml_collections.ConfigDict:
  """What IF's stages share: the network, IF's discrete schedule and learned variance, T5-XXL's
  77 tokens with the empty prompt as the unconditional text, and its pipelines' DDPM sampling."""
  c.model = ml_collections.ConfigDict(dict(
      name="if_unet",
      diffusers=unet,            # diffusers' UNet2DConditionModel config.json
      remat="none",              # per residual / attention block: "none", "full" or "dots"
      attention_impl="auto",
      conv_impl="auto",          # models/conv.py: matmul weight gradient on x86 w/o AVX-512
  ))
  c.diffusion.formulation = "vp"
  c.diffusion.timesteps = 1000             # discrete time: diffusers' DDPMScheduler
  c.diffusion.schedule = "cosine"          # with 1000 timesteps: squaredcos_cap_v2
  c.diffusion.parameterization = "eps"
  c.diffusion.variance = "learned_range"
  c.text.encoder = "t5-v1_1-xxl"
  c.text.width = common.T5_WIDTHS["xxl"]
  c.text.max_length = 77
  c.text.output_layer = -1
  c.text.null = "empty_prompt"             # IF's unconditional text: T5's encoding of ""
  c.text.pad_outputs = "keep"              # IF's U-Nets read T5's values at padding positions
  c.optimizer.name = "adam"
  c.sample.sampler = "ddpm"
  c.sample.spacing = "leading"             # DDPMScheduler's timestep_spacing
  c.sample.threshold = "dynamic"
  c.sample.percentile = 95.0               # the schedulers' dynamic_thresholding_ratio 0.95
  return c


# IF-I sizes: (model_channels, num_res_blocks, cross_attention_dim, activation, batch, steps).
_SIZES = {
    "xl": (704, 3, 2816, "gelu", 3072, 2_420_000),   # DeepFloyd/IF-I-XL-v1.0's config.json
    "l": (320, 3, 1280, "gelu", 3200, 3_000_000),    # inferred from the model card's size
    "m": (192, 3, 1536, "silu", 3072, 2_500_000),    # inferred from the model card's size
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="xl")
  c = common.stage_config()
  c.stage = "base"
  c.image_size = 64
  if variant in _SIZES:
    width, blocks, cross, act, batch, steps = _SIZES[variant]
    unet = diffusers_unet(image_size=64, channels=tuple(width * m for m in (1, 2, 3, 4)),
                          attention=(False, True, True, True), layers=(blocks,) * 4,
                          in_channels=3, text_width=common.T5_WIDTHS["xxl"],
                          cross_attention_dim=cross, pool_heads=64, act=act)
    if_settings(c, unet)
    c.batch_size = batch
    c.total_steps = steps
  elif variant == "tiny":
    unet = diffusers_unet(image_size=32, channels=(32, 64), attention=(False, True),
                          layers=(1, 1), in_channels=3, text_width=64, cross_attention_dim=64,
                          pool_heads=4, head_dim=32)
    if_settings(c, unet)
    common.tiny_cpu(c)
    c.image_size = 32
  else:
    raise ValueError(f"unknown if_stage1 variant {variant!r}: use xl, l, m or tiny")
  # IF-I's pipeline: 100 DDPM steps, guidance 7, dynamic thresholding up to 1.5 (its scheduler's
  # sample_max_value).
  c.sample.steps = 100 if variant != "tiny" else 25
  c.sample.guidance = 7.0 if variant != "tiny" else 3.0
  c.sample.threshold_max = 1.5
  return common.finetuning(c) if finetune else c
