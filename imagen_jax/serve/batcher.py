"""The sampling worker: images of many requests packed into a few compiled batch sizes.

    batcher = Batcher(cascade, batch_sizes=(1, 4, 8), max_queue=64)
    batcher.start()                              # compiles every batch size, then serves
    job = batcher.submit(Job(prompt="a red circle", n=2, seed=0, settings=...))
    batcher.cancel(job, "cancelled")             # its images still queued are dropped

A job (one request) is split into its images (rows). Rows whose settings compile to the same
program (a `Program`: each stage's sampler, steps and other static settings, and the edit) are
packed together, oldest first, into a compiled batch size; the rest of the batch is padding
whose output is thrown away. Which size (`packing`): "smallest", the smallest that holds them;
"measured" (the default), the size that serves the queued rows fastest by its recent batch
times (`size_for_rows`). On an accelerator a batch of 16 costs little more than one of 4, so
that is the smallest that holds them; on a CPU, where a batch costs about its rows' worth, it is
a full smaller batch, and the rows left over go with the next.

A sampling worker (a thread) runs one batch at a time on all the devices. `workers` > 1 run
batches side by side, the queued rows shared among the free ones: that pays on a CPU, where one
batch of these networks keeps only part of the cores busy. Each worker has its own compiled
programs (so each batch's progress reaches its own jobs); the parameters are shared.

Each row's guidance weight, thresholding, negative prompt and PRNG key are arrays of the batch
(`stage_sampler.RowSettings`), so rows with different values share one program and a row's
pixels are those it gets alone: image i of a job is sampled from (seed, i), as image i of
`imagen-jax sample --seed=seed` for that prompt.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import secrets
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import numpy as np

from imagen_jax.core import images as images_lib
from imagen_jax.diffusion import stage_sampler
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import edit_inputs
from imagen_jax.serve import metrics as metrics_lib

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# Padding rows sample from keys no request can name (requests use indices below n).
_PAD_INDEX = 2**31
# What JAX reports for each program it compiles (or loads from its compilation cache).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
PACKINGS = ("measured", "smallest")


class QueueFull(Exception):
  """The queue cannot take the job's images now; `retry_after` is a guess in seconds."""

  def __init__(self, message: str, retry_after: float):
    super().__init__(message)
    self.retry_after = retry_after


class Unavailable(Exception):
  """The server is shutting down (or its worker died) and takes no new jobs."""


class _Abandoned(Exception):
  """Every job of the running batch was cancelled or failed: its later stages are skipped."""


@dataclasses.dataclass(frozen=True)
class Program:
  """What the rows of one batch share: it picks the compiled program (with the batch size).

  `settings` are each stage's, with the per-row fields (guidance, threshold, percentile) at the
  server's defaults; `edit` is the edit with its host-side `fit` cleared.
  """
  settings: tuple[stage_sampler.StageSettings, ...]
  edit: edit_inputs.Edit | None = None

  @property
  def upscale(self) -> bool:
    return self.edit is not None and self.edit.mode == "upscale"


