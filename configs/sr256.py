"""Super-resolution stage 1: text + 64x64 -> 256x256, the paper's Efficient U-Net (F.2).

Variants: `paper` (600M params, the default) and `tiny` (CPU-sized, 16 -> 32).
"""

import ml_collections

from imagen_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="paper")
  c = common.stage_config()
  c.stage = "sr"
  c.image_size = 256
  c.lowres.size = 64
  c.optimizer.name = "adam"
  c.sample.guidance = 8.0
  c.model = ml_collections.ConfigDict(dict(
      name="efficient_unet",
      channels=(128, 256, 512, 1024),
      num_res_blocks=(2, 4, 8, 8),
      text_attention="self_and_text",  # self-attention with text keys/values at the lowest level
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
    c.image_size = 32
    c.lowres.size = 16
    c.model.channels = (16, 32, 64)
    c.model.num_res_blocks = (1, 1, 2)
    c.model.num_heads = 2
    c.model.emb_dim = c.model.pool_width = 64
    c.sample.steps = 32
    c.sample.guidance = 3.0
    c.sample.threshold = "static"
  else:
    raise ValueError(f"unknown sr256 variant {variant!r}: use paper or tiny")
  return common.finetuning(c) if finetune else c
