"""`imagen-jax serve` under load, on loopback: throughput and latency against concurrent clients.

    python -m benchmarks.serve_load --stages=demo_run/base,demo_run/sr
    python -m benchmarks.serve_load --stages=runs/base,runs/sr --clients=1,4 --requests=20

Starts `imagen-jax serve` on the cascade (a subprocess, 127.0.0.1), waits until every batch size
is compiled, then for each count of --clients runs that many closed-loop clients (each sends a
one-image request, waits for the answer, sends the next), bounded by --requests and --seconds
per level: images/s against one client at a time, p50/p95/p99 latency, and every request
answered (200, or 429 when the queue is full; no 5xx, none lost). Then an open-loop phase at
--overload times the largest level's throughput for --overload_seconds: the queue stays within
--max_queue (the surplus gets 429) and the server's RSS stays flat. Ends the server with SIGTERM
(it must exit 0). Prints a table and one RESULT_JSON line.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from benchmarks import harness

_STAGES = flags.DEFINE_string("stages", None, "Stage workdirs, base first: DIR,DIR.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients per level.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests per level at most.")
_SECONDS = flags.DEFINE_float("seconds", 120.0, "Seconds per level at most.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,4,16", "The server's --batch_sizes.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 32, "The server's --max_queue.")
_STEPS = flags.DEFINE_string("steps", None, "The server's --steps (default: the configs').")
_OVERLOAD = flags.DEFINE_float("overload", 2.0, "Open-loop rate, in multiples of the largest "
                               "level's images/s (0: skip the phase).")
_OVERLOAD_SECONDS = flags.DEFINE_float("overload_seconds", 60.0, "Length of the open-loop phase.")
_WORKERS = flags.DEFINE_integer("workers", None, "The server's --workers (default: its own).")
_PACKING = flags.DEFINE_string("packing", None, "The server's --packing (default: its own).")
_START_TIMEOUT = flags.DEFINE_float("start_timeout", 1200.0,
                                    "Seconds to wait for the server to compile.")

PROMPTS = ["a red circle at the top left corner", "a blue square above a white triangle",
           "a green triangle at the center", "a white circle at the bottom right corner",
           "a yellow square to the left of a purple circle", "a purple triangle at the top"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
  """Resident memory of a process (Linux /proc), 0 elsewhere."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


class Server:
  """`imagen-jax serve` in a subprocess on a free loopback port."""

  def __init__(self, stages: str, batch_sizes: str, max_queue: int, steps: str | None,
               extra: Sequence[str] = ()):
    import httpx  # pylint: disable=g-import-not-at-top
    self.port = free_port()
    argv = [sys.executable, "-m", "imagen_jax", "serve", f"--stages={stages}",
            f"--port={self.port}", f"--batch_sizes={batch_sizes}", f"--max_queue={max_queue}",
            "--max_n=1"] + ([f"--steps={steps}"] if steps else []) + list(extra)
    self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.output: list[str] = []
    threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
    self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600,
                               limits=httpx.Limits(max_connections=300))

  def wait_ready(self, timeout: float) -> float:
    import httpx  # pylint: disable=g-import-not-at-top
    start = time.time()
    while time.time() - start < timeout:
      if self.proc.poll() is not None:
        raise RuntimeError("the server exited:\n" + "".join(self.output)[-4000:])
      try:
        if self.client.get("/readyz").status_code == 200:
          return time.time() - start
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    raise TimeoutError(f"the server was not ready in {timeout} s")

  def metrics(self) -> dict[str, float]:
    """The unlabeled samples of /metrics, and batch counts by size."""
    from prometheus_client import parser  # pylint: disable=g-import-not-at-top
    out = {}
    for family in parser.text_string_to_metric_families(self.client.get("/metrics").text):
      for sample in family.samples:
        key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
        out[key] = sample.value
    return out

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(120)
    finally:
      self.client.close()


class Monitor:
  """Samples the server's queue depth and RSS every 0.2 s while it runs."""

  def __init__(self, server: Server):
    self.server, self.queue, self.rss = server, [], []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.2):
      try:
        self.queue.append(self.server.client.get("/readyz").json()["queue_images"])
      except Exception:  # pylint: disable=broad-except  (a missed sample is fine)
        pass
      self.rss.append(rss_bytes(self.server.proc.pid))

  def stop(self):
    self._stop.set()
    self._thread.join()


def one_request(client, i: int) -> tuple[int, float]:
  """(status, seconds) of one one-image request (status 0: no answer: a transport error)."""
  import httpx  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    status = client.post("/v1/images/generations",
                         json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "n": 1}).status_code
  except httpx.HTTPError:
    status = 0
  return status, time.perf_counter() - start


