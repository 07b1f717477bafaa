"""Side by side with diffusers: DeepFloyd IF's U-Net in imagen-jax and in diffusers, on a CPU.

    python -m benchmarks.if_vs_diffusers                           # the 195M 64x64 stage
    python -m benchmarks.if_vs_diffusers --size=tiny --rounds=1    # seconds (the test's run)
    python -m benchmarks.if_vs_diffusers --what=sample --dtypes=float32 --rounds=5
    python -m benchmarks.if_vs_diffusers --torch_python=/tmp/venv_torch/bin/python

The same network on both sides: an IF-I-style 64x64 base stage (3 channels in, 6 out: epsilon
and the variance interpolation) as diffusers' `UNet2DConditionModel` builds it from the config
below, and as `imagen_jax/models/if_unet.py` builds it from the same config. IF-I's layout
(IF-I-XL's config.json at about 1/5.5 of its width): a residual level at 64x64, then three levels
of residual blocks with simple cross-attention (keys and values: the projected T5 text, then the
image positions) at 32, 16 and 8, the same in the middle; block_out_channels (128, 256, 384,
512), 3 residual blocks per level, heads of 64 channels, T5-XXL-wide text (4096) x 77 tokens
projected to 512 (encoder_hid_proj) and attention-pooled into the time embedding. 195M
parameters (printed; about 64M of them the 4096-wide pooling and text projection).

Same weights: random float32 parameters made here (every tensor perturbed, norms included) are
written with `interop/diffusers_format.write_unet` and loaded by diffusers' `from_pretrained`.
Same inputs: random NHWC arrays made here, handed to torch as NCHW. Before anything is timed the
two guided outputs are compared (max abs diff, printed), and so are the training losses of the
warm-up steps (both sides start from the same weights and take the same Adam steps), so the
timings compare the same network doing the same work.

What is timed, per image (a row each):
- sample: one guided network evaluation as IF's pipeline makes it: the U-Net on 2B images
  (the unconditional and the conditional half, one batch) at one timestep, then
  eps = uncond + w * (cond - uncond) on the first 3 channels, the conditional variance channels
  kept. JAX: one jitted function, float32, and with --dtypes bfloat16 compute (float32 params
  and norms: `IFUNet(dtype=bfloat16)`). torch: `torch.inference_mode()`, float32, and bfloat16
  under `torch.autocast("cpu")`. images/s = B / seconds per evaluation (a sampler's step costs
  one such evaluation, so the sampling rate at S steps is this / S).
- train: forward, epsilon MSE on the first 3 output channels, backward, Adam (lr 1e-4, the same
  betas and eps) at batch --train_batch_size. JAX: `jax.jit` of the whole step with
  `optax.adam`, params and optimizer state donated. torch: `loss.backward()` and
  `torch.optim.Adam.step()` (its default implementation on a CPU).

torch runs in its own process: `--torch_python` (default: this python) runs this file as a
worker (`--worker`, which imports only numpy, torch and diffusers, so another venv works), and
this process drives it over a pipe: both models are built once, a warm-up call each, then
--rounds rounds alternate (JAX, torch, JAX, ...) per row; each side's median round counts.
torch uses --threads threads (default: every CPU); XLA:CPU uses every core too. The table gives
images/s and calls/s (guided evaluations or training steps) per side and the ratio JAX/torch.

Run it on otherwise idle CPUs: where other processes hold cores, torch's OpenMP threads lose far
more than XLA's thread pool (a descheduled thread stalls each of torch's parallel regions), and
the ratio flatters JAX. RESULT_JSON records the load average before and after and `contended`
(load above half the CPUs: a warning is printed); `--threads=1` is the control there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

# IF-I's settings (DeepFloyd/IF-I-XL-v1.0's unet/config.json), the widths per --size.
IF_I = dict(
    _class_name="UNet2DConditionModel", sample_size=64, in_channels=3, out_channels=6,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim_type="text_proj",
    addition_embed_type="text", cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", only_cross_attention=False,
    mid_block_scale_factor=1, upcast_attention=False, use_linear_projection=False)
SIZES = {
    # 195M parameters; 64x64 images, T5-XXL's width and IF's 77 tokens.
    "base": dict(block_out_channels=[128, 256, 384, 512], layers_per_block=3,
                 attention_head_dim=64, cross_attention_dim=512, encoder_hid_dim=4096,
                 addition_embed_type_num_heads=64, image_size=64, text_length=77,
                 batch_size=2, train_batch_size=4),
    # Seconds on 2 cores: what the test runs.
    "tiny": dict(block_out_channels=[32, 64, 96], layers_per_block=1, attention_head_dim=16,
                 cross_attention_dim=64, encoder_hid_dim=48, addition_embed_type_num_heads=4,
                 image_size=16, text_length=7, batch_size=1, train_batch_size=2),
}
REPLY = "REPLY "


def unet_config(size: str) -> dict:
  """diffusers' config.json dict of the --size U-Net."""
  s = SIZES[size]
  levels = len(s["block_out_channels"])
  return dict(
      IF_I, block_out_channels=s["block_out_channels"], layers_per_block=s["layers_per_block"],
      attention_head_dim=s["attention_head_dim"], cross_attention_dim=s["cross_attention_dim"],
      encoder_hid_dim=s["encoder_hid_dim"],
      addition_embed_type_num_heads=s["addition_embed_type_num_heads"],
      down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1),
      up_block_types=["SimpleCrossAttnUpBlock2D"] * (levels - 1) + ["ResnetUpsampleBlock2D"])


