"""Base stage: text -> 64x64, the paper's U-Net (appendix F.1).

Variants: `paper` (2B params, the default), `500m` (JAX-Toolbox's Imagen-base-500M), `tiny`
(runs on a laptop CPU; random T5 with the shapes vocabulary); each with `,finetune` for
`imagen-jax finetune` (e.g. `configs/base64.py:500m,finetune`).

    imagen-jax train --config=configs/base64.py:500m --workdir=gs://bucket/base64
"""

import ml_collections

from imagen_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="paper")
  c = common.stage_config()
  c.stage = "base"
  c.image_size = 64
  c.optimizer.name = "adafactor"
  c.model = ml_collections.ConfigDict(dict(
      name="unet",
      model_dim=512,
      channel_mult=(1, 2, 3, 4),
      num_res_blocks=3,
      attn_resolutions=(32, 16, 8),
      cross_attn_resolutions=(),  # text-only attention (imagen-pytorch's layer_cross_attns)
      attn_every_block=True,  # F.1/ADM; False: one attention block per level and path, after
                              # its last residual block (imagen-pytorch's and IF's placement)
      head_dim=64,
      emb_dim=1024,         # conditioning width (noise level + pooled text); 0: 4 * model_dim
      pool_width=1024,      # text attention-pooling width; 0: emb_dim
      text_dim=1024,        # text projected once to this width for attention keys/values; 0: none
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
  elif variant == "500m":
    c.model.model_dim = 256
    c.model.emb_dim = c.model.pool_width = c.model.text_dim = 512
  elif variant == "tiny":
    common.tiny_cpu(c)
    c.image_size = 32
    c.model.model_dim = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.head_dim = 16
    c.model.emb_dim = c.model.pool_width = 128
    c.model.text_dim = 0
    c.optimizer.name = "adam"
    c.sample.steps = 32
    c.sample.guidance = 3.0
    c.sample.threshold = "static"
  else:
    raise ValueError(f"unknown base64 variant {variant!r}: use paper, 500m or tiny")
  return common.finetuning(c) if finetune else c
