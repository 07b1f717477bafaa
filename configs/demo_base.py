"""The demo's base stage: text -> 32x32 shapes, trained on a 2-core CPU in minutes.

`imagen-jax demo` trains this (variant `full`, or `quick` for the tests) and then
configs/demo_sr.py; both are ordinary stage configs, so the same run by hand is

    imagen-jax train --config=configs/demo_base.py --workdir=demo_run/base \
        --config.data.data_dir=demo_run/data

The text encoder is a tiny random T5 v1.1 with a vocabulary of the shapes grammar
("builtin:shapes-tiny"): enough for a synthetic grammar, not for real captions (real use loads
real T5 weights, see the README).
"""

import ml_collections

from imagen_jax.configs import common


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  c = common.stage_config()
  c.stage = "base"
  c.image_size = 32
  c.text.encoder = "builtin:shapes-tiny"
  c.text.width = 64
  c.text.max_length = 16
  c.model = ml_collections.ConfigDict(dict(
      name="unet",
      model_dim=32,
      channel_mult=(1, 2, 2),
      num_res_blocks=1,
      attn_resolutions=(8, 4),  # feature-map sizes after the 2x2 stem: 16, 8, 4
      head_dim=32,
      emb_dim=256,
      pool_width=128,
      text_dim=0,
      dropout=0.0,
      remat=False,
      stem_patch=2,             # space-to-depth: the U-Net runs at 16x16 (FINDINGS: 3-4x faster)
      attention_impl="xla",
      coord_channels=True,      # positions ("at the top left corner") need absolute coordinates
  ))
  c.diffusion.parameterization = "v"
  # Plain (eps-MSE-equivalent) weighting of the v loss: min-SNR down-weights the noisy steps
  # where the layout (position, shape) is decided; with it 7% of validation prompts came out
  # right, with plain weighting 59% (1200 steps, benchmarks/RESULTS.md).
  c.diffusion.loss_weighting = "plain"
  c.optimizer.name = "adam"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_factor = 0.1
  c.ema.decay = 0.999
  c.batch_size = 32
  c.total_steps = 1400
  c.log_every = 100
  c.checkpoint_every = 700
  c.keep_checkpoints = 1
  c.sample_every = 0
  c.sample.sampler = "ddim"
  c.sample.steps = 50
  c.sample.guidance = 3.0
  c.sample.threshold = "static"
  c.sample.prompts = ("a red circle at the top left corner", "a blue square above a white triangle",
                      "a yellow triangle at the center", "a purple square to the left of a green circle")
  if variant == "quick":  # for the tests: the whole demo in under 2 minutes, scores mean little
    c.total_steps = 30
    c.batch_size = 16
    c.optimizer.warmup_steps = 5
    c.log_every = 10
    c.checkpoint_every = 30
    c.sample.steps = 5
  elif variant != "full":
    raise ValueError(f"unknown demo_base variant {variant!r}: use full or quick")
  return c
