"""The demo's base stage: text -> 32x32 shapes, trained on a CPU in minutes.

`imagen-jax demo` trains this (variant `full`, or `quick` for the tests) and then
configs/demo_sr.py; both are ordinary stage configs, so the same run by hand is

    imagen-jax train --config=configs/demo_base.py --workdir=demo_run/base \
        --config.data.data_dir=demo_run/data

The text encoder is a tiny T5 v1.1 pretrained on the shapes grammar's text alone
("builtin:shapes-tiny-pretrained", read at its final layer): enough for a synthetic grammar, not
for real captions (real use loads real T5 weights, see the README).
"""

import ml_collections

from imagen_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, finetune = common.parse_variants(arg, default="full")
  c = common.stage_config()
  c.stage = "base"
  c.image_size = 32
  c.model = ml_collections.ConfigDict(dict(
      name="unet",
      model_dim=32,
      channel_mult=(1, 2, 2),
      num_res_blocks=1,
      attn_resolutions=(8, 4),  # feature-map sizes after the 2x2 stem: 16, 8, 4
      cross_attn_resolutions=(),  # text-only attention at these sizes
      head_dim=32,
      emb_dim=256,
      pool_width=128,
      text_dim=0,
      # No pooled text vector: pooled from a contextual encoder it names each object with its
      # color, so the net can draw both objects of a pair right but in either place, and then
      # rarely learns which object of the sentence goes where. Through the attention alone the
      # words reach each place, and the order is learned.
      text_pooling=False,
      # Token positions (sinusoids, then learned) join the tokens the attention blocks read, so
      # a two-object prompt's order decides which object goes where instead of a coin flip.
      text_positions=True,
      dropout=0.0,
      remat="none",             # per block: "none", "full" or "dots" (models/layers.py)
      stem_patch=2,             # space-to-depth: the U-Net runs at 16x16, several times cheaper
      attention_impl="xla",
      conv_impl="auto",         # models/conv.py: matmul weight gradient on x86 w/o AVX-512
      coord_channels=True,      # positions ("at the top left corner") need absolute coordinates
  ))
  common.cpu_demo_stage(c, variant, total_steps=2100, checkpoint_every=1050, sample_steps=15,
                        quick_steps=30, quick_sample_steps=5)
  # Muon (orthogonalized momentum on the weight matrices; Adam for the rest) at Adam's learning
  # rate: it reaches Adam's loss in well under half the steps and gets more prompts right, even
  # with fewer steps to pay for its costlier update and with the conditioning's matrices left to
  # Adam to cut that cost.
  c.optimizer.name = "muon"
  # UniPC at log-SNR-uniform steps gets as close to the converged sample as DDIM does in
  # several times the steps, with the same judged scores.
  c.sample.sampler = "unipc"
  c.sample.spacing = "logsnr"
  c.sample.guidance = 3.0
  c.sample.prompts = ("a red circle at the top left corner", "a blue square above a white triangle",
                      "a yellow triangle at the center", "a purple square to the left of a green circle")
  return common.finetuning(c) if finetune else c
