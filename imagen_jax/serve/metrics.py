"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own.

A registry per server, not prometheus_client's global one, so that several servers in one
process (the tests) each count their own.
"""

from __future__ import annotations

import collections
import threading
import time

import prometheus_client as prom

# Sampling takes from a fraction of a second (a small model on a GPU) to minutes (a CPU).
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
RATE_WINDOW_S = 60.0


class Metrics:
  """Every metric the server exports; `text()` is the /metrics page."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.queue_depth = prom.Gauge("imagen_serve_queue_images",
                                  "Images accepted and waiting for a batch.", registry=r)
    self.ready = prom.Gauge("imagen_serve_ready",
                            "1 once every batch size is compiled and the server accepts jobs.",
                            registry=r)
    self.batches = prom.Counter("imagen_serve_batches_total", "Batches sampled, by batch size.",
                                ["batch_size"], registry=r)
    self.batch_fill = prom.Histogram(
        "imagen_serve_batch_fill_ratio", "Requested images over the batch size, per batch.",
        buckets=FILL_BUCKETS, registry=r)
    self.padded_rows = prom.Counter("imagen_serve_padded_rows_total",
                                    "Padding rows sampled to fill compiled batch sizes.",
                                    registry=r)
    self.images = prom.Counter("imagen_serve_images_total", "Images sampled for requests.",
                               registry=r)
    self.batch_seconds = prom.Histogram("imagen_serve_batch_seconds",
                                        "Wall time of a batch, every stage.",
                                        buckets=SECONDS_BUCKETS, registry=r)
    self.queue_wait = prom.Histogram("imagen_serve_queue_wait_seconds",
                                     "From a job's arrival to its first batch.",
                                     buckets=SECONDS_BUCKETS, registry=r)
    self.job_seconds = prom.Histogram("imagen_serve_job_seconds",
                                      "From a job's arrival to its last image, by kind.",
                                      ["kind"], buckets=SECONDS_BUCKETS, registry=r)
    self.request_seconds = prom.Histogram(
        "imagen_serve_request_seconds", "HTTP request latency, by endpoint and status code.",
        ["endpoint", "code"], buckets=SECONDS_BUCKETS, registry=r)
    self.compilations = prom.Counter(
        "imagen_serve_compilations_total", "XLA programs the sampling worker compiled: at "
        "start, or for a request whose static settings no compiled program had.", ["when"],
        registry=r)
    self.compile_seconds = prom.Counter("imagen_serve_compile_seconds_total",
                                        "Seconds the sampling worker spent compiling.",
                                        ["when"], registry=r)
    self.dropped_images = prom.Counter(
        "imagen_serve_dropped_images_total", "Queued images dropped before they ran, by reason.",
        ["reason"], registry=r)
    self.prompt_cache = prom.Counter("imagen_serve_prompt_cache_total",
                                     "Prompt embedding lookups, by hit or miss.", ["result"],
                                     registry=r)
    self.rejected = prom.Counter("imagen_serve_rejected_total",
                                 "Requests refused, by reason (queue_full, shutting_down).",
                                 ["reason"], registry=r)
    images_per_second = prom.Gauge(
        "imagen_serve_images_per_second", "Images sampled per second over the last minute.",
        registry=r)
    images_per_second.set_function(self._images_per_second)
    self._lock = threading.Lock()
    self._recent: collections.deque[tuple[float, int]] = collections.deque()
    self._started = time.time()

  def record_batch(self, batch_size: int, images: int, seconds: float) -> None:
    """A finished batch of `images` requested images in a batch of `batch_size`."""
    self.batches.labels(str(batch_size)).inc()
    self.batch_fill.observe(images / batch_size)
    self.padded_rows.inc(batch_size - images)
    self.images.inc(images)
    self.batch_seconds.observe(seconds)
    with self._lock:
      self._recent.append((time.time(), images))

  def _images_per_second(self) -> float:
    now = time.time()
    with self._lock:
      while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
        self._recent.popleft()
      total = sum(n for _, n in self._recent)
    return total / max(1e-9, min(RATE_WINDOW_S, now - self._started))

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
