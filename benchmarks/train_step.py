"""The training step users run: compile time, step time, images/s, FLOPs, MFU and peak memory.

    python -m benchmarks.train_step --config=configs/base64.py:tiny --batch_size=16 --steps=10
    python -m benchmarks.train_step --config=configs/base64.py:500m --batch_size=64 \
        --config.dtype=bfloat16                    # a GPU/TPU figure
    python -m benchmarks.train_step --config=configs/sr256.py:tiny --text=encoder

What is measured is `imagen-jax train`'s own step, built by the same function,
`train.compile_train_step` (model, optimizer, state and batch shardings, AOT-compiled with the state
donated); only the input pipeline is replaced by one random batch on the
devices (`benchmarks/input_pipeline.py` measures the pipeline). FLOPs per step are the traced
step's matmul and convolution FLOPs (`train/mfu.py:model_flops`; XLA's `cost_analysis()` counts a
loop body once and misses most of the CPU's chunked attention); MFU is against `train/mfu.py`'s
peak table (bf16 dense) or, on a CPU, the f32 matmul rate measured in the same run. Peak memory: the device's `memory_stats()` on
GPU/TPU, the process's max RSS on a CPU.

Text: `--text=embeddings` (default) feeds precomputed T5 embeddings, as training from an embedding
cache does (and as every large run should); `--text=encoder` runs the config's frozen encoder
inside the step, as the demo does with `builtin:shapes-tiny`.

Timing: one warm-up step, then `--repeats` rounds of `--steps` steps dispatched back to back (the
host waits once per round, as the training loop waits only at logging steps). The table gives the
median and best round's seconds per step.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from imagen_jax.core import config_lib
from imagen_jax.core import hugepages


def random_batch(batch_shapes: dict[str, Any], vocab: int = 100, seed: int = 0) -> dict[str, Any]:
  """A global batch with the shapes, dtypes and shardings of `train.batch_spec`: random pixels,
  embeddings and token ids; every text position real (the cost does not depend on the mask)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = {}
  for key, spec in batch_shapes.items():
    if spec.dtype == np.uint8:
      value = rng.integers(0, 256, spec.shape, dtype=np.uint8)
    elif spec.dtype == np.bool_:
      value = np.ones(spec.shape, bool)
    elif np.issubdtype(spec.dtype, np.integer):
      value = rng.integers(1, vocab, spec.shape).astype(spec.dtype)
    else:
      value = rng.standard_normal(spec.shape).astype(spec.dtype)
    out[key] = jax.device_put(value, spec.sharding)
  return out


