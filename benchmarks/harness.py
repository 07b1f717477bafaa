"""Shared benchmark harness: timing, peak tables, memory, and one output format.

Every benchmark prints a table for people and one line `RESULT_JSON {...}` for machines:

    from benchmarks import harness
    rows = [{"config": "tiny", "images_per_s": 12.3}]
    harness.report("train_step", rows, extra={"batch_size": 16})
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# Dense bf16 peak TFLOP/s per chip (vendor figures).
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "a100": 312.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
}


def device_description() -> dict[str, Any]:
  """What the numbers were measured on: platform, device kind and count, host CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "host": platform.node(),
          "cpu": platform.processor() or platform.machine(),
          "jax": jax.__version__, "python": sys.version.split()[0]}


def peak_tflops_per_device(cpu_probe: bool = True) -> tuple[float | None, str]:
  """(peak TFLOP/s, where it came from): the vendor table, or a matmul probe on a CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in PEAK_TFLOPS.items():
    if name in kind:
      return peak, f"table ({name})"
  if jax.devices()[0].platform == "cpu" and cpu_probe:
    return matmul_probe_tflops(), "measured (f32 matmul probe)"
  return None, "unknown device"


def matmul_probe_tflops(n: int = 1024, repeats: int = 10) -> float:
  """The best f32 matmul rate this CPU reaches through XLA: the CPU's practical peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(timeit(lambda: f(a).block_until_ready(), repeats=repeats))
  return 2 * n ** 3 / best / 1e12


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 0) -> list[float]:
  """Wall-clock seconds of `fn()` (which must block until its work is done), per repeat."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def summarize(times: Sequence[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def peak_memory_bytes() -> dict[str, int]:
  """Device peak (GPU/TPU memory_stats) and host max RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {"host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return out


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled computation from XLA's cost analysis (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  if not rows:
    return "(no rows)"
  keys = list(dict.fromkeys(k for r in rows for k in r))
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  widths = {k: max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys}
  lines = ["  ".join(k.ljust(widths[k]) for k in keys),
           "  ".join("-" * widths[k] for k in keys)]
  lines += ["  ".join(cell(r.get(k, "")).ljust(widths[k]) for k in keys) for r in rows]
  return "\n".join(lines)


def report(name: str, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
  """Prints the table and one `RESULT_JSON` line with the rows, the device and `extra`."""
  print(f"== {name} ==")
  print(format_table(rows))
  payload = {"benchmark": name, "device": device_description(), "rows": list(rows),
             **(extra or {})}
  print("RESULT_JSON " + json.dumps(payload, default=str))
