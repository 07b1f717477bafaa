"""Side by side with imagen-pytorch: the same 64x64 U-Net shape, training and guided sampling.

    python -m benchmarks.vs_imagen_pytorch                       # both, on this machine's CPU
    python -m benchmarks.vs_imagen_pytorch --what=train --rounds=3 --train_steps=3
    python -m benchmarks.vs_imagen_pytorch --what=sample --rounds=2
    python -m benchmarks.vs_imagen_pytorch --noattn_every_block --dtype=bfloat16
    python -m benchmarks.vs_imagen_pytorch --what=sample --our_sampler=unipc --our_spacing=logsnr \
        --our_sample_steps=15 --sample_steps=15   # images/s at equal quality (issue 18)

The peer runs in its own virtual environment (never in ours; it needs torch), set up once:

    python3 -m venv /tmp/venv_imagen_pytorch
    /tmp/venv_imagen_pytorch/bin/pip install torch==2.14.1 torchvision==0.29.1 imagen-pytorch

(torch 2.13.0 with the registry's torchvision fails to import: 'operator torchvision::nms does not
exist'.) Point `--peer_python` (or IMAGEN_PYTORCH_PYTHON) at another venv's python if needed.
This script starts `benchmarks/imagen_pytorch_worker.py` in that venv with HF_HUB_OFFLINE=1 and
talks to it over a pipe, so both frameworks run in one invocation with their models built once,
and the timed rounds alternate (ours, theirs, ours, ...) on otherwise idle cores.

The shape (a mid-size base U-Net that both frameworks build the same way): 64x64 images, base
width 64, channel multipliers (1, 2, 4), 2 residual blocks per level, attention with text at the
two lower resolutions (32 and 16) and in the middle, 4 heads of 64 channels (at the 256-wide
levels; ours has 2 heads at the 128-wide level because it fixes the head width), text 256 wide x
32 tokens given as precomputed embeddings, batch 16.
Conditioning width 256 on both sides (theirs: time_cond_dim = 4 * dim and cond_dim = 256; ours:
emb_dim = pool_width = text_dim = 256). Both train with Adam, EMA and gradient clipping at 1.0;
both sample 50 ancestral (DDPM) steps with classifier-free guidance 3 and dynamic thresholding.

The nets are not identical, and the parameter counts show it (they must agree within 15% for the
ratios to count):
- imagen-pytorch runs its down-path blocks at the level's input width (64, 64, 128 channels; the
  256-wide middle only after the last level), ours at the level's width (64, 128, 256), as ADM;
- it down-samples by a space-to-depth + 1x1 conv and up-samples by a 1x1 conv + pixel shuffle,
  ours by residual blocks that resample (BigGAN-style, as the paper's F.1 does);
- its attention is a transformer block (multi-query attention with cosine-similarity logits, then
  a feed-forward) once per level, plus cross-attention inside the first residual block of a
  level and a global-context gate in every residual block; ours puts self-attention with the
  text tokens in the keys/values after every residual block at those resolutions (F.1), or,
  with --noattn_every_block, once per level and path, where theirs sits;
- it pools the text with a 2-layer Perceiver resampler, ours with one attention-pooling layer;
- its guided sampler runs the conditional and the unconditional pass one after the other, ours
  runs them as one batch of 2B.
The table therefore also gives each side's FLOPs per image (matmuls and convolutions, 2 per
multiply-add: ours from the traced step, theirs from torch's FlopCounterMode) and the GFLOP/s each
reached, which separates the work the networks ask for from the speed the frameworks run it at.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", os.environ.get("IMAGEN_PYTORCH_PYTHON", "/tmp/venv_imagen_pytorch/bin/python"),
    "The python of the venv that holds torch and imagen-pytorch.")
_WHAT = flags.DEFINE_list("what", ["train", "sample"], "train and/or sample.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per framework (alternating).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3, "Training steps per round.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch for training and sampling.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "Sampler steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance weight.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Our compute dtype (parameters stay float32); the peer runs float32.")
_ATTN_EVERY_BLOCK = flags.DEFINE_bool(
    "attn_every_block", True,
    "Ours: attention after every residual block at 32 and 16 (the paper's F.1), or, with "
    "--noattn_every_block, once per level and path, where imagen-pytorch puts its transformer.")
_CONV_IMPL = flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "matmul_grad"],
                               "Our convolutions (models/conv.py; auto: matmul_grad on x86 "
                               "CPUs without AVX-512).")
_OUR_SAMPLER = flags.DEFINE_string(
    "our_sampler", "ddpm", "Our sampler (ddpm at --sample_steps matches the peer's; a fast one, "
    "e.g. dpmpp_2m with --our_sample_steps, gives the equal-quality comparison).")
_OUR_SAMPLE_STEPS = flags.DEFINE_integer("our_sample_steps", 0,
                                         "Our sampler's steps (0: --sample_steps).")
_OUR_SPACING = flags.DEFINE_enum("our_spacing", "time", ["time", "logsnr"],
                                 "Our sampler's step spacing (the peer's DDPM: time).")
_PEER_REFERENCE_STEPS = flags.DEFINE_integer(
    "peer_reference_steps", 1000, "The step count of imagen-pytorch's README (timesteps=1000): "
    "its images/s there are its measured per-step rate at --sample_steps over this many steps.")

# The shape both frameworks build (imagen-pytorch's names where they differ from ours).
SHAPE = dict(image_size=64, dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
             layer_attns=(False, True, True), attn_heads=4, attn_dim_head=64, cond_dim=256,
             text_width=256, text_length=32)
MAX_PARAM_MISMATCH = 0.15


def our_config(batch_size: int, sample_steps: int, guidance: float, dtype: str = "float32",
               attn_every_block: bool = True, conv_impl: str = "auto") -> Any:
  """configs/base64.py with the matched shape's overrides."""
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  size = SHAPE["image_size"]
  attn = tuple(size // 2**i for i, on in enumerate(SHAPE["layer_attns"]) if on)
  return config_lib.load_config("configs/base64.py", {
      "image_size": size, "batch_size": batch_size,
      "text.encoder": "none (precomputed embeddings)", "text.width": SHAPE["text_width"],
      "text.max_length": SHAPE["text_length"],
      "model.model_dim": SHAPE["dim"], "model.channel_mult": SHAPE["dim_mults"],
      "dtype": dtype, "model.attn_every_block": attn_every_block, "model.conv_impl": conv_impl,
      "model.num_res_blocks": SHAPE["num_resnet_blocks"], "model.attn_resolutions": attn,
      "model.head_dim": SHAPE["attn_dim_head"], "model.emb_dim": 4 * SHAPE["dim"],
      "model.pool_width": SHAPE["cond_dim"], "model.text_dim": SHAPE["cond_dim"],
      "optimizer.name": "adam", "optimizer.lr": 1e-4, "optimizer.clip_norm": 1.0,
      "sample.sampler": "ddpm", "sample.steps": sample_steps, "sample.guidance": guidance,
      "sample.spacing": "time",
      "sample.threshold": "dynamic"})


def peer_worker(python: str, spec: dict[str, Any]) -> Any:
  """imagen-pytorch in its own venv, driven over a pipe (see imagen_pytorch_worker.py)."""
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  if not os.path.exists(python):
    raise FileNotFoundError(
        f"no python at {python!r}: set up the imagen-pytorch venv (see this file's docstring) "
        "or pass --peer_python")
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagen_pytorch_worker.py")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "PYTHONWARNINGS": "ignore"}
  return harness.PeerWorker([python, worker, json.dumps(spec)], env, "imagen-pytorch",
                            ready_prefix="READY ", close_timeout=60)


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from benchmarks import sample as sample_bench  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top

  batch, rounds, k = _BATCH.value, _ROUNDS.value, _TRAIN_STEPS.value
  our_steps = _OUR_SAMPLE_STEPS.value or _SAMPLE_STEPS.value
  config = our_config(batch, our_steps, _GUIDANCE.value, _DTYPE.value,
                      _ATTN_EVERY_BLOCK.value, _CONV_IMPL.value)
  config.sample.sampler, config.sample.spacing = _OUR_SAMPLER.value, _OUR_SPACING.value
  spec = {**SHAPE, "batch_size": batch, "sample_steps": _SAMPLE_STEPS.value,
          "guidance": _GUIDANCE.value}
  peer = peer_worker(_PEER_PYTHON.value, spec)
  rows, extra = [], {"shape": SHAPE, "batch_size": batch, "rounds": rounds,
                     "ours": {"dtype": _DTYPE.value, "attn_every_block": _ATTN_EVERY_BLOCK.value,
                              "conv_impl": _CONV_IMPL.value, "sampler": _OUR_SAMPLER.value,
                              "sample_steps": our_steps, "spacing": _OUR_SPACING.value},
                     "peer": {"torch": peer.info["torch"], "threads": peer.info["threads"]},
                     "jax_devices": jax.device_count()}
  try:
    ours_train = ours_sample = theirs_train = theirs_sample = None
    compile_s, our_flops = {}, {}
    if "train" in _WHAT.value:
      step = train_step.CompiledStep(config)
      compile_s["train"] = step.compile_s
      peer.ask("train 1")  # warm-up (first-call allocations)
      ours, theirs = [], []
      for _ in range(rounds):
        ours.append(step.run(k))
        theirs.append(statistics.median(peer.ask(f"train {k}")["seconds"]))
      ours_train, theirs_train = batch / statistics.median(ours), batch / statistics.median(theirs)
      extra["train_s_per_step"] = {"ours": ours, "imagen_pytorch": theirs}
      params, our_flops["train"] = step.params, step.flops * jax.device_count()
      del step
    else:
      from imagen_jax import models  # pylint: disable=g-import-not-at-top
      params = models.parameter_table(config)[1]
    if "sample" in _WHAT.value:
      settings = stage_sampler.StageSettings.from_config(config.sample)
      sampler = sample_bench.CompiledSampler(config, batch, settings)
      compile_s["sample"], our_flops["sample"] = sampler.compile_s, sampler.flops
      ours, theirs = [], []
      for _ in range(rounds):
        ours.append(sampler.run())
        theirs.append(peer.ask("sample")["seconds"])
      ours_sample, theirs_sample = (batch / statistics.median(ours),
                                    batch / statistics.median(theirs))
      extra["sample_s_per_batch"] = {"ours": ours, "imagen_pytorch": theirs}
  finally:
    peer.close()

  their_params = peer.info["params"]
  their_flops = {"train": peer.info["train_flops_per_step"],
                 "sample": peer.info["sample_flops_per_call"] * _SAMPLE_STEPS.value}
  mismatch = params / their_params - 1.0
  fmt = lambda x: round(x, 3) if x is not None else None
  ratio = lambda a, b: round(a / b, 2) if a and b else None

  def work(flops: dict[str, float], train_rate, sample_rate) -> dict[str, Any]:
    """GFLOP per image (matmuls and convolutions, counted the same way on both sides: 2 per
    multiply-add) and the GFLOP/s achieved, per measured job."""
    out = {}
    for job, rate in (("train", train_rate), ("sample", sample_rate)):
      per_image = flops.get(job) / batch if flops.get(job) and rate else None
      out[f"{job}_gflop_per_image"] = fmt(per_image / 1e9) if per_image else None
      out[f"{job}_gflop_per_s"] = round(per_image * rate / 1e9, 1) if per_image else None
    return out

  ours = {"train_images_per_s": fmt(ours_train), "sample_images_per_s": fmt(ours_sample),
          **work(our_flops, ours_train, ours_sample)}
  theirs = {"train_images_per_s": fmt(theirs_train), "sample_images_per_s": fmt(theirs_sample),
            **work(their_flops, theirs_train, theirs_sample)}
  rows.append({"framework": f"imagen-jax (JAX {jax.__version__})", "params": params, **ours,
               "compile_s": {k_: round(v, 1) for k_, v in compile_s.items()}})
  rows.append({"framework": f"imagen-pytorch (torch {peer.info['torch']})",
               "params": their_params, **theirs, "compile_s": "-"})
  rows.append({"framework": "ratio (ours / theirs)", "params": round(params / their_params, 3),
               **{k_: ratio(v, theirs[k_]) for k_, v in ours.items()}, "compile_s": "-"})
  if ours_sample and theirs_sample:
    # The peer's cost per step is constant (every step is the same guided forward pass), so its
    # rate at the README's step count is its measured per-step rate over that many steps.
    theirs_reference = theirs_sample * _SAMPLE_STEPS.value / _PEER_REFERENCE_STEPS.value
    extra["equal_quality"] = {
        "ours": f"{_OUR_SAMPLER.value}, {our_steps} {_OUR_SPACING.value} steps",
        "ours_images_per_s": fmt(ours_sample),
        "theirs": f"DDPM, {_PEER_REFERENCE_STEPS.value} steps (measured at {_SAMPLE_STEPS.value})",
        "theirs_images_per_s": round(theirs_reference, 5),
        "ratio": round(ours_sample / theirs_reference, 1)}
    print("equal quality: " + json.dumps(extra["equal_quality"]))
  extra["params_within_15_percent"] = abs(mismatch) <= MAX_PARAM_MISMATCH
  harness.report("vs_imagen_pytorch", rows, extra=extra)
  if abs(mismatch) > MAX_PARAM_MISMATCH:
    print(f"WARNING: parameter counts differ by {mismatch:+.1%}: the ratios do not count",
          file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