# --- The torch side (`--worker`): numpy, torch and diffusers only -------------------------------

def worker(spec: dict) -> None:
  """diffusers' U-Net from spec["model_dir"] on spec["inputs"]; answers one command a line:

      check DTYPE...   the guided outputs at each dtype -> saved to spec["outputs"] (npz)
      sample DTYPE N   N guided evaluations              -> {"seconds": [per call]}
      train DTYPE N    N training steps                  -> {"seconds": [...], "losses": [...]}
      quit
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  start = time.perf_counter()
  device = spec.get("device", "cpu")
  model = diffusers.UNet2DConditionModel.from_pretrained(spec["model_dir"]).float().eval()
  model = model.to(device)
  load_s = time.perf_counter() - start
  data = np.load(spec["inputs"])
  tensor = lambda k: torch.from_numpy(np.ascontiguousarray(data[k])).to(device)
  nchw = lambda k: torch.from_numpy(np.ascontiguousarray(data[k].transpose(0, 3, 1, 2))).to(device)
  sample, timestep, text = nchw("sample"), tensor("timestep"), tensor("text")
  train_x, train_noise = nchw("train_x"), nchw("train_noise")
  train_t, train_text = tensor("train_t"), tensor("train_text")
  guidance = spec["guidance"]
  optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])

  def autocast(dtype: str):
    if dtype == "float32":
      return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, dtype))

  def guided(dtype: str):
    with torch.inference_mode(), autocast(dtype):
      out = model(torch.cat([sample, sample]), timestep, text).sample.float()
      uncond, cond = out.chunk(2)
      eps = uncond[:, :3] + guidance * (cond[:, :3] - uncond[:, :3])
      return torch.cat([eps, cond[:, 3:]], dim=1)

  def train_step(dtype: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast(dtype):
      out = model(train_x, train_t, train_text).sample
    loss = torch.nn.functional.mse_loss(out[:, :3].float(), train_noise)
    loss.backward()
    optimizer.step()
    return loss.item()

  def answer(reply: dict) -> None:
    print(REPLY + json.dumps(reply), flush=True)

  answer({"torch": torch.__version__, "diffusers": diffusers.__version__,
          "threads": torch.get_num_threads(), "load_s": load_s,
          "params": sum(p.numel() for p in model.parameters())})
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    try:
      if command[0] == "check":
        outputs, errors = {}, {}
        for dtype in command[1:]:
          try:
            outputs[dtype] = guided(dtype).cpu().numpy().transpose(0, 2, 3, 1)
          except Exception as e:  # pylint: disable=broad-except  (e.g. no bf16 kernel)
            errors[dtype] = f"{type(e).__name__}: {e}"
        np.savez(spec["outputs"], **outputs)
        answer({"errors": errors})
      elif command[0] in ("sample", "train"):
        seconds, losses = [], []
        for _ in range(int(command[2])):
          start = time.perf_counter()
          if command[0] == "sample":
            guided(command[1])
          else:
            losses.append(train_step(command[1]))
          if device == "cuda":
            torch.cuda.synchronize()
          seconds.append(time.perf_counter() - start)
        answer({"seconds": seconds, "losses": losses})
      else:
        answer({"error": f"unknown command {line.strip()!r}"})
    except Exception as e:  # pylint: disable=broad-except
      answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  worker(json.loads(sys.argv[2]))
  sys.exit(0)

# --- The JAX side and the driver ----------------------------------------------------------------

import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Sequence  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_enum("size", "base", sorted(SIZES), "base: the 195M 64x64 stage; tiny: a "
                          "16x16 toy that runs in seconds.")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", sys.executable, "The python that runs the torch side (in its own process): "
    "a venv with torch and diffusers; default: this one.")
_WHAT = flags.DEFINE_list("what", ["sample", "train"], "sample and/or train.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Compute dtypes of the sampling rows (params stay float32).")
_TRAIN_DTYPES = flags.DEFINE_list("train_dtypes", ["float32"],
                                  "Compute dtypes of the training rows (float32, bfloat16).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per side and row, alternating.")
_CALLS = flags.DEFINE_integer("calls", 1, "Guided evaluations or training steps per round.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "B, images per guided evaluation (a batch of 2B "
                              "through the U-Net); 0: the size's (base: 2).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 0,
                                    "Training batch; 0: the size's (base: 4).")
_GUIDANCE = flags.DEFINE_float("guidance", 7.0, "Classifier-free guidance weight (IF's: 7).")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where diffusers runs (cuda: beside JAX on a GPU).")
_THREADS = flags.DEFINE_integer("threads", 0, "torch's threads; 0: every CPU (os.cpu_count()).")
_CONV_IMPL = flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "matmul_grad"],
                               "JAX's convolutions (models/conv.py).")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", ["auto", "xla", "chunked"],
                                    "JAX's attention (layers.attention; auto: chunked on a CPU).")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and inputs.")
LR = 1e-4
WARMUP_TRAIN_STEPS = 2  # both sides from the same weights: their losses are compared


def torch_worker(python: str, spec: dict[str, Any]) -> harness.PeerWorker:
  """The torch side: this file's `worker` in its own process, driven over a pipe."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
         "JAX_PLATFORMS": "cpu"}
  return harness.PeerWorker([python, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                            env, "torch", ready_prefix=REPLY, reply_prefix=REPLY)


def random_params(shapes: Any, seed: int) -> Any:
  """Random float32 params of the tree of ShapeDtypeStructs: kernels ~ N(0, 1/fan_in), norm
  scales 1 + N(0, 0.1^2), biases and the rest N(0, 0.1^2) (diffusers' init would leave norms
  at 1/0, where a mistake in a scale or a bias would not show)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    x = rng.standard_normal(leaf.shape, dtype=np.float32)
    if name == "kernel":
      return x / np.sqrt(np.prod(leaf.shape[:-1]), dtype=np.float32)
    return x * np.float32(0.1) + np.float32(name == "scale")
  return jax.tree_util.tree_map_with_path(make, shapes)


def random_inputs(config: Any, size: dict[str, int], batch: int, train_batch: int,
                  seed: int) -> dict[str, Any]:
  """NHWC numpy inputs: a guided evaluation's (B images, text for 2B: the unconditional half
  first, as IF's pipeline concatenates them; one timestep) and a training batch's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed + 1)
  s, length, dim = size["image_size"], size["text_length"], config.text_dim
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  return {"sample": normal(batch, s, s, config.in_channels),
          "timestep": np.array(500.0, np.float32),
          "text": normal(2 * batch, length, dim),
          "train_x": normal(train_batch, s, s, config.in_channels),
          "train_noise": normal(train_batch, s, s, 3),
          "train_t": rng.integers(0, 1000, train_batch).astype(np.float32),
          "train_text": normal(train_batch, length, dim)}


