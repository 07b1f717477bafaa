"""One stage's sampling loop as users run it: compile time, seconds per batch, images/s.

    python -m benchmarks.sample --config=configs/base64.py:tiny --batch_size=16 --steps=32
    python -m benchmarks.sample --config=configs/sr256.py:tiny --guidance=3 --sampler=ddim

Times `imagen_jax/diffusion/stage_sampler.py`'s `sample` (network, guidance, thresholding and the sampler's
`lax.scan` over steps, jitted as one function, as `Cascade` and the training previews jit it) with
the stage's settings from `config.sample`, overridden by the flags. Parameters are random: the
cost does not depend on their values. SR stages get random low-res images. The batch is split over
all devices as `Cascade.sample` splits it. FLOPs are the matmul and convolution FLOPs of the traced
function, every step of the sampler's scan counted (`train/mfu.py:model_flops`; with a guidance
interval that counts the guided branch at every step, an upper bound). "passes" counts network
forward passes per image (`StageSettings.network_evaluations`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from imagen_jax.core import config_lib
from imagen_jax.core import hugepages


class CompiledSampler:
  """`stage.sample` of `config` for `batch_size` images with `settings`, compiled as `Cascade`
  compiles it, with random params and inputs on the devices; `run()` times one call."""

  def __init__(self, config: Any, batch_size: int, settings: Any):
    import jax  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from imagen_jax import models  # pylint: disable=g-import-not-at-top
    from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
    from imagen_jax.train import mfu  # pylint: disable=g-import-not-at-top
    from imagen_jax.core import partitioning  # pylint: disable=g-import-not-at-top

    self.config, self.batch_size, self.settings = config, batch_size, settings
    model = models.build_model(config)
    self.mesh = mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_batch = lambda x: jax.device_put(x, partitioning.batch_sharding(mesh, x.ndim))
    self.params = jax.jit(
        lambda key: nn.unbox(model.init(key, **models.init_inputs(config))["params"]),
        out_shardings=replicated)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    length, width = config.text.max_length, config.text.width
    text_emb = on_batch(rng.standard_normal((batch_size, length, width)).astype(np.float32))
    text_mask = on_batch(np.ones((batch_size, length), bool))
    keys = on_batch(np.asarray(stage_sampler.image_keys(config.seed, np.arange(batch_size))))
    lowres = None
    if config.stage == "sr":
      low = config.lowres.size
      lowres = on_batch(rng.uniform(-1, 1, (batch_size, low, low, 3)).astype(np.float32))
    self.args = (self.params, keys, text_emb, text_mask)
    self.lowres = lowres

    sample_fn = jax.jit(functools.partial(stage_sampler.sample_stage, config, model, settings=settings))
    with partitioning.mesh_context(mesh):
      start = time.perf_counter()
      traced = sample_fn.trace(*self.args, lowres=lowres)
      self.compiled = traced.lower().compile()
      self.compile_s = time.perf_counter() - start
    self.flops = mfu.model_flops(traced.jaxpr)  # every step of the sampler's scan, all devices
    self.run()  # warm-up

  def run(self) -> float:
    """Seconds for one sampling call of the whole batch."""
    import jax  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    jax.block_until_ready(self.compiled(*self.args, lowres=self.lowres))
    return time.perf_counter() - start


def measure(config: Any, batch_size: int, settings: Any, repeats: int = 3, label: str = "",
            cpu_probe: bool = True) -> dict[str, Any]:
  """One row: `stage.sample` of `config` for `batch_size` images with `settings`, timed."""
  sampler = CompiledSampler(config, batch_size, settings)
  return row_for(sampler, [sampler.run() for _ in range(repeats)], label, cpu_probe)


def row_for(sampler: CompiledSampler, times: Sequence[float], label: str = "",
            cpu_probe: bool = True) -> dict[str, Any]:
  """The table row of a timed `CompiledSampler`."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import mfu  # pylint: disable=g-import-not-at-top
  config, settings, batch, flops = (sampler.config, sampler.settings, sampler.batch_size,
                                    sampler.flops)
  passes = settings.network_evaluations(schedules.stage_log_snr_fn(config.diffusion))
  summary = harness.summarize(times)
  peak, peak_source = mfu.peak_tflops_per_device(cpu_probe=cpu_probe)
  tflops = flops / summary["median_s"] / 1e12 / jax.device_count() if flops else None
  return {
      "config": label or config.model.name, "batch": batch, "dtype": config.dtype,
      "sampler": settings.sampler, "steps": settings.steps, "passes": passes,
      "guidance": settings.guidance, "guidance_interval": list(settings.guidance_interval),
      "threshold": settings.threshold, "compile_s": round(sampler.compile_s, 2),
      "batch_s": round(summary["median_s"], 3), "batch_min_s": round(summary["min_s"], 3),
      "images_per_s": round(batch / summary["median_s"], 3),
      "net_evals_per_s": round(batch * passes / summary["median_s"], 1),
      "gflops_per_batch": round(flops / 1e9, 1) if flops else None,
      "tflops_per_device": round(tflops, 4) if tflops else None,
      "mfu": round(tflops / peak, 4) if tflops and peak else None, "peak_source": peak_source,
      "host_max_rss_gib": round(harness.peak_memory_bytes()["host_max_rss_bytes"] / 2**30, 2),
  }


def define_flags() -> None:
  """The command line's flags (not defined on import, so other benchmarks can import this
  module's classes next to their own flags)."""
  config_lib.config_flag()
  flags.DEFINE_integer("batch_size", 16, "Images per sampling call.")
  flags.DEFINE_integer("steps", 0, "Sampler steps (0: config.sample.steps).")
  flags.DEFINE_float("guidance", None, "Guidance weight (default: config.sample).")
  flags.DEFINE_string("sampler", None, "A sampler name, e.g. ddim, dpmpp_2m, unipc (default: "
                      "config).")
  flags.DEFINE_string("spacing", None, "time or logsnr (default: config).")
  flags.DEFINE_string("guidance_interval", None, "LO:HI in EDM sigma, or 'all' (default: config).")
  flags.DEFINE_string("threshold", None, "dynamic, static or none (default: config).")
  flags.DEFINE_integer("repeats", 3, "Timed calls after the compiling one.")
  flags.DEFINE_string("label", "", "A name for this row (default: the config).")


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  config = args.config
  settings = stage_sampler.StageSettings.from_config(
      config.sample, steps=args.steps or None, guidance=args.guidance, sampler=args.sampler,
      threshold=args.threshold, spacing=args.spacing,
      guidance_interval=(outdir_lib.parse_interval(args.guidance_interval)
                         if args.guidance_interval else None))
  row = measure(config, args.batch_size, settings, repeats=args.repeats,
                label=args.label or harness.config_label())
  harness.report("sample", [row], extra={"repeats": args.repeats})


if __name__ == "__main__":
  hugepages.reexecute_with_huge_pages()  # as `imagen-jax` runs (core/hugepages.py)
  define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
