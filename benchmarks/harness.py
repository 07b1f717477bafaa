"""Shared benchmark harness: timing, memory, and one output format (FLOPs and peaks: train/mfu.py).

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
import subprocess
import sys
import time
from typing import Any, Callable, Sequence


def device_description() -> dict[str, Any]:
  """What the numbers were measured on: platform, device kind and count, host CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "host": platform.node(),
          "cpu": platform.processor() or platform.machine(),
          "jax": jax.__version__, "python": sys.version.split()[0]}


def config_label() -> str:
  """The `--config` flag as given, with its `--config.key=value` overrides: a row's name."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = flags.FLAGS["config"]
  flat = []

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f"{prefix}{key}.", value)
      else:
        flat.append(f"{prefix}{key}={value}")

  walk("", config_flags.get_override_values(holder))
  return " ".join([config_flags.get_config_filename(holder), *flat])


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


class PeerWorker:
  """Another framework's side of a side-by-side benchmark, in its own process (its own venv if
  need be), driven over a pipe: it prints one JSON line once ready (after `ready_prefix`), then
  one per command it reads on stdin (after `reply_prefix`); "quit" ends it."""

  def __init__(self, argv: Sequence[str], env: dict[str, str], name: str,
               ready_prefix: str = "", reply_prefix: str = "", close_timeout: float = 120):
    self.name, self.reply_prefix, self.close_timeout = name, reply_prefix, close_timeout
    self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.info = self._read(ready_prefix)

  def _read(self, prefix: str) -> dict[str, Any]:
    for line in self.proc.stdout:
      if line.startswith(prefix) and line[len(prefix):].lstrip().startswith("{"):
        reply = json.loads(line[len(prefix):])
        if "error" in reply:
          raise RuntimeError(f"{self.name} worker: {reply['error']}")
        return reply
    raise RuntimeError(f"the {self.name} worker exited (code {self.proc.wait()})")

  def ask(self, command: str) -> dict[str, Any]:
    """Sends one command line; its JSON reply."""
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read(self.reply_prefix)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=self.close_timeout)

