"""The demo's super-resolution stage: text + 32x32 -> 64x64 shapes (an Efficient U-Net).

Trained by `imagen-jax demo` after configs/demo_base.py, on the same shapes data and tiny T5
encoder; by hand:

    imagen-jax train --config=configs/demo_sr.py --workdir=demo_run/sr \
        --config.data.data_dir=demo_run/data
"""

import ml_collections

from imagen_jax.configs import common


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  c = common.stage_config()
  c.stage = "sr"
  c.image_size = 64
  c.lowres.size = 32
  c.lowres.aug_max = 0.3
  c.text.encoder = "builtin:shapes-tiny"
  c.text.width = 64
  c.text.max_length = 16
  c.model = ml_collections.ConfigDict(dict(
      name="efficient_unet",
      channels=(32, 64, 128),
      num_res_blocks=(1, 1, 2),
      text_attention="self_and_text",
      num_heads=4,
      emb_dim=128,
      pool_width=64,
      text_dim=0,
      dropout=0.0,
      remat=False,
      stem_patch=2,
      attention_impl="xla",
  ))
  c.diffusion.parameterization = "v"
  # Plain weighting, as the base stage: min-SNR gives the noisiest steps almost no weight, and
  # those are the steps where the net must read the layout off the low-res image; with it the
  # trained SR net ignored its input (x0 error 0.42 with the true low-res, 0.47 with none).
  c.diffusion.loss_weighting = "plain"
  c.optimizer.name = "adam"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_factor = 0.1
  c.ema.decay = 0.999
  c.batch_size = 32
  c.total_steps = 600
  c.log_every = 100
  c.checkpoint_every = 600
  c.keep_checkpoints = 1
  c.sample_every = 0
  c.sample.sampler = "ddim"
  c.sample.steps = 25
  c.sample.guidance = 1.0
  c.sample.threshold = "static"
  c.sample.aug_level = 0.1
  if variant == "quick":
    c.total_steps = 20
    c.batch_size = 16
    c.optimizer.warmup_steps = 5
    c.log_every = 10
    c.checkpoint_every = 20
    c.sample.steps = 4
  elif variant != "full":
    raise ValueError(f"unknown demo_sr variant {variant!r}: use full or quick")
  return c