@dataclasses.dataclass(eq=False)
class Job:
  """One request: `n` images of one prompt, with one seed and one set of settings per stage.

  `settings` hold this job's own values (guidance, sampler, steps, ...) for the stages it runs:
  every stage of the cascade, or its SR stages for an upscale. An edit job carries its input
  `image` uint8 [S, S, 3] (and `mask` bool [S, S], True: regenerate) at the cascade's input size.
  `info` is what the API layer keeps with it (response format, size, kind).
  """
  prompt: str
  n: int
  seed: int
  settings: Sequence[stage_sampler.StageSettings]
  negative_prompt: str = ""
  edit: edit_inputs.Edit | None = None
  image: np.ndarray | None = None
  mask: np.ndarray | None = None
  timeout_s: float = 600.0
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  id: str = dataclasses.field(default_factory=lambda: "job_" + secrets.token_hex(12))
  created: float = dataclasses.field(default_factory=time.time)
  status: str = QUEUED
  error: dict[str, Any] | None = None     # {"status": HTTP code, "message": ..., "code": ...}
  started: float | None = None            # when its first batch began
  finished: float | None = None
  program: Program | None = None

  def __post_init__(self):
    self.pngs: list[bytes | None] = [None] * self.n  # each image of the last stage
    self.events: list[dict[str, Any]] = []
    self.lock = threading.Lock()
    self._watchers: list[Callable[[], None]] = []
    self.deadline = self.created + self.timeout_s
    self._emit("queued", {"id": self.id, "n": self.n})

  @property
  def done(self) -> bool:
    return self.status in TERMINAL

  @property
  def images_done(self) -> int:
    return sum(p is not None for p in self.pngs)

  def watch(self, callback: Callable[[], None]) -> None:
    """Calls `callback()` (from any thread) after every change: an event, the end."""
    with self.lock:
      self._watchers.append(callback)

  def unwatch(self, callback: Callable[[], None]) -> None:
    with self.lock:
      if callback in self._watchers:
        self._watchers.remove(callback)

  def events_since(self, start: int) -> list[dict[str, Any]]:
    with self.lock:
      return list(self.events[start:])

  def _emit(self, name: str, data: dict[str, Any]) -> None:
    """Appends an event; the caller holds `lock` (or owns the job alone)."""
    self.events.append({"event": name, "data": data})
    for callback in list(self._watchers):
      callback()

  def emit(self, name: str, data: dict[str, Any]) -> None:
    with self.lock:
      if not self.done:
        self._emit(name, data)

  def finish(self, status: str, error: dict[str, Any] | None = None) -> bool:
    """Moves the job to a terminal status once; False if it already was in one."""
    with self.lock:
      if self.done:
        return False
      self.status, self.error, self.finished = status, error, time.time()
      self._emit({SUCCEEDED: "done", FAILED: "error", CANCELLED: "cancelled"}[status],
                 {"id": self.id, "status": status, **({"error": error} if error else {})})
      return True


class PromptCache:
  """Prompt -> its text embeddings (an LRU): a prompt is encoded once, alone (so its embedding
  never depends on the prompts encoded beside it), and kept with only its real tokens."""

  def __init__(self, encoder: Any, capacity: int, metrics: metrics_lib.Metrics):
    self.encoder, self.capacity, self.metrics = encoder, capacity, metrics
    self._entries: collections.OrderedDict[str, tuple[np.ndarray, int]] = collections.OrderedDict()
    self._lock = threading.Lock()  # workers look prompts up side by side

  def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """(emb float32 [L, D], mask bool [L]) of one prompt."""
    with self._lock:
      stored, tokens = self._entry(prompt)
    if tokens < 0:
      return stored, np.abs(stored).sum(-1) > 0
    length = self.encoder.max_length
    emb = np.zeros((length, stored.shape[-1]), np.float32)
    emb[:tokens] = stored  # the encoder's embeddings are zero at masked positions
    return emb, np.arange(length) < tokens

  def _entry(self, prompt: str) -> tuple[np.ndarray, int]:
    entry = self._entries.get(prompt)
    self.metrics.prompt_cache.labels("hit" if entry else "miss").inc()
    if entry is None:
      emb, mask = self.encoder.encode([prompt])
      tokens = int(mask[0].sum())
      prefix = bool(mask[0, :tokens].all())  # T5 masks are a prefix; anything else is kept whole
      entry = (emb[0, :tokens].copy(), tokens) if prefix else (emb[0], -1)
      if self.capacity > 0:
        self._entries[prompt] = entry
        while len(self._entries) > self.capacity:
          self._entries.popitem(last=False)
    else:
      self._entries.move_to_end(prompt)
    return entry


