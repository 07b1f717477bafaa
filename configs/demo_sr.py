"""The demo's super-resolution stage: text + 32x32 -> 64x64 shapes (an Efficient U-Net).

Trained by `imagen-jax demo` after configs/demo_base.py, on the same shapes data and tiny T5
encoder; by hand:

    imagen-jax train --config=configs/demo_sr.py --workdir=demo_run/sr \
        --config.data.data_dir=demo_run/data
"""

import ml_collections

from imagen_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="full")
  c = common.stage_config()
  c.stage = "sr"
  c.image_size = 64
  c.lowres.size = 32
  # Noise augmentation of the low-res input up to 0.1 (the paper's SR stages train up to 1.0):
  # the less the input is noised in training, the more the stage copies its shapes instead of
  # redrawing unsure ones as its color's training shape, which is what held-out prompts need.
  c.lowres.aug_max = 0.1
  c.model = ml_collections.ConfigDict(dict(
      name="efficient_unet",
      channels=(32, 64, 128),
      num_res_blocks=(1, 1, 2),
      text_attention="self_and_text",
      num_heads=4,
      emb_dim=128,
      pool_width=64,
      text_dim=0,
      text_pooling=True,    # the attention-pooled text vector joins the conditioning
      text_positions=False,   # True: token positions (word order) join the attention's text
      dropout=0.0,
      remat="none",             # per block: "none", "full" or "dots" (models/layers.py)
      stem_patch=2,
      attention_impl="xla",
      conv_impl="auto",         # models/conv.py: matmul weight gradient on x86 w/o AVX-512
  ))
  common.cpu_demo_stage(c, variant, total_steps=2400, checkpoint_every=2400, sample_steps=10,
                        quick_steps=20, quick_sample_steps=4)
  # More steps at half the batch (the base's 32): the SR stage's cleanliness (background, edges)
  # follows its steps, not its batch, and on a CPU throughput is flat in batch size, so a
  # smaller batch buys steps for the same time without costing prompt adherence.
  c.batch_size = 16  # (the quick variant's already)
  # UniPC at log-SNR steps gets closer to the converged SR sample than DDIM does in more
  # steps, with the same judged scores.
  c.sample.sampler = "unipc"
  c.sample.spacing = "logsnr"
  c.sample.guidance = 1.0
  c.sample.aug_level = 0.05  # inside the training range; a little noise hides the base's artifacts
  return common.finetuning(c) if finetune else c
