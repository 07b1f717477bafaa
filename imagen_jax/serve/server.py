"""Running the server: load a cascade, start the sampling worker, serve HTTP until SIGTERM.

    cascade, settings = load(["runs/base", "runs/sr"])
    serve(cascade, settings, host="127.0.0.1", port=8000, batch_sizes=(1, 4, 8))

SIGTERM (or Ctrl-C) drains: new requests get 503 while every accepted job runs to its answer,
then the server exits normally. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any, Sequence

from absl import logging
import jax
import uvicorn

from imagen_jax.core import checkpoints
from imagen_jax.core import fileio
from imagen_jax.core import partitioning
from imagen_jax.diffusion import stage_sampler
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib
from imagen_jax.serve import api
from imagen_jax.serve import batcher as batcher_lib


def load(stages: Sequence[str], ckpt_steps: Sequence[str] | None = None,
         lora_scale: float = 1.0, devices: int | None = None, **overrides: Any
         ) -> tuple[cascade_lib.Cascade, list[stage_sampler.StageSettings]]:
  """The cascade of `stages` (base first, or SR stages alone: an upscaler) on its first
  `devices` devices (default all), and its default settings: each stage's config, with the
  `overrides` of `outdir.load_cascade` (command-line lists: guidance, steps, sampler, ...)."""
  if not stages:
    raise outdir_lib.SampleError("no stages: give the stage workdirs, base first")
  try:
    first, _ = checkpoints.restore_config(fileio.resolve(stages[0]))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"stage workdir {stages[0]!r} has no checkpoint to serve ({e})") from e
  cascade, settings = outdir_lib.load_cascade(
      stages, ckpt_steps, first_stage="sr" if first.stage == "sr" else "base",
      lora_scale=lora_scale, **overrides)
  if devices and devices < cascade.mesh.size:
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:devices])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cascade = cascade_lib.Cascade(
        [dataclasses.replace(s, params=jax.device_put(s.params, replicated))
         for s in cascade.stages], cascade.text_encoder, mesh)
  return cascade, settings


class DrainingServer(uvicorn.Server):
  """uvicorn, whose first SIGTERM / SIGINT drains the batcher before the server stops."""

  def __init__(self, config: uvicorn.Config, batcher: batcher_lib.Batcher,
               drain_timeout: float | None):
    super().__init__(config)
    self.batcher, self.drain_timeout = batcher, drain_timeout
    self._draining = False

  def handle_exit(self, sig: int, frame: Any) -> None:
    if self._draining:
      if sig == signal.SIGINT:  # a second Ctrl-C: stop now
        self.should_exit = self.force_exit = True
      return
    self._draining = True
    logging.info("Signal %d: draining (new requests get 503), then stopping", sig)

    def drain():
      self.batcher.shutdown(self.drain_timeout)
      self.should_exit = True  # uvicorn then waits for the open responses to be sent

    threading.Thread(target=drain, name="imagen-serve-drain", daemon=True).start()

  def drain_and_stop(self) -> None:
    """What a signal does, for a server run outside the main thread (tests)."""
    self.handle_exit(signal.SIGTERM, None)


def default_workers() -> int:
  """Sampling workers by default: 2 on a CPU backend with 2 or more cores (one batch of a
  cascade keeps only part of them busy), 1 on GPUs and TPUs (a device runs one batch at a
  time)."""
  return 2 if jax.default_backend() == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def build(cascade: cascade_lib.Cascade, settings: Sequence[stage_sampler.StageSettings], *,
          host: str = "127.0.0.1", port: int = 8000, batch_sizes: Sequence[int] = (1, 4, 8),
          max_queue: int = 64, limits: api.Limits = api.Limits(), api_key: str | None = None,
          batch_wait_s: float = 0.01, prompt_cache: int = 256, job_ttl_s: float = 600.0,
          drain_timeout: float | None = None, log_level: str = "info",
          access_log: bool = True, packing: str = "measured",
          workers: int = 1) -> DrainingServer:
  """The server of `cascade`, its worker started (compiling); `.run()` serves until SIGTERM."""
  if limits.max_n > max_queue:
    raise outdir_lib.SampleError(f"--max_n ({limits.max_n}) is more than --max_queue "
                                 f"({max_queue}): such a request could never be queued")
  batcher = batcher_lib.Batcher(cascade, batch_sizes=batch_sizes, max_queue=max_queue,
                                default_settings=settings, batch_wait_s=batch_wait_s,
                                prompt_cache=prompt_cache, job_ttl_s=job_ttl_s,
                                packing=packing, workers=workers)
  app = api.create_app(batcher, limits, api_key)
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=None)
  server = DrainingServer(config, batcher, drain_timeout)
  batcher.start()
  return server


def serve(cascade: cascade_lib.Cascade, settings: Sequence[stage_sampler.StageSettings],
          **options: Any) -> None:
  """`build`, then serve until SIGTERM has drained every accepted job."""
  server = build(cascade, settings, **options)
  host, port = server.config.host, server.config.port
  print(f"Serving {len(cascade.stages)} stages on http://{host}:{port}/ (compiling batch sizes "
        f"{server.batcher.batch_sizes}; /readyz says when done)", flush=True)
  server.run()
  server.batcher.shutdown(0)
