"""FLOPs, device peaks and model FLOPs utilization: shared by the training loop and benchmarks."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per chip (vendor figures), matched against jax's device_kind.
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "a100": 312.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0,
}


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs per device of a compiled computation, from XLA's cost analysis (None if unknown)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def matmul_probe_tflops(n: int = 1024, repeats: int = 10) -> float:
  """The best f32 matmul rate XLA reaches on this device: a CPU's practical peak."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e12


def peak_tflops_per_device(cpu_probe: bool = True) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, its source): the vendor table, or a matmul probe on a CPU."""
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in PEAK_TFLOPS.items():
    if name in kind:
      return peak, f"table ({name})"
  if jax.devices()[0].platform == "cpu" and cpu_probe:
    return matmul_probe_tflops(), "measured (f32 matmul probe)"
  return None, "unknown device"


def throughput(rates: dict[str, float], batch_size: int, flops_per_step: float | None,
               peak_tflops: float | None) -> dict[str, float]:
  """images/s, TFLOP/s per device and MFU from steps/s and the compiled step's FLOPs."""
  out = dict(rates)
  if flops_per_step:
    tflops = flops_per_step * rates["steps_per_sec"] / 1e12
    out["tflops_per_device"] = tflops
    if peak_tflops:
      out["mfu"] = tflops / peak_tflops
  return out
