"""The demo's base stage: text -> 32x32 shapes, trained on a 2-core CPU in minutes.

`imagen-jax demo` trains this (variant `full`, or `quick` for the tests) and then
configs/demo_sr.py; both are ordinary stage configs, so the same run by hand is

    imagen-jax train --config=configs/demo_base.py --workdir=demo_run/base \
        --config.data.data_dir=demo_run/data

The text encoder is a random tiny T5 v1.1 with a vocabulary of the shapes grammar
("builtin:shapes-tiny"; configs/common.py says why not its text-pretrained copy): enough for a
synthetic grammar, not for real captions (real use loads real T5 weights, see the README).
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
      text_pooling=True,        # the attention-pooled text vector joins the conditioning
      # Token positions (sinusoids, then learned) join the tokens the attention blocks read;
      # the pooled vector stays a bag of words. Two-object prompts' order: a coin flip (101
      # right / 91 swapped) -> 195 / 8; validation 74% -> 83% alone (RESULTS.md, "Word order").
      text_positions=True,
      dropout=0.0,
      remat="none",             # per block: "none", "full" or "dots" (models/layers.py)
      stem_patch=2,             # space-to-depth: the U-Net runs at 16x16, 3-4x faster on a CPU
      attention_impl="xla",
      conv_impl="auto",         # models/conv.py: matmul weight gradient on x86 w/o AVX-512
      coord_channels=True,      # positions ("at the top left corner") need absolute coordinates
  ))
  common.cpu_demo_stage(c, variant, total_steps=2100, checkpoint_every=1050, sample_steps=15,
                        quick_steps=30, quick_sample_steps=5)
  # Muon (orthogonalized momentum on the weight matrices; Adam for the rest) at Adam's learning
  # rate: the loss of Adam's step 2,400 by step 1,000. Base alone on 400 + 400 prompts: Adam at
  # 2,800 steps 85-91% validation / 56-69% held-out over four runs; Muon at 2,800 steps 97.8% /
  # 86.8%, and at 2,100 (what fits Adam's time: its update costs ~0.05 s a step on a core)
  # 94.5% / 78.2%; with the conditioning's matrices left to Adam (half the update's time: the
  # demo), seeds 0 / 1: 92.7 / 90.0% and 73.5 / 66.7%; the README's command 95% / 80%
  # (benchmarks/RESULTS.md, "Muon").
  c.optimizer.name = "muon"
  # UniPC at 15 log-SNR-uniform steps reaches DDIM at 50 (the former default): 42.6 against
  # 39.1 dB PSNR to the converged sample, all-correct within the 100 prompts' noise
  # (benchmarks/RESULTS.md, "Fast samplers").
  c.sample.sampler = "unipc"
  c.sample.spacing = "logsnr"
  c.sample.guidance = 3.0
  c.sample.prompts = ("a red circle at the top left corner", "a blue square above a white triangle",
                      "a yellow triangle at the center", "a purple square to the left of a green circle")
  return common.finetuning(c) if finetune else c