def summarize(label: str, results: list[tuple[int, float]], seconds: float,
              before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
  ok = [t for s, t in results if s == 200]
  batches = after.get("imagen_serve_batch_fill_ratio_count", 0) - before.get(
      "imagen_serve_batch_fill_ratio_count", 0)
  fill = after.get("imagen_serve_batch_fill_ratio_sum", 0) - before.get(
      "imagen_serve_batch_fill_ratio_sum", 0)
  percentile = lambda q: float(np.percentile(ok, q)) if ok else float("nan")
  return {"clients": label, "requests": len(results), "ok": len(ok),
          "429": sum(s == 429 for s, _ in results),
          "5xx": sum(500 <= s < 600 for s, _ in results),
          "lost": sum(s == 0 for s, _ in results),
          "images_per_s": len(ok) / seconds, "p50_s": percentile(50), "p95_s": percentile(95),
          "p99_s": percentile(99), "batches": int(batches),
          "mean_fill": fill / batches if batches else float("nan")}


def closed_loop(server: Server, clients: int, requests: int, seconds: float,
                first: int) -> tuple[list[tuple[int, float]], float]:
  """`clients` clients each sending one request after the other, until `requests` are sent or
  `seconds` have passed."""
  lock, sent, results = threading.Lock(), [0], []
  deadline = time.time() + seconds

  def client_loop():
    while True:
      with lock:
        if sent[0] >= requests or time.time() > deadline:
          return
        i = first + sent[0]
        sent[0] += 1
      results.append(one_request(server.client, i))

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for _ in range(clients):
      pool.submit(client_loop)
  return results, time.perf_counter() - start


def open_loop(server: Server, rate: float, seconds: float, first: int
              ) -> tuple[list[tuple[int, float]], float]:
  """Requests sent at `rate` per second for `seconds`, whatever the answers."""
  results, futures = [], []
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(256) as pool:
    i = 0
    while (elapsed := time.perf_counter() - start) < seconds:
      due = int(elapsed * rate) + 1
      while i < due:
        futures.append(pool.submit(one_request, server.client, first + i))
        i += 1
      time.sleep(0.01)
    results = [f.result() for f in futures]
  return results, time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
  if not _STAGES.value:
    raise app.UsageError("--stages is required (e.g. --stages=demo_run/base,demo_run/sr)")
  server_flags = ([f"--workers={_WORKERS.value}"] if _WORKERS.value else []) + (
      [f"--packing={_PACKING.value}"] if _PACKING.value else [])
  server = Server(_STAGES.value, _BATCH_SIZES.value, _MAX_QUEUE.value, _STEPS.value, server_flags)
  rows, extra = [], {"stages": _STAGES.value, "batch_sizes": _BATCH_SIZES.value,
                     "max_queue": _MAX_QUEUE.value, "steps": _STEPS.value,
                     "server_flags": server_flags}
  try:
    extra["ready_s"] = server.wait_ready(_START_TIMEOUT.value)
    first = 0
    for clients in [int(c) for c in _CLIENTS.value]:
      before = server.metrics()
      results, seconds = closed_loop(server, clients, _REQUESTS.value, _SECONDS.value, first)
      first += len(results)
      rows.append(summarize(str(clients), results, seconds, before, server.metrics()))
    baseline = rows[0]["images_per_s"]
    for row in rows:
      row["speedup"] = row["images_per_s"] / baseline if baseline else float("nan")
    if _OVERLOAD.value > 0 and rows[-1]["images_per_s"] > 0:
      rate = _OVERLOAD.value * rows[-1]["images_per_s"]
      before = server.metrics()
      monitor = Monitor(server)
      results, seconds = open_loop(server, rate, _OVERLOAD_SECONDS.value, first)
      monitor.stop()
      row = summarize(f"open {rate:.2f}/s", results, seconds, before, server.metrics())
      rss = [r for r in monitor.rss if r] or [0]
      third = max(1, len(rss) // 3)
      row.update({"queue_max": max(monitor.queue, default=0),
                  "rss_first_third_mib": float(np.mean(rss[:third])) / 2**20,
                  "rss_last_third_mib": float(np.mean(rss[-third:])) / 2**20})
      rows.append(row)
      extra["overload_rate_per_s"] = rate
  finally:
    extra["exit_code"] = server.stop()
  harness.report("serve_load", rows, extra=extra)
  answered = all(r["lost"] == 0 and r["5xx"] == 0 for r in rows)
  print(f"every request answered (200 or 429, no 5xx, none lost): {answered}; server exit code "
        f"{extra['exit_code']}")
  if not answered or extra["exit_code"] != 0:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