def size_for_rows(rows: int, batch_sizes: Sequence[int],
                  seconds: Callable[[int], float | None]) -> int:
  """The batch size for `rows` queued rows (of one program) that serves rows fastest.

  `batch_sizes` ascending; `seconds(size)` is a batch's recent wall time at that size, or None
  if not timed yet. The candidates: the smallest size that holds the rows (or the largest size,
  full), and every smaller size, full. The smallest that holds them is taken while it has no
  time; otherwise the candidate with the most rows per second among those timed (the larger
  on a tie).
  """
  holding = next((b for b in batch_sizes if b >= rows), batch_sizes[-1])
  best_time = seconds(holding)
  if best_time is None:
    return holding
  best, best_rate = holding, min(rows, holding) / best_time
  for size in sorted((b for b in batch_sizes if b < holding), reverse=True):
    t = seconds(size)
    if t is not None and size / t > best_rate:  # ties keep the larger batch: fewer of them
      best, best_rate = size, size / t
  return best


@dataclasses.dataclass(eq=False)
class _Worker:
  """A sampling thread and its own views of the cascade (shared parameters, own programs)."""
  cascade: cascade_lib.Cascade
  upscaler: cascade_lib.Cascade | None
  thread: threading.Thread | None = None
  running: list[Job] = dataclasses.field(default_factory=list)
  waiting: bool = False  # in `_next_batch`, free to take a batch


@jax.jit
def row_keys(seeds: jax.Array, indices: jax.Array) -> jax.Array:
  """PRNG keys [B, 2]: row b's is image indices[b] of a run with seeds[b] (uint32 [B] each), as
  `stage_sampler.image_keys` makes it, in one compiled call per batch size."""
  return jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(seeds, indices)