class CompiledStep:
  """The training step of `config` at `config.batch_size`, compiled as `imagen-jax train` compiles
  it, with a state and a random batch on the devices; `run(steps)` times back-to-back steps."""

  def __init__(self, config: Any, text: str = "embeddings"):
    import jax  # pylint: disable=g-import-not-at-top
    from imagen_jax.core import partitioning  # pylint: disable=g-import-not-at-top
    from imagen_jax.train import plan as plan_lib  # pylint: disable=g-import-not-at-top
    from imagen_jax.train import train  # pylint: disable=g-import-not-at-top

    config = config_lib.copy(config)
    # `batch_spec` and the step read embeddings from the batch when a cache is configured (the
    # random batch stands in for its rows); without one the step runs the text encoder.
    config.data.embed_cache = "(random embeddings)" if text == "embeddings" else ""
    self.config, self.text = config, text
    self.mesh = mesh = partitioning.make_mesh(config.mesh)
    train.check_config(config, mesh)
    plan = plan_lib.Plan.from_config(config)
    text_encoder = train.load_text_encoder_if_needed(config)
    layout = train.state_layout(config, mesh, plan)
    self.state = train.create_state(config, layout, plan)
    self.frozen = train.frozen_inputs(layout, plan, text_encoder, mesh)
    step = train.compile_train_step(config, mesh, layout, plan, text_encoder, self.frozen)
    self.compiled, self.batch = step.compiled, random_batch(step.batch_shapes)
    self.compile_s, self.flops = step.compile_seconds, step.flops_per_step
    self.params = sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))
    self.metrics = None
    self.run(1)  # warm-up

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps dispatched back to back (one wait at the end)."""
    import jax  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch, self.frozen)
    jax.block_until_ready((self.state, self.metrics))
    return (time.perf_counter() - start) / steps


def measure(config: Any, text: str = "embeddings", steps: int = 5, repeats: int = 3,
            profile_dir: str = "", label: str = "", cpu_probe: bool = True) -> dict[str, Any]:
  """One row: the compiled training step of `config` at `config.batch_size`, timed."""
  import jax  # pylint: disable=g-import-not-at-top
  step = CompiledStep(config, text)
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for r in range(repeats):
    trace = profile_dir and r == repeats - 1
    if trace:
      jax.profiler.start_trace(profile_dir)
    times.append(step.run(steps))
    if trace:
      jax.profiler.stop_trace()
  after = resource.getrusage(resource.RUSAGE_SELF)
  row = row_for(step, times, label, cpu_probe)
  # The kernel's share of the timed steps: page faults of freshly mapped XLA buffers
  # (imagen_jax/core/hugepages.py) show here, not in user time.
  timed_steps = steps * repeats
  row["minor_faults_per_step"] = round((after.ru_minflt - before.ru_minflt) / timed_steps)
  row["system_s_per_step"] = round((after.ru_stime - before.ru_stime) / timed_steps, 4)
  return row


def row_for(step: CompiledStep, times: Sequence[float], label: str = "",
            cpu_probe: bool = True) -> dict[str, Any]:
  """The table row of a timed `CompiledStep`: throughput, FLOPs, MFU and memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import mfu  # pylint: disable=g-import-not-at-top
  config, flops = step.config, step.flops
  peak, peak_source = mfu.peak_tflops_per_device(cpu_probe=cpu_probe)
  summary = harness.summarize(times)
  rates = mfu.throughput({"steps_per_sec": 1.0 / summary["median_s"]}, config.batch_size, flops,
                         peak)
  images_per_s = config.batch_size / summary["median_s"]
  row = {
      "config": label or config.model.name, "params": step.params, "batch": config.batch_size,
      "dtype": config.dtype, "text": step.text, "compile_s": round(step.compile_s, 2),
      "step_s": round(summary["median_s"], 4), "step_min_s": round(summary["min_s"], 4),
      "images_per_s": round(images_per_s, 2),
      "images_per_s_per_device": round(images_per_s / jax.device_count(), 2),
      "gflops_per_step": round(flops / 1e9, 2) if flops else None,
      "tflops_per_device": round(rates["tflops_per_device"], 4) if flops else None,
      "peak_tflops": round(peak, 3) if peak else None, "peak_source": peak_source,
      "mfu": round(rates["mfu"], 4) if "mfu" in rates else None,
      "loss": round(float(step.metrics.compute()["loss"]), 4),
  }
  memory = harness.peak_memory_bytes()
  row["device_peak_gib"] = round(memory["device_peak_bytes"] / 2**30, 2) \
      if "device_peak_bytes" in memory else None
  row["host_max_rss_gib"] = round(memory["host_max_rss_bytes"] / 2**30, 2)
  return row


def define_flags() -> None:
  """The command line's flags (not defined on import, so other benchmarks can import this
  module's classes next to their own flags)."""
  config_lib.config_flag()
  flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's batch_size).")
  flags.DEFINE_integer("steps", 5, "Steps per timed round.")
  flags.DEFINE_integer("repeats", 3, "Timed rounds.")
  flags.DEFINE_enum("text", "embeddings", ["embeddings", "encoder"],
                    "Precomputed T5 embeddings in the batch, or the encoder in the step.")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of one round.")
  flags.DEFINE_string("label", "", "A name for this row (default: the config).")


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  config = args.config
  if args.batch_size:
    config.batch_size = args.batch_size
  row = measure(config, text=args.text, steps=args.steps, repeats=args.repeats,
                profile_dir=args.profile_dir, label=args.label or harness.config_label())
  harness.report("train_step", [row], extra={"steps": args.steps, "repeats": args.repeats})


if __name__ == "__main__":
  hugepages.reexecute_with_huge_pages()  # as `imagen-jax` runs (core/hugepages.py)
  define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
