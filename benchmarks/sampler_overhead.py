"""What each sampler's own arithmetic costs per step, next to the network it drives.

    python -m benchmarks.sampler_overhead --configs=configs/base64.py:500m,configs/sr256.py:paper \
        --batch_size=1 --network_steps=2

For each config and sampler: the sampler's whole `lax.scan` loop timed with a network that costs
nothing (x0_hat = z / 2) at the config's image size and the batch, with the config's
thresholding: milliseconds per step of everything but the network (the solver's update, its
history of x0_hats, thresholding, RNG). Then, once per config, the real stage sampler
(`benchmarks/sample.py`, random parameters, DDIM with the config's guidance) at `network_steps`
and twice that: the network's seconds per step. "overhead" is a sampler's extra cost per step
over DDIM's, as a fraction of the network's step: how much the solver changes throughput.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list("configs", ["configs/base64.py:500m", "configs/sr256.py:paper"],
                             "Stage configs (their image size, thresholding and network).")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_3m",
                                           "dpmpp_2m_sde", "unipc"], "Samplers to time.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per call.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps of the network-free loops.")
_NETWORK_STEPS = flags.DEFINE_integer(
    "network_steps", 2, "Steps of the real sampler's shorter run (the longer one doubles it); 0 "
    "skips the network (its compile takes minutes at paper sizes on a CPU).")


def main(argv: Sequence[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from benchmarks import sample as sample_bench  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import thresholding  # pylint: disable=g-import-not-at-top

  rows = []
  for spec in _CONFIGS.value:
    config = config_lib.load_config(spec)
    size, batch = config.image_size, _BATCH.value
    threshold = thresholding.get_threshold_fn(config.sample.threshold, config.sample.percentile)
    log_snr_fn = schedules.stage_log_snr_fn(config.diffusion)
    noise = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
    solver_ms = {}
    for name in _SAMPLERS.value:
      loop = jax.jit(lambda n, name=name: samplers.solve(
          lambda z, log_snr: z * 0.5, n, jax.random.PRNGKey(1), sampler=name,
          num_steps=_STEPS.value, log_snr_fn=log_snr_fn, threshold_fn=threshold))
      jax.block_until_ready(loop(noise))
      times = harness.timeit(lambda: jax.block_until_ready(loop(noise)), repeats=5)
      evals = samplers.network_evaluations(name, _STEPS.value, log_snr_fn, guided=False)
      solver_ms[name] = 1e3 * harness.summarize(times)["median_s"] / evals
    network_ms = None
    if _NETWORK_STEPS.value:
      per_call = []
      for steps in (_NETWORK_STEPS.value, 2 * _NETWORK_STEPS.value):
        settings = stage_sampler.StageSettings.from_config(config.sample, sampler="ddim", steps=steps)
        compiled = sample_bench.CompiledSampler(config, batch, settings)
        per_call.append(min(compiled.run() for _ in range(2)))
        del compiled
      network_ms = 1e3 * (per_call[1] - per_call[0]) / _NETWORK_STEPS.value
    for name, ms in solver_ms.items():
      extra_ms = ms - solver_ms.get("ddim", ms)
      rows.append({"config": spec, "image": f"{batch}x{size}x{size}", "sampler": name,
                   "solver_ms_per_step": round(ms, 3),
                   "network_ms_per_step": round(network_ms, 1) if network_ms else None,
                   "overhead_vs_ddim": (f"{extra_ms / network_ms:.2e}" if network_ms else None)})
  harness.report("sampler_overhead", rows, extra={"batch_size": _BATCH.value,
                                                  "steps": _STEPS.value})


if __name__ == "__main__":
  app.run(main)
