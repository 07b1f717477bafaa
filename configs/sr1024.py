"""Super-resolution stage 2: text + 256x256 -> 1024x1024, the paper's Efficient U-Net (F.3).

Trained on random 256x256 crops of 1024 images with their 64x64 low-res crops (the network is
convolutional apart from text cross-attention, so it samples at 1024 after training on crops).
The noise schedule is the continuous version of linear betas 1e-4..0.02. Variants: `paper`
(400M params, the default) and `tiny` (CPU-sized, 32 -> 64 on 32 crops).
"""

import ml_collections

from imagen_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="paper")
  c = common.stage_config()
  c.stage = "sr"
  c.image_size = 1024
  c.train_crop = 256
  c.lowres.size = 256
  c.diffusion.schedule = "linear"
  c.optimizer.name = "adam"
  c.sample.guidance = 8.0
  c.model = ml_collections.ConfigDict(dict(
      name="efficient_unet",
      channels=(128, 256, 512, 1024),
      # F.3 gives SR 2 400M params; F.2's block counts would make it 0.58B here, so the lowest
      # level has 4 residual blocks per side instead of 8 (models/efficient_unet.py).
      num_res_blocks=(2, 4, 8, 4),
      text_attention="cross",  # text cross-attention at the lowest level, no self-attention
      num_heads=8,
      emb_dim=2048,         # conditioning vector width (noise level + aug level + pooled text)
      pool_width=2048,      # text attention-pooling width
      text_dim=0,           # text projected once to this width for attention keys/values; 0: none
      text_pooling=True,    # the attention-pooled text vector joins the conditioning
      text_positions=False,   # True: token positions (word order) join the attention's text
      dropout=0.0,
      remat="none",             # per block: "none", "full" or "dots" (models/layers.py)
      stem_patch=1,         # >1: space-to-depth stem, the net runs at 1/stem_patch resolution
      attention_impl="auto",  # cuDNN (GPU, bf16) / chunked (CPU) / XLA; or "xla", "cudnn", "chunked"
      conv_impl="auto",       # models/conv.py: matmul weight gradient on x86 w/o AVX-512
  ))
  if variant == "paper":
    pass
  elif variant == "tiny":
    common.tiny_cpu(c)
    c.image_size = 64
    c.train_crop = 32
    c.lowres.size = 16
    c.model.channels = (16, 32, 64)
    c.model.num_res_blocks = (1, 1, 2)
    c.model.num_heads = 2
    c.model.emb_dim = c.model.pool_width = 64
    c.sample.steps = 32
    c.sample.guidance = 3.0
    c.sample.threshold = "static"
  else:
    raise ValueError(f"unknown sr1024 variant {variant!r}: use paper or tiny")
  return common.finetuning(c) if finetune else c