class Batcher:
  """The queue of rows and the thread that samples them (see the module docstring).

  `default_settings` are each stage's settings when a request gives none (they also pick the
  program compiled at start); batch sizes are rounded up to multiples of the device count;
  `packing` (PACKINGS) picks a batch's size and `workers` is the number of sampling threads,
  as the module docstring says.
  """

  def __init__(self, cascade: cascade_lib.Cascade, *, batch_sizes: Sequence[int] = (1, 4, 8),
               max_queue: int = 64,
               default_settings: Sequence[stage_sampler.StageSettings] | None = None,
               batch_wait_s: float = 0.01, prompt_cache: int = 256, job_ttl_s: float = 600.0,
               max_jobs: int = 1000, max_result_bytes: int = 1 << 30,
               metrics: metrics_lib.Metrics | None = None, packing: str = "measured",
               workers: int = 1):
    if not batch_sizes or min(batch_sizes) < 1:
      raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    if packing not in PACKINGS:
      raise ValueError(f"unknown packing {packing!r}: use one of {list(PACKINGS)}")
    self.packing = packing
    self.cascade = cascade
    # Upscaling runs the SR stages alone: a cascade of them, sharing their parameters.
    self.upscaler = cascade if cascade.upscales else (
        cascade_lib.Cascade(cascade.stages[1:], cascade.text_encoder, cascade.mesh)
        if len(cascade.stages) > 1 else None)
    multiple = cascade.mesh.size
    self.batch_sizes = sorted({-(-int(b) // multiple) * multiple for b in batch_sizes})
    self.max_queue = max_queue
    self.defaults = list(default_settings or cascade.default_settings())
    self.batch_wait_s = batch_wait_s
    self.job_ttl_s, self.max_jobs, self.max_result_bytes = job_ttl_s, max_jobs, max_result_bytes
    self.metrics = metrics or metrics_lib.Metrics()
    self.embed = PromptCache(cascade.text_encoder, prompt_cache, self.metrics)
    self.ready = False
    self.accepting = True
    self.worker_error: str | None = None
    self._cond = threading.Condition()
    self._pending: list[tuple[Job, int]] = []   # (job, image index), oldest first
    self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
    self._batch_seconds = collections.deque(maxlen=20)  # recent (seconds, batch size)
    # Recent wall times of complete batches per (program, size), for "measured" packing; a
    # batch that compiled something is not counted.
    self._timings: dict[tuple[Program, int], collections.deque] = {}
    self._compiles = 0
    self._stopping = False
    self._paused = False
    self._listening = False
    self._warmed = 0
    # Workers after the first sample through views with their own compiled programs.
    view = lambda c: None if c is None else cascade_lib.Cascade(c.stages, c.text_encoder, c.mesh)
    self._workers = [_Worker(self.cascade, self.upscaler)] + [
        _Worker(view(self.cascade), view(self.upscaler)) for _ in range(workers - 1)]
    for i, worker in enumerate(self._workers):
      worker.thread = threading.Thread(target=self._loop, args=(worker,), daemon=True,
                                       name=f"imagen-serve-sampler-{i}")

  @property
  def workers(self) -> int:
    return len(self._workers)

  # --- What the API layer calls ---------------------------------------------------------------

  def target(self, edit: edit_inputs.Edit | None) -> cascade_lib.Cascade | None:
    """The cascade that runs a job with `edit`: the SR stages alone to upscale, else all."""
    if edit is not None and edit.mode == "upscale":
      return self.upscaler
    return None if self.cascade.upscales else self.cascade

  def defaults_for(self, edit: edit_inputs.Edit | None) -> list[stage_sampler.StageSettings]:
    """The default settings of the stages that a job with `edit` runs."""
    if edit is not None and edit.mode == "upscale" and not self.cascade.upscales:
      return self.defaults[1:]
    return list(self.defaults)

  def program(self, settings: Sequence[stage_sampler.StageSettings],
              edit: edit_inputs.Edit | None) -> Program:
    """The program of a job: its static settings, the per-row ones at the defaults."""
    shared = tuple(dataclasses.replace(s, guidance=d.guidance, threshold=d.threshold,
                                       percentile=d.percentile)
                   for s, d in zip(settings, self.defaults_for(edit)))
    return Program(shared, None if edit is None else dataclasses.replace(edit, fit="none"))

  def start(self) -> None:
    jax.monitoring.register_event_duration_secs_listener(self._on_compile)
    self._listening = True
    for worker in self._workers:
      worker.thread.start()

  def _on_compile(self, event: str, seconds: float, **unused) -> None:
    """Counts the programs the worker compiles: every batch size at start; later, a request
    whose static settings (sampler, steps, edit) no compiled program had."""
    if event == _COMPILE_EVENT and any(threading.current_thread() is worker.thread
                                       for worker in self._workers):
      self._compiles += 1
      when = "request" if self.ready else "start"
      self.metrics.compilations.labels(when).inc()
      self.metrics.compile_seconds.labels(when).inc(seconds)

  def pause(self) -> None:
    """Starts no new batch until `resume` (the running one finishes); requests still queue."""
    with self._cond:
      self._paused = True

  def resume(self) -> None:
    with self._cond:
      self._paused = False
      self._cond.notify_all()

  def submit(self, job: Job) -> Job:
    """Queues every image of `job`; QueueFull or Unavailable if it cannot be taken now."""
    job.program = self.program(job.settings, job.edit)
    with self._cond:
      if not self.accepting or self.worker_error:
        raise Unavailable(self.worker_error or "the server is shutting down")
      queued = len(self._pending)
      if queued + job.n > self.max_queue:
        raise QueueFull(f"the queue holds {queued} of at most {self.max_queue} images "
                        f"(--max_queue); this request adds {job.n}", self.retry_after())
      self._pending.extend((job, i) for i in range(job.n))
      self._remember(job)
      self.metrics.queue_depth.set(len(self._pending))
      self._cond.notify_all()
    return job

  def get(self, job_id: str) -> Job | None:
    with self._cond:
      return self._jobs.get(job_id)

  def recent(self) -> list[Job]:
    """The jobs still held, newest first."""
    with self._cond:
      return list(reversed(self._jobs.values()))

  def cancel(self, job: Job, reason: str = "cancelled") -> bool:
    """Ends `job` (status cancelled) and drops its images still queued; False if it had ended.
    `reason` (cancelled, disconnected) labels the dropped images in the metrics."""
    with self._cond:
      if not job.finish(CANCELLED):
        return False
      self._drop(job, reason)
      return True

  def fail(self, job: Job, status: int, message: str, code: str) -> bool:
    """Ends `job` with an error (answered with HTTP `status`) and drops its queued images."""
    with self._cond:
      if not job.finish(FAILED, {"status": status, "message": message, "code": code}):
        return False
      self._drop(job, code)
      return True

  def expire(self) -> None:
    """Fails every job past its deadline (504), queued or running."""
    now = time.time()
    with self._cond:
      late = {job for job, _ in self._pending if now > job.deadline}
      late |= {job for job in self._running_jobs() if now > job.deadline}
      for job in late:
        self.fail(job, 504, f"the job did not finish within its {job.timeout_s:g} s deadline",
                  "deadline_exceeded")
      self._forget_old(now)

  def retry_after(self) -> float:
    """Seconds until the queue has likely drained by one batch: the recent batch time."""
    if not self._batch_seconds:
      return 1.0
    return max(1.0, float(np.median([s for s, _ in self._batch_seconds])))

  def queue_depth(self) -> int:
    with self._cond:
      return len(self._pending)

  def stop_accepting(self) -> None:
    """New jobs get Unavailable from now on; accepted ones still run."""
    with self._cond:
      self.accepting = False
      self.metrics.ready.set(0)

  def wait_idle(self, timeout: float | None = None) -> bool:
    """Waits until no image is queued or running; False if `timeout` passed first."""
    deadline = None if timeout is None else time.time() + timeout
    with self._cond:
      while self._pending or self._running_jobs():
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
          return False
        self._cond.wait(0.1 if left is None else min(left, 0.1))
    return True

  def shutdown(self, drain_timeout: float | None = None) -> None:
    """Stops accepting, runs what was accepted (jobs still queued after `drain_timeout` seconds
    fail with 503), then stops the worker."""
    self.stop_accepting()
    self.resume()
    if not self.wait_idle(drain_timeout):
      with self._cond:
        for job in {job for job, _ in self._pending}:
          self.fail(job, 503, "the server shut down before this job ran", "shutting_down")
      self.wait_idle()
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    for worker in self._workers:
      if worker.thread.is_alive():
        worker.thread.join()
    if self._listening:
      jax.monitoring.unregister_event_duration_listener(self._on_compile)
      self._listening = False

  # --- The worker -------------------------------------------------------------------------------

  def _remember(self, job: Job) -> None:
    self._jobs[job.id] = job
    self._forget_old(time.time())

  def _forget_old(self, now: float) -> None:
    """Drops finished jobs past their time to live, then the oldest finished ones while more
    than max_jobs jobs or max_result_bytes of images are held."""
    finished = [j for j in self._jobs.values() if j.done]
    extra = len(self._jobs) - self.max_jobs
    held = sum(len(png) for j in finished for png in j.pngs if png)
    for job in finished:
      if now - job.finished > self.job_ttl_s or extra > 0 or held > self.max_result_bytes:
        del self._jobs[job.id]
        extra -= 1
        held -= sum(len(png) for png in job.pngs if png)

  def _drop(self, job: Job, reason: str) -> None:
    """Removes the queued images of `job` (the caller holds the lock)."""
    before = len(self._pending)
    self._pending = [(j, i) for j, i in self._pending if j is not job]
    if before > len(self._pending):
      self.metrics.dropped_images.labels(reason).inc(before - len(self._pending))
    self.metrics.queue_depth.set(len(self._pending))
    self._cond.notify_all()

  def _running_jobs(self) -> list[Job]:
    return [job for worker in self._workers for job in worker.running]

  def _loop(self, worker: _Worker) -> None:
    try:
      self._warm_up(worker)
      while (batch := self._next_batch(worker)) is not None:
        self._run(worker, *batch)
    except Exception as e:  # pylint: disable=broad-except  (answer every job, then stop)
      logging.exception("A sampling worker stopped")
      with self._cond:
        self.worker_error = f"the sampling worker stopped: {type(e).__name__}: {e}"
        for job in {job for job, _ in self._pending} | set(self._running_jobs()):
          self.fail(job, 500, self.worker_error, "worker_failed")
        for each in self._workers:
          each.running = []
        self._cond.notify_all()

  def _warm_up(self, worker: _Worker) -> None:
    """Compiles the default program at every batch size (a batch of padding each); ready once
    every worker has."""
    edit = edit_inputs.Edit("upscale") if self.cascade.upscales else None
    program = self.program(self.defaults_for(edit), edit)
    self.embed("")
    for size in self.batch_sizes:
      start = time.time()
      self._run(worker, program, [], size)
      logging.info("%s compiled batch size %d in %.1f s", worker.thread.name, size,
                   time.time() - start)
    with self._cond:
      self._warmed += 1
      if self._warmed == len(self._workers):
        self.ready = True
        self.metrics.ready.set(1 if self.accepting else 0)
        logging.info("Ready: batch sizes %s compiled (%d workers)", self.batch_sizes,
                     self.workers)

  def _next_batch(self, worker: _Worker) -> tuple[Program, list[tuple[Job, int]], int] | None:
    """The oldest row's program, its rows (oldest first, at most the largest batch), and the
    batch size; None once stopping with nothing queued."""
    largest = self.batch_sizes[-1]
    with self._cond:
      worker.waiting = True
      while True:
        self.expire()
        if self._pending and not self._paused:
          program = self._pending[0][0].program
          same = [job for job, _ in self._pending if job.program == program]
          # A burst of requests (clients answered by one batch send their next together) is
          # batched whole: wait until none came for batch_wait_s, at most 10 times that.
          oldest, newest = same[0].created, max(job.created for job in same)
          wait = min(newest + self.batch_wait_s, oldest + 10 * self.batch_wait_s) - time.time()
          if len(same) >= largest or wait <= 0:
            break
          self._cond.wait(wait)
          continue
        if self._stopping:
          return None
        self._cond.wait(0.5)
      rows = [row for row in self._pending if row[0].program == program]
      # Rows are shared with the other free workers, whose batches run beside this one.
      free = sum(w.waiting for w in self._workers)
      size = self._size_for(program, -(-len(rows) // free))
      rows = rows[:size]
      worker.waiting = False
      taken = set(map(id, rows))
      self._pending = [r for r in self._pending if id(r) not in taken]
      self.metrics.queue_depth.set(len(self._pending))
      jobs = list(dict.fromkeys(job for job, _ in rows))
      worker.running = jobs
      self._cond.notify_all()  # the other free workers take what is left
      now = time.time()
      for job in jobs:
        if job.status == QUEUED:
          with job.lock:
            job.status, job.started = RUNNING, now
            job._emit("started", {"id": job.id})  # pylint: disable=protected-access
          self.metrics.queue_wait.observe(now - job.created)
    return program, rows, size

  def _size_for(self, program: Program, rows: int) -> int:
    def seconds(size: int) -> float | None:  # "smallest": never timed
      times = self._timings.get((program, size)) if self.packing == "measured" else None
      return float(np.median(times)) if times else None
    return size_for_rows(rows, self.batch_sizes, seconds)

  def _run(self, worker: _Worker, program: Program, rows: list[tuple[Job, int]],
           size: int) -> None:
    """Samples `rows` in a batch of `size` (padded) on `worker`, and hands each job its
    images."""
    target = worker.upscaler if program.upscale else worker.cascade
    start, compiles = time.time(), self._compiles
    pads = size - len(rows)
    prompt = [self.embed(job.prompt) for job, _ in rows] + [self.embed("")] * pads
    emb = np.stack([e for e, _ in prompt])
    mask = np.stack([m for _, m in prompt])
    null_emb, null_mask = np.zeros_like(emb), mask.copy()  # zeroed text: plain guidance
    for r, (job, _) in enumerate(rows):
      if job.negative_prompt:
        null_emb[r], null_mask[r] = self.embed(job.negative_prompt)
    keys = np.asarray(row_keys(
        np.asarray([job.seed for job, _ in rows] + [0] * pads, np.uint32),
        np.asarray([i for _, i in rows] + [_PAD_INDEX + p for p in range(pads)], np.uint32)))
    defaults = self.defaults_for(program.edit)
    rows_settings = [stage_sampler.RowSettings.stack(
        [job.settings[k] for job, _ in rows] + [defaults[k]] * pads, null_emb, null_mask)
        for k in range(len(target.stages))]
    inputs = {}
    if program.edit is not None:
      side = target.input_size(program.edit)
      inputs["images"] = np.stack([job.image for job, _ in rows]
                                  + [np.zeros((side, side, 3), np.uint8)] * pads)
      if program.edit.uses_mask:
        inputs["masks"] = np.stack([job.mask for job, _ in rows]
                                   + [np.zeros((side, side), bool)] * pads)
    jobs = list(dict.fromkeys(job for job, _ in rows))
    stages = len(target.stages)

    def progress(k: int, step: int, steps: int) -> None:
      for job in jobs:
        job.emit("progress", {"stage": k + 1, "stages": stages, "step": step, "steps": steps,
                              "images_done": job.images_done, "n": job.n})

    def on_stage(k: int, images: np.ndarray) -> None:
      if k == 0 and stages > 1:  # each image's first stage, while the next ones run
        for r, (job, i) in enumerate(rows):
          job.emit("preview", {"index": i, "stage": 1, "size": int(images.shape[1]),
                               "b64_json": base64.b64encode(images_lib.png_bytes(images[r])
                                                            ).decode("ascii")})
      if jobs and all(job.done for job in jobs) and k < stages - 1:
        raise _Abandoned()

    try:
      outputs = target.sample_encoded(emb, mask, keys, settings=list(program.settings),
                                      rows=rows_settings, progress=progress, edit=program.edit,
                                      on_stage=on_stage, **inputs)
    except _Abandoned:
      outputs = None
    except Exception as e:  # pylint: disable=broad-except  (a bad batch fails its jobs only)
      if not rows:
        raise
      logging.exception("A batch failed")
      for job in jobs:
        self.fail(job, 500, f"sampling failed: {type(e).__name__}: {e}", "sampling_failed")
      outputs = None
    seconds = time.time() - start
    finished = []
    if outputs is not None:
      for r, (job, i) in enumerate(rows):
        png = images_lib.png_bytes(outputs[-1][r])
        with job.lock:
          if job.done:
            continue
          job.pngs[i] = png
          job._emit("image", {"index": i, "images_done": job.images_done,  # pylint: disable=protected-access
                              "n": job.n})
          complete = job.images_done == job.n
        if complete and job.finish(SUCCEEDED):
          finished.append(job)
    with self._cond:
      worker.running = []
      if rows and outputs is not None and self._compiles == compiles:
        self._timings.setdefault((program, size), collections.deque(maxlen=5)).append(seconds)
      if rows:
        self._batch_seconds.append((seconds, size))
        self.metrics.record_batch(size, len(rows), seconds)
      for job in finished:
        self.metrics.job_seconds.labels(job.info.get("kind", "generation")).observe(
            job.finished - job.created)
      self._cond.notify_all()
