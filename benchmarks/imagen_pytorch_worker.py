"""The imagen-pytorch side of `benchmarks/vs_imagen_pytorch.py`; runs in the peer's own venv.

    /tmp/venv_imagen_pytorch/bin/python benchmarks/imagen_pytorch_worker.py '{"dim": 64, ...}'

Not part of imagen_jax and never imported by it (it needs torch and imagen-pytorch, not JAX).
Builds imagen-pytorch's `Unet` inside `Imagen` and `ImagenTrainer` (Adam, EMA, gradient clipping:
the path the package's README trains with) from the JSON spec in argv[1], prints one line
`READY {"params": ..., "train_flops_per_step": ..., "sample_flops_per_call": ...}`, then answers commands on stdin, one JSON line each:

    train N     N training steps (trainer(...) + trainer.update()) -> {"seconds": [per step]}
    sample      one guided `Imagen.sample` of the whole batch  -> {"seconds": total}
    quit

Text is given as precomputed embeddings (random, all tokens real), so no T5 is loaded. At import
imagen-pytorch asks the model hub for T5's config (a default argument); the hub is offline here
(HF_HUB_OFFLINE=1), so `T5Config.from_pretrained` is answered locally with T5 v1.1 base's width.
"""

import json
import os
import sys
import time


def _offline_t5_config() -> None:
  """imagen-pytorch's import-time `T5Config.from_pretrained(...)` without the network."""
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.T5Config.from_pretrained = classmethod(
      lambda cls, name, **kwargs: cls(d_model=768))  # t5-v1_1-base; unused: we pass our width


def build(spec: dict):
  """(trainer, imagen, unet parameter count) for the spec."""
  import torch  # pylint: disable=g-import-not-at-top
  _offline_t5_config()
  from imagen_pytorch import Imagen, ImagenTrainer, Unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  unet = Unet(dim=spec["dim"], dim_mults=tuple(spec["dim_mults"]),
              num_resnet_blocks=spec["num_resnet_blocks"],
              layer_attns=tuple(spec["layer_attns"]), layer_cross_attns=tuple(spec["layer_attns"]),
              attn_heads=spec["attn_heads"], attn_dim_head=spec["attn_dim_head"],
              text_embed_dim=spec["text_width"], cond_dim=spec.get("cond_dim"),
              max_text_len=spec["text_length"], memory_efficient=False)
  imagen = Imagen(unets=unet, image_sizes=spec["image_size"], text_embed_dim=spec["text_width"],
                  timesteps=spec["sample_steps"], cond_drop_prob=0.1,
                  dynamic_thresholding=True)
  trainer = ImagenTrainer(imagen, lr=1e-4, max_grad_norm=1.0, use_ema=True, verbose=False)
  params = sum(p.numel() for p in imagen.unets[0].parameters())
  return trainer, imagen, params


def count_flops(trainer, imagen, images, text_embeds, text_masks, spec: dict) -> dict:
  """Matmul and convolution FLOPs (torch's FlopCounterMode: 2 per multiply-add, as ours) of one
  training step (forward and backward) and of one guided denoiser call (both passes)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  b = images.shape[0]
  with flop_counter.FlopCounterMode(display=False) as train_count:
    trainer(images, text_embeds=text_embeds, text_masks=text_masks, unet_number=1,
            max_batch_size=b)
  unet = imagen.unets[0]
  unet.zero_grad(set_to_none=True)  # counting is not a training step
  with flop_counter.FlopCounterMode(display=False) as call_count, torch.no_grad():
    unet.forward_with_cond_scale(torch.randn_like(images), torch.rand(b), text_embeds=text_embeds,
                                 text_mask=text_masks, cond_scale=spec["guidance"])
  return {"train_flops_per_step": train_count.get_total_flops(),
          "sample_flops_per_call": call_count.get_total_flops()}


def main() -> None:
  spec = json.loads(sys.argv[1])
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(int(spec.get("threads") or os.cpu_count()))
  trainer, imagen, params = build(spec)
  b, size = spec["batch_size"], spec["image_size"]
  gen = torch.Generator().manual_seed(0)
  images = torch.rand(b, 3, size, size, generator=gen)
  text_embeds = torch.randn(b, spec["text_length"], spec["text_width"], generator=gen)
  text_masks = torch.ones(b, spec["text_length"], dtype=torch.bool)
  print("READY " + json.dumps({"params": params, "torch": torch.__version__,
                               "threads": torch.get_num_threads(),
                               **count_flops(trainer, imagen, images, text_embeds, text_masks,
                                             spec)}), flush=True)

  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    if command[0] == "train":
      seconds = []
      for _ in range(int(command[1])):
        start = time.perf_counter()
        trainer(images, text_embeds=text_embeds, text_masks=text_masks, unet_number=1,
                max_batch_size=b)
        trainer.update(unet_number=1)
        seconds.append(time.perf_counter() - start)
      reply = {"seconds": seconds}
    elif command[0] == "sample":
      start = time.perf_counter()
      with torch.no_grad():
        out = imagen.sample(text_embeds=text_embeds, text_masks=text_masks, batch_size=b,
                            cond_scale=spec["guidance"], use_tqdm=False)
      reply = {"seconds": time.perf_counter() - start, "shape": list(out.shape)}
    else:
      reply = {"error": f"unknown command {line.strip()!r}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