def flops_of(compiled: Any) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and analysis.get("flops") else None


class JaxSide:
  """The jitted guided evaluation per dtype and the jitted training step per dtype."""

  def __init__(self, config: Any, params: Any, inputs: dict[str, Any], guidance: float):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from imagen_jax.models import if_unet  # pylint: disable=g-import-not-at-top
    self.jax, self.jnp, self.optax = jax, jnp, optax
    self.config, self.guidance = config, guidance
    self.model = lambda dtype: if_unet.IFUNet(config, dtype=jnp.dtype(dtype),
                                              attention_impl=_ATTENTION_IMPL.value,
                                              conv_impl=_CONV_IMPL.value)
    self.params = jax.device_put(params)
    self.inputs = {k: jax.device_put(v) for k, v in inputs.items()}
    self.compile_s, self.flops, self.samplers, self.trainers = {}, {}, {}, {}
    self.train_state = None

  def compile_sample(self, dtype: str) -> None:
    jnp, model, w = self.jnp, self.model(dtype), self.guidance

    def guided(params, x, t, text):
      out = model.apply({"params": params}, jnp.concatenate([x, x]), t, text)
      uncond, cond = jnp.split(out, 2)
      eps = uncond[..., :3] + w * (cond[..., :3] - uncond[..., :3])
      return jnp.concatenate([eps, cond[..., 3:]], axis=-1)
    i = self.inputs
    start = time.perf_counter()
    compiled = self.jax.jit(guided).lower(self.params, i["sample"], i["timestep"],
                                          i["text"]).compile()
    self.compile_s[f"sample {dtype}"] = time.perf_counter() - start
    self.flops[f"sample {dtype}"] = flops_of(compiled)
    self.samplers[dtype] = compiled

  def sample(self, dtype: str) -> Any:
    i = self.inputs
    return self.samplers[dtype](self.params, i["sample"], i["timestep"], i["text"])

  def compile_train(self, dtype: str) -> None:
    jax, jnp, optax, model = self.jax, self.jnp, self.optax, self.model(dtype)
    tx = optax.adam(LR)

    def step(params, opt_state, x, noise, t, text):
      def loss_fn(p):
        out = model.apply({"params": p}, x, t, text)
        return jnp.mean(jnp.square(out[..., :3] - noise))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    # Training moves its own copy of the weights (the sampling rows keep theirs).
    params = jax.tree_util.tree_map(jnp.copy, self.params)
    state = (params, tx.init(params))
    i = self.inputs
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        *state, i["train_x"], i["train_noise"], i["train_t"], i["train_text"]).compile()
    self.compile_s[f"train {dtype}"] = time.perf_counter() - start
    self.flops[f"train {dtype}"] = flops_of(compiled)
    self.trainers[dtype] = compiled
    if self.train_state is None:
      self.train_state = state

  def train(self, dtype: str) -> float:
    i = self.inputs
    params, opt_state, loss = self.trainers[dtype](
        *self.train_state, i["train_x"], i["train_noise"], i["train_t"], i["train_text"])
    self.train_state = (params, opt_state)
    return float(loss)  # blocks

  def timed(self, job: str, dtype: str, calls: int) -> tuple[list[float], list[float]]:
    seconds, losses = [], []
    for _ in range(calls):
      start = time.perf_counter()
      if job == "sample":
        self.sample(dtype).block_until_ready()
      else:
        losses.append(self.train(dtype))
      seconds.append(time.perf_counter() - start)
    return seconds, losses


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from imagen_jax.interop import diffusers_format  # pylint: disable=g-import-not-at-top
  from imagen_jax.models import if_unet  # pylint: disable=g-import-not-at-top

  size = SIZES[_SIZE.value]
  diffusers_config = unet_config(_SIZE.value)
  config = if_unet.from_diffusers_config(diffusers_config)
  batch = _BATCH.value or size["batch_size"]
  train_batch = _TRAIN_BATCH.value or size["train_batch_size"]
  threads = _THREADS.value or os.cpu_count()
  jobs = [("sample", d) for d in _DTYPES.value if "sample" in _WHAT.value]
  jobs += [("train", d) for d in _TRAIN_DTYPES.value if "train" in _WHAT.value]
  load_before = os.getloadavg()

  start = time.perf_counter()
  params = random_params(nn.unbox(if_unet.param_shapes(config)), _SEED.value)
  num_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
  inputs = random_inputs(config, size, batch, train_batch, _SEED.value)
  print(f"IF-style U-Net ({_SIZE.value}): {num_params:,} parameters "
        f"({num_params / 1e6:.1f}M), block_out_channels {size['block_out_channels']}, "
        f"{size['layers_per_block']} blocks per level, {size['image_size']}x{size['image_size']}, "
        f"text {size['text_length']} x {config.text_dim}", flush=True)

  with tempfile.TemporaryDirectory(prefix="if_vs_diffusers_") as tmp:
    model_dir, inputs_path = os.path.join(tmp, "unet"), os.path.join(tmp, "inputs.npz")
    diffusers_format.write_unet(model_dir, params, diffusers_config)
    np.savez(inputs_path, **inputs)
    setup_s = time.perf_counter() - start
    spec = {"model_dir": model_dir, "inputs": inputs_path, "device": _TORCH_DEVICE.value,
            "outputs": os.path.join(tmp, "torch_outputs.npz"), "threads": threads,
            "guidance": _GUIDANCE.value, "lr": LR}
    peer = torch_worker(_TORCH_PYTHON.value, spec)
    try:
      if peer.info["params"] != num_params:
        raise RuntimeError(f"diffusers built {peer.info['params']:,} parameters, imagen-jax "
                           f"{num_params:,}: not the same network")
      ours = JaxSide(config, params, inputs, _GUIDANCE.value)
      del params
      rows_out, torch_errors, agreement = _run(ours, peer, jobs, spec, np)
    finally:
      peer.close()

  rows = []
  for (job, dtype), r in rows_out.items():
    n = batch if job == "sample" else train_batch
    jax_s = statistics.median(r["jax"])
    torch_s = statistics.median(r["torch"]) if r["torch"] else None
    flops = ours.flops.get(f"{job} {dtype}")
    rows.append({
        "job": "sample (guided eval)" if job == "sample" else "train step",
        "dtype": dtype, "batch": n,
        "jax_images_per_s": n / jax_s, "torch_images_per_s": n / torch_s if torch_s else None,
        "ratio": round(torch_s / jax_s, 3) if torch_s else None,
        "jax_calls_per_s": 1 / jax_s, "torch_calls_per_s": 1 / torch_s if torch_s else None,
        "max_abs_diff": agreement.get((job, dtype)),
        "jax_gflop_per_s": flops / jax_s / 1e9 if flops else None,
        "jax_compile_s": round(ours.compile_s[f"{job} {dtype}"], 1)})
  extra = {
      "size": _SIZE.value, "params": num_params, "unet_config": diffusers_config,
      "image_size": size["image_size"], "text_length": size["text_length"],
      "batch_size": batch, "train_batch_size": train_batch, "rounds": _ROUNDS.value,
      "calls_per_round": _CALLS.value, "guidance": _GUIDANCE.value,
      "seconds": {f"{j} {d}": r for (j, d), r in rows_out.items()},
      "gflop_per_image": {k: (v / (batch if k.startswith("sample") else train_batch) / 1e9
                              if v else None) for k, v in ours.flops.items()},
      "agreement": agreement.get("detail"), "torch_errors": torch_errors,
      "jax": {"conv_impl": _CONV_IMPL.value, "attention_impl": _ATTENTION_IMPL.value,
              "devices": jax.device_count()},
      "torch": {k: peer.info[k] for k in ("torch", "diffusers", "threads", "load_s")},
      "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "setup_s": round(setup_s, 1)}
  # Other processes on the CPUs: torch's OpenMP threads wait at every barrier for a thread that
  # is descheduled, XLA's task pool does not, so a shared machine flatters JAX (on 2 cores shared
  # with about one core of other work: torch's guided evaluation 3x slower at 2 threads than at 1).
  extra["contended"] = load_before[0] > 0.5 * os.cpu_count()
  harness.report("if_vs_diffusers", rows, extra=extra)
  if extra["contended"]:
    print(f"WARNING: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs before the run: "
          "other processes share the CPUs and torch's threads suffer more from it than XLA's; "
          "rerun on an idle machine, or compare with --threads=1", file=sys.stderr)


def _run(ours: JaxSide, peer: Torch, jobs: list[tuple[str, str]], spec: dict[str, Any],
         np: Any) -> tuple[dict, dict, dict]:
  """Compile, check agreement, warm up, then the alternating rounds.
  -> ({(job, dtype): {"jax": [s per call per round], "torch": [...]}}, torch's errors per row,
  {(job, dtype): max abs diff, "detail": {...}})."""
  sample_dtypes = [d for j, d in jobs if j == "sample"]
  train_dtypes = [d for j, d in jobs if j == "train"]
  agreement: dict[Any, Any] = {"detail": {}}
  detail = agreement["detail"]
  errors: dict[str, str] = {}

  if sample_dtypes:
    for dtype in sample_dtypes:
      ours.compile_sample(dtype)
    reply = peer.ask("check " + " ".join(sorted(set(sample_dtypes) | {"float32"})))
    errors.update({f"sample {d}": e for d, e in reply["errors"].items()})
    theirs = dict(np.load(spec["outputs"]))
    reference = theirs.get("float32")
    if reference is not None:
      detail["torch_float32_output_max_abs"] = float(np.max(np.abs(reference)))
    for dtype in sample_dtypes:
      mine = np.asarray(ours.sample(dtype))
      if dtype in theirs:
        agreement[("sample", dtype)] = float(np.max(np.abs(mine - theirs[dtype])))
      if reference is not None and dtype != "float32":
        detail[f"sample {dtype} vs torch float32"] = {
            "jax": float(np.max(np.abs(mine - reference))),
            "torch": (float(np.max(np.abs(theirs[dtype] - reference)))
                      if dtype in theirs else None)}
    print("agreement (guided output, max abs diff, JAX vs torch): "
          + ", ".join(f"{d}: {agreement.get(('sample', d))}" for d in sample_dtypes)
          + f"; output max abs {detail.get('torch_float32_output_max_abs')}", flush=True)

  for dtype in train_dtypes:
    ours.compile_train(dtype)
    # The warm-up steps, from the same weights on both sides (the first training row's steps
    # start from the shared weights; later rows' from where the earlier ones left them).
    mine = ours.timed("train", dtype, WARMUP_TRAIN_STEPS)[1]
    try:
      theirs_losses = peer.ask(f"train {dtype} {WARMUP_TRAIN_STEPS}")["losses"]
    except RuntimeError as e:
      errors[f"train {dtype}"] = str(e)
      continue
    if dtype == train_dtypes[0]:
      agreement[("train", dtype)] = max(abs(a - b) for a, b in zip(mine, theirs_losses))
      detail[f"train {dtype} losses"] = {"jax": mine, "torch": theirs_losses}
    print(f"agreement (train {dtype}, warm-up losses): JAX {mine}, torch {theirs_losses}",
          flush=True)

  for dtype in sample_dtypes:  # warm-up (first-call allocations)
    ours.timed("sample", dtype, 1)
    if f"sample {dtype}" not in errors:
      peer.ask(f"sample {dtype} 1")

  results = {job: {"jax": [], "torch": []} for job in jobs}
  for r in range(_ROUNDS.value):
    for job, dtype in jobs:
      seconds = ours.timed(job, dtype, _CALLS.value)[0]
      results[(job, dtype)]["jax"].append(statistics.mean(seconds))
      if f"{job} {dtype}" not in errors:
        seconds = peer.ask(f"{job} {dtype} {_CALLS.value}")["seconds"]
        results[(job, dtype)]["torch"].append(statistics.mean(seconds))
      print(f"round {r + 1}: {job} {dtype}: JAX {results[(job, dtype)]['jax'][-1]:.3f} s, torch "
            f"{(results[(job, dtype)]['torch'] or [float('nan')])[-1]:.3f} s", flush=True)
  return results, errors, agreement


if __name__ == "__main__":
  app.run(main)
