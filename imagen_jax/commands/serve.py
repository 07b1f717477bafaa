"""`imagen-jax serve`: a sampling server for a cascade, with an HTTP API and a web page.

    imagen-jax serve --stages=demo_run/base,demo_run/sr --port=8000
    curl -s http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' \
        -d '{"prompt": "a red circle at the top left corner", "n": 2, "seed": 0}'

Open http://127.0.0.1:8000/ for the page. The API is OpenAI's images API (generations, edits)
plus jobs that can be followed (server-sent events), fetched and cancelled; /healthz, /readyz
(every batch size compiled) and /metrics (Prometheus). One thread samples: the requests of
many clients are packed into the --batch_sizes compiled at start. --guidance, --steps,
--sampler, ... set the defaults of requests that give none. Listens on 127.0.0.1 unless
--host says otherwise; --api_key (or $IMAGEN_JAX_API_KEY) requires 'Authorization: Bearer KEY'.
SIGTERM stops taking requests (503), answers every accepted one, and exits 0.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from imagen_jax.commands import shared_flags
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib
from imagen_jax.serve import api
from imagen_jax.serve import batcher as batcher_lib
from imagen_jax.serve import server

shared_flags.use("stages", "ckpt_steps", "guidance", "steps", "sampler", "spacing",
                 "guidance_interval", "aug_level", "threshold", "lora_scale")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                            "interface; put an API key in front of it).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4", "8"], "Batch sizes compiled at "
                                 "start (rounded up to multiples of the device count).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Images accepted and waiting at most; more "
                                  "get 429 with Retry-After.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1/ "
                               "and /metrics (default: $IMAGEN_JAX_API_KEY; none: open).")
_DEVICES = flags.DEFINE_integer("devices", None, "Sample on the first N devices (default all).")
_MAX_N = flags.DEFINE_integer("max_n", api.Limits.max_n, "Images per request at most.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", api.Limits.max_steps,
                                  "Sampling steps per stage a request may ask for.")
_MAX_PROMPT_CHARS = flags.DEFINE_integer("max_prompt_chars", api.Limits.max_prompt_chars,
                                         "Characters of a prompt (or negative prompt) at most.")
_MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", api.Limits.max_body_bytes,
                                       "Bytes of a request body at most (413 beyond).")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", api.Limits.max_pixels,
                                   "Pixels (width x height) of an uploaded image at most, "
                                   "checked before it is decoded (413 beyond).")
_TIMEOUT = flags.DEFINE_float("timeout", api.Limits.timeout_s, "Seconds a job may take from "
                              "its arrival (504 beyond); a request may ask for less.")
_BATCH_WAIT_MS = flags.DEFINE_float(
    "batch_wait_ms", 10.0, "When the worker is idle, a batch short of the largest size starts "
    "once no request has come for this long (at most 10 times this after the first).")
_PACKING = flags.DEFINE_enum(
    "packing", "measured", list(batcher_lib.PACKINGS), "How many queued images a batch takes: "
    "measured: the compiled size that serves them fastest by its recent batch times (a full "
    "smaller batch where a batch costs its rows' worth, as on a CPU); smallest: the smallest "
    "compiled size that holds them, padded.")
_WORKERS = flags.DEFINE_integer(
    "workers", None, "Batches sampled side by side, each by its own thread with its own compiled "
    "programs (default: 2 on a CPU of 2 or more cores, where one batch leaves cores idle; 1 on "
    "GPUs and TPUs).")
_PROMPT_CACHE = flags.DEFINE_integer("prompt_cache", 256, "Prompt embeddings kept (LRU).")
_JOB_TTL = flags.DEFINE_float("job_ttl", 600.0, "Seconds a finished job (and its images) stays "
                              "readable at /v1/jobs/{id} and /v1/files/.")
_DRAIN_TIMEOUT = flags.DEFINE_float("drain_timeout", None, "On SIGTERM, seconds to run the "
                                    "queued jobs before failing the rest with 503 (default: "
                                    "run them all).")

INPUT_ERRORS = (outdir_lib.SampleError, cascade_lib.ChainError, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
  del argv
  shared_flags.require("stages")
  try:
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  except ValueError as e:
    raise outdir_lib.SampleError(f"--batch_sizes: {e}") from e
  if not batch_sizes or min(batch_sizes) < 1:
    raise outdir_lib.SampleError(f"--batch_sizes must be >= 1, got {_BATCH_SIZES.value}")
  options = shared_flags.sampling_options()
  cascade, settings = server.load(shared_flags.STAGES.value, options.pop("ckpt_steps"),
                                  options.pop("lora_scale"), _DEVICES.value, **options)
  limits = api.Limits(max_n=_MAX_N.value, max_steps=_MAX_STEPS.value,
                      max_prompt_chars=_MAX_PROMPT_CHARS.value,
                      max_body_bytes=_MAX_BODY_BYTES.value, max_pixels=_MAX_PIXELS.value,
                      timeout_s=_TIMEOUT.value)
  server.serve(cascade, settings, host=_HOST.value, port=_PORT.value, batch_sizes=batch_sizes,
               max_queue=_MAX_QUEUE.value, limits=limits,
               api_key=_API_KEY.value or os.environ.get("IMAGEN_JAX_API_KEY") or None,
               batch_wait_s=_BATCH_WAIT_MS.value / 1000, prompt_cache=_PROMPT_CACHE.value,
               job_ttl_s=_JOB_TTL.value, drain_timeout=_DRAIN_TIMEOUT.value,
               packing=_PACKING.value, workers=_WORKERS.value or server.default_workers())
