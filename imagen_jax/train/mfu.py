"""FLOPs, device peaks and model FLOPs utilization: shared by the training loop and benchmarks."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per chip (vendor figures), matched against jax's device_kind.
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "a100": 312.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0,
}


def model_flops(jaxpr: Any) -> float:
  """Matmul and convolution FLOPs of a traced computation (`jax.jit(f).trace(...).jaxpr`), all
  devices together: 2 per multiply-add, loop bodies counted once per iteration.

  XLA's cost analysis counts a while loop's body once, so a step with a `lax.map`/`scan` inside
  (the CPU's chunked attention, gradient accumulation) looked cheaper than it is; this count
  walks the jaxpr instead and multiplies each scan body by its length. Elementwise work is left
  out, as MFU conventionally does (it is a small share of a U-Net's FLOPs). cuDNN's fused
  attention is counted from its shapes (4 BNTSH forward, 10 BNTSH backward with the recompute).
  A `while_loop` of unknown trip count counts once.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contract = math.prod(lhs[d] for d in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      rhs = eqn.invars[1].aval.shape
      window = math.prod(rhs[d] for d in rhs_spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * rhs[rhs_spec[1]] * window
    elif name.startswith("dot_product_attention_fwd") or name.startswith(
        "dot_product_attention_bwd"):
      batch, query_len, heads, head_dim = eqn.invars[0].aval.shape
      key_len = eqn.invars[1].aval.shape[1]
      per = 4.0 if "fwd" in name else 10.0
      total += per * batch * heads * query_len * key_len * head_dim
    params = [p for v in eqn.params.values() for p in (v if isinstance(v, tuple) else (v,))]
    inner = [p for p in params if isinstance(p, (jex_core.ClosedJaxpr, jex_core.Jaxpr))]
    if not inner:
      continue
    counts = [model_flops(sub) for sub in inner]
    if name == "cond":
      total += max(counts)  # one branch runs
    else:
      total += sum(counts) * eqn.params.get("length", 1)  # scan: `length` iterations
  return total


def matmul_probe_tflops(n: int = 1024, repeats: int = 50) -> float:
  """The best f32 matmul rate XLA reaches on this device: a CPU's practical peak (the best of
  `repeats` short products, so that a moment of contention on a shared machine does not drag
  it down)."""
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
