"""The HTTP API and web page of `imagen-jax serve` (FastAPI), over a `batcher.Batcher`.

    POST /v1/images/generations   JSON, the OpenAI images API's shape plus our settings
    POST /v1/images/edits         multipart: image (and mask) files, mode inpaint/img2img/upscale
    GET  /v1/jobs, /v1/jobs/{id}  jobs; /v1/jobs/{id}/events: server-sent events (progress,
                                  a preview of each image's first stage, the result)
    DELETE /v1/jobs/{id}          cancel (also POST /v1/jobs/{id}/cancel)
    GET  /v1/files/{id}.png       an image of a finished job (response_format "url")
    GET  /v1/info                 the cascade, its defaults and the limits (the page reads it)
    GET  /healthz, /readyz, /metrics, /   liveness, readiness (every batch size compiled),
                                  Prometheus metrics, the web page

A request waits for its images (`"wait": false`: 202 and the job at once). Errors are the
OpenAI shape, {"error": {"message", "type", "param", "code"}}: 400 a bad value or a limit
(named), 401 a missing or wrong API key, 413 a body or an upload over its limit, 422 an unknown
field or a wrong type, 429 a full queue (Retry-After), 503 shutting down, 504 past the deadline.
No request names a file: uploads are decoded in memory, results are served from memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import importlib.resources
import io
import json
import math
import re
import secrets
import time
from typing import Any, Literal

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
import numpy as np
from PIL import Image
import pydantic
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagen_jax.data import preprocess
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import thresholding
from imagen_jax.sample import edit_inputs
from imagen_jax.serve import batcher as batcher_lib
from imagen_jax.serve import metrics as metrics_lib

# An edit's strength when the request gives none (as `imagen-jax edit`).
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "upscale": 1.0}
MAX_SEED = 2**32 - 1
PAGE_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
_FILE_NAME = re.compile(r"(job_[0-9a-f]{24})_(\d+)\.png")
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
                429: "rate_limit_error"}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask; each is a flag of `imagen-jax serve` of the same name."""
  max_n: int = 4                         # images per request
  max_steps: int = 250                   # sampling steps per stage
  max_prompt_chars: int = 1000           # characters of a prompt or negative prompt
  max_body_bytes: int = 16 * 1024 * 1024  # a request's body (JSON or multipart)
  max_pixels: int = 4096 * 4096          # an uploaded image's width x height
  timeout_s: float = 600.0               # a job's deadline (a request may ask for less)


class ApiError(Exception):
  """An error answered as {"error": {...}} with HTTP `status`."""

  def __init__(self, status: int, message: str, code: str | None = None,
               param: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.code, self.param = status, message, code, param
    self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
  kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(e: ApiError) -> responses.JSONResponse:
  return responses.JSONResponse(error_body(e.status, e.message, e.code, e.param), e.status,
                                headers=e.headers)


class GenerationRequest(pydantic.BaseModel):
  """POST /v1/images/generations: OpenAI's fields, then ours (per stage: one value for all)."""
  model_config = pydantic.ConfigDict(extra="forbid")

  prompt: str
  n: int = 1
  size: str | None = None                 # the cascade's output, e.g. "64x64" (or "auto")
  response_format: Literal["b64_json", "url"] = "b64_json"
  output_format: str | None = None        # png only
  stream: bool | None = None              # false only: follow /v1/jobs/{id}/events instead
  # Accepted as OpenAI clients send them; a cascade has one model and one quality.
  model: str | None = None
  quality: str | None = None
  style: str | None = None
  user: str | None = None
  background: str | None = None
  moderation: str | None = None
  output_compression: int | None = None
  partial_images: int | None = None
  # Ours.
  seed: int | None = None                 # image i is sampled from (seed, i); default random
  guidance_scale: float | list[float] | None = None
  sampler: str | list[str] | None = None
  steps: int | list[int] | None = None
  threshold: str | list[str] | None = None  # dynamic, static or none
  negative_prompt: str | None = None
  wait: bool = True                       # false: answer 202 with the job at once
  timeout: float | None = None            # seconds; at most the server's


class EditRequest(GenerationRequest):
  """POST /v1/images/edits: the generation fields (as form fields) and the edit's."""
  mode: Literal["inpaint", "img2img", "upscale"] | None = None  # default: inpaint with a mask
  strength: float | None = None
  resample: int = 1
  jump: int = 1
  fit: Literal["none", "pad", "crop"] = "none"
  input_fidelity: str | None = None


PER_STAGE = ("guidance_scale", "sampler", "steps", "threshold")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
  parts, param = [], None
  for error in errors:
    location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
    param = param or location or None
    if error.get("type") == "extra_forbidden":
      parts.append(f"unknown field {location!r}")
    else:
      parts.append(f"{location}: {error.get('msg')}")
  return "; ".join(parts), param


def _per_stage(value: Any, count: int, name: str) -> list[Any]:
  if value is None:
    return [None] * count
  values = list(value) if isinstance(value, list) else [value]
  if len(values) == 1:
    values *= count
  if len(values) != count:
    raise ApiError(400, f"{name} has {len(values)} values for {count} stages: give one for "
                   "all, or one per stage", "invalid_value", name)
  return values


def _decode(data: bytes, what: str, limits: Limits) -> np.ndarray:
  """uint8 [H, W, 3] of an upload; its size is checked from the header before decoding."""
  try:
    return preprocess.decode_image(data, max_pixels=limits.max_pixels, min_side=1)[0]
  except preprocess.BadInput as e:
    if e.kind == "too_large":
      raise ApiError(413, f"the {what} is too large ({e.detail}): the limit max_pixels is "
                     f"{limits.max_pixels} pixels", "limit_exceeded", what) from e
    raise ApiError(400, f"cannot read the {what} as an image ({e.kind}: {e.detail})",
                   "invalid_image", what) from e


def _decode_mask(data: bytes, limits: Limits) -> np.ndarray:
  """bool [H, W], True to regenerate: transparent pixels where the mask has any (OpenAI's
  convention), else white ones (>= 128 in gray, `imagen-jax edit`'s)."""
  rgb = _decode(data, "mask", limits)
  with Image.open(io.BytesIO(data)) as image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
      alpha = np.asarray(image.convert("RGBA"))[..., 3]
      if (alpha < 255).any():
        return alpha == 0
  return rgb.astype(np.float32).mean(axis=-1) >= 128


class _Guard:
  """Pure ASGI middleware (streams pass through untouched): the API key, the body limit, and
  each request's latency in the metrics."""

  def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int,
               metrics: metrics_lib.Metrics):
    self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

  def _authorized(self, scope: dict[str, Any]) -> bool:
    header = dict(scope.get("headers", ())).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                               self.api_key.encode())

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start, path, status = time.perf_counter(), scope["path"], [500]

    async def timed_send(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    async def refuse(e: ApiError):
      await _error_response(e)(scope, receive, timed_send)

    try:
      if self.api_key and (path.startswith("/v1/") or path == "/metrics") and (
          not self._authorized(scope)):
        return await refuse(ApiError(401, "a valid API key is required: send the header "
                                     "'Authorization: Bearer <key>'", "invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"}))
      if scope["method"] in ("POST", "PUT", "PATCH"):
        too_large = ApiError(413, f"the request body exceeds the limit max_body_bytes = "
                             f"{self.max_body_bytes} bytes", "limit_exceeded")
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
          return await refuse(too_large)
        chunks, size = [], 0
        while True:
          message = await receive()
          if message["type"] == "http.disconnect":
            return None
          chunks.append(message.get("body", b""))
          size += len(chunks[-1])
          if size > self.max_body_bytes:
            return await refuse(too_large)
          if not message.get("more_body"):
            break
        receive = _replay(b"".join(chunks), receive)
      await self.app(scope, receive, timed_send)
    finally:
      self.metrics.request_seconds.labels(_endpoint(path), str(status[0])).observe(
          time.perf_counter() - start)


def _replay(body: bytes, receive):
  """`receive` that first hands over the body already read, then the client's messages (a
  disconnect)."""
  delivered = False

  async def replay():
    nonlocal delivered
    if not delivered:
      delivered = True
      return {"type": "http.request", "body": body, "more_body": False}
    return await receive()

  return replay


def _endpoint(path: str) -> str:
  """A path as a metrics label: ids replaced by their names."""
  path = re.sub(r"^/v1/jobs/[^/]+", "/v1/jobs/{id}", path)
  path = re.sub(r"^/v1/files/.+", "/v1/files/{name}", path)
  known = ("/", "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/images/generations",
           "/v1/images/edits", "/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/events",
           "/v1/jobs/{id}/cancel", "/v1/files/{name}", "/static/app.js", "/static/app.css")
  return path if path in known else "other"


async def _wait_change(job: batcher_lib.Job, seen: int, timeout: float,
                       until_done: bool = False) -> bool:
  """Waits until `job` has more than `seen` events (`until_done`: has ended) or has ended;
  False after `timeout`."""
  loop = asyncio.get_running_loop()
  changed = asyncio.Event()

  def wake():  # in the thread that changed the job: wakes the loop only when it matters
    if until_done and not job.done:
      return
    with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
      loop.call_soon_threadsafe(changed.set)

  job.watch(wake)
  try:
    if job.done or (not until_done and job.events_since(seen)):
      return True
    await asyncio.wait_for(changed.wait(), timeout)
    return True
  except asyncio.TimeoutError:
    return False
  finally:
    job.unwatch(wake)


def create_app(batcher: batcher_lib.Batcher, limits: Limits = Limits(),
               api_key: str | None = None) -> fastapi.FastAPI:
  """The FastAPI app serving `batcher` (already started, or started by the caller)."""
  metrics = batcher.metrics

  @contextlib.asynccontextmanager
  async def lifespan(_):
    async def sweep():  # deadlines of jobs nobody waits on (wait=false)
      while True:
        batcher.expire()
        await asyncio.sleep(0.5)
    task = asyncio.create_task(sweep())
    yield
    task.cancel()

  app = fastapi.FastAPI(title="imagen-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                        openapi_url=None)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return _error_response(e)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, e: RequestValidationError):
    message, param = _validation_message(list(e.errors()))
    return responses.JSONResponse(error_body(422, message, "invalid_field", param), 422)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException):
    return responses.JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code,
                                  headers=getattr(e, "headers", None))

  # --- Jobs in and out ------------------------------------------------------------------------

  def image_item(job: batcher_lib.Job, i: int, base_url: str) -> dict[str, Any]:
    if job.info.get("response_format") == "url":
      return {"url": f"{base_url}v1/files/{job.id}_{i}.png"}
    return {"b64_json": base64.b64encode(job.pngs[i]).decode("ascii")}

  def job_json(job: batcher_lib.Job, base_url: str, data: bool = True) -> dict[str, Any]:
    progress = next((e["data"] for e in reversed(job.events_since(0))
                     if e["event"] == "progress"), None)
    out = {"id": job.id, "object": "image.job", "kind": job.info.get("kind"),
           "status": job.status, "created": job.created, "finished": job.finished,
           "prompt": job.prompt, "negative_prompt": job.negative_prompt, "n": job.n,
           "seed": job.seed, "size": job.info.get("size"),
           "response_format": job.info.get("response_format"),
           "settings": [dataclasses.asdict(s) for s in job.settings],
           "edit": None if job.edit is None else dataclasses.asdict(job.edit),
           "images_done": job.images_done, "progress": progress}
    if data and job.status == batcher_lib.SUCCEEDED:
      out["data"] = [image_item(job, i, base_url) for i in range(job.n)]
    if job.error:
      out["error"] = job.error
    return out

  def images_response(job: batcher_lib.Job, base_url: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse, plus the job's id, seed and settings."""
    return {"created": int(job.created), "data": [image_item(job, i, base_url)
                                                  for i in range(job.n)],
            "output_format": "png", "size": job.info.get("size"), "id": job.id,
            "seed": job.seed, "settings": [dataclasses.asdict(s) for s in job.settings]}

  def make_job(request: GenerationRequest, kind: str, edit: edit_inputs.Edit | None = None,
               image: np.ndarray | None = None, mask: np.ndarray | None = None
               ) -> batcher_lib.Job:
    """A job from a request, every value checked (ApiError naming the field or limit)."""
    if request.stream:
      raise ApiError(400, "stream is not supported: send \"wait\": false and follow "
                     "GET /v1/jobs/{id}/events", "unsupported_value", "stream")
    if request.output_format not in (None, "png"):
      raise ApiError(400, f"output_format {request.output_format!r} is not supported: png only",
                     "unsupported_value", "output_format")
    if not 1 <= request.n <= limits.max_n:
      raise ApiError(400, f"n must be between 1 and the limit max_n = {limits.max_n}, got "
                     f"{request.n}", "limit_exceeded", "n")
    for name in ("prompt", "negative_prompt"):
      text = getattr(request, name) or ""
      if len(text) > limits.max_prompt_chars:
        raise ApiError(400, f"{name} has {len(text)} characters, over the limit "
                       f"max_prompt_chars = {limits.max_prompt_chars}", "limit_exceeded", name)
    target = batcher.target(edit)
    if target is None:
      raise ApiError(400, "this server's cascade starts at an SR stage: it upscales images "
                     "(POST /v1/images/edits with mode=upscale)" if batcher.cascade.upscales
                     else "upscaling needs SR stages; this cascade has only its base stage",
                     "unsupported_mode", "mode")
    side = target.stages[-1].config.image_size
    size = f"{side}x{side}"
    if request.size not in (None, "auto", size):
      raise ApiError(400, f"size must be {size!r} (this cascade's output), got "
                     f"{request.size!r}", "invalid_size", "size")
    defaults = batcher.defaults_for(edit)
    values = {name: _per_stage(getattr(request, name), len(defaults), name) for name in PER_STAGE}
    settings = []
    for k, default in enumerate(defaults):
      guidance, sampler, steps, threshold = (values[name][k] for name in PER_STAGE)
      if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ApiError(400, f"guidance_scale must be a finite number >= 0, got {guidance}",
                       "invalid_value", "guidance_scale")
      if steps is not None and not 1 <= steps <= limits.max_steps:
        raise ApiError(400, f"steps must be between 1 and the limit max_steps = "
                       f"{limits.max_steps}, got {steps}", "limit_exceeded", "steps")
      chosen = {"guidance": guidance, "sampler": sampler, "steps": steps, "threshold": threshold}
      try:
        settings.append(dataclasses.replace(
            default, **{name: value for name, value in chosen.items() if value is not None}))
      except ValueError as e:
        raise ApiError(400, f"stage {k + 1}: {e}", "invalid_value") from e
    if edit is not None:
      try:
        target.check_edit(edit, settings)
      except edit_inputs.EditError as e:
        raise ApiError(400, str(e), "invalid_value") from e
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    if not 0 <= seed <= MAX_SEED:
      raise ApiError(400, f"seed must be between 0 and {MAX_SEED}, got {seed}", "invalid_value",
                     "seed")
    timeout = limits.timeout_s if request.timeout is None else request.timeout
    if not 0 < timeout <= limits.timeout_s:
      raise ApiError(400, f"timeout must be > 0 and at most the limit timeout = "
                     f"{limits.timeout_s:g} s, got {timeout}", "limit_exceeded", "timeout")
    return batcher_lib.Job(
        prompt=request.prompt, n=request.n, seed=seed, settings=settings,
        negative_prompt=request.negative_prompt or "", edit=edit, image=image, mask=mask,
        timeout_s=timeout,
        info={"kind": kind, "size": size, "response_format": request.response_format})

  async def run_job(job: batcher_lib.Job, request: GenerationRequest,
                    http: fastapi.Request) -> responses.Response:
    """Queues `job`, then answers at once (wait=false) or with its images."""
    try:
      batcher.submit(job)
    except batcher_lib.QueueFull as e:
      metrics.rejected.labels("queue_full").inc()
      raise ApiError(429, str(e), "queue_full",
                     headers={"Retry-After": str(math.ceil(e.retry_after))}) from e
    except batcher_lib.Unavailable as e:
      metrics.rejected.labels("shutting_down").inc()
      raise ApiError(503, str(e), "unavailable") from e
    base_url = str(http.base_url)
    if not request.wait:
      return responses.JSONResponse(job_json(job, base_url), 202,
                                    headers={"Location": f"/v1/jobs/{job.id}"})
    while not job.done:
      if await http.is_disconnected():
        batcher.cancel(job, "disconnected")
        return responses.Response(status_code=499)
      if time.time() > job.deadline:
        batcher.expire()
      await _wait_change(job, 0, 0.25, until_done=True)
    headers = {"X-Job-Id": job.id}
    if job.status == batcher_lib.SUCCEEDED:
      return responses.JSONResponse(images_response(job, base_url), headers=headers)
    if job.status == batcher_lib.CANCELLED:
      raise ApiError(409, f"job {job.id} was cancelled", "cancelled", headers=headers)
    raise ApiError(job.error["status"], job.error["message"], job.error["code"],
                   headers=headers)

  # --- Endpoints ------------------------------------------------------------------------------

  @app.post("/v1/images/generations")
  async def generations(request: GenerationRequest, http: fastapi.Request):
    return await run_job(make_job(request, "generation"), request, http)

  @app.post("/v1/images/edits")
  async def edits(http: fastapi.Request):
    if not http.headers.get("content-type", "").startswith("multipart/form-data"):
      raise ApiError(400, "an edit is a multipart/form-data request (image and mask as files)",
                     "invalid_content_type")
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
      form = await http.form(max_files=4, max_fields=64, max_part_size=limits.max_body_bytes)
    except Exception as e:  # pylint: disable=broad-except  (starlette's multipart errors)
      raise ApiError(400, f"cannot read the multipart body: {e}", "invalid_body") from e
    try:  # uploads are read into memory, then the form's spooled files are closed
      for key, value in form.multi_items():
        if isinstance(value, UploadFile):
          files.setdefault(key, []).append(await value.read())
        elif key in fields:
          raise ApiError(422, f"field {key!r} is given twice", "invalid_field", key)
        else:
          fields[key] = value.split(",") if key in PER_STAGE and "," in value else value
    finally:
      await form.close()
    unknown = sorted(set(files) - {"image", "image[]", "mask"})
    if unknown:
      raise ApiError(422, f"unknown file field {unknown[0]!r} (files: image, mask)",
                     "invalid_field", unknown[0])
    uploads = files.get("image", []) + files.get("image[]", [])
    if len(uploads) != 1 or len(files.get("mask", [])) > 1:
      raise ApiError(400, "an edit takes one image file (and at most one mask file)",
                     "invalid_value", "image")
    try:
      request = EditRequest.model_validate(fields)
    except pydantic.ValidationError as e:
      message, param = _validation_message(list(e.errors()))
      raise ApiError(422, message, "invalid_field", param) from e
    mask_file = (files.get("mask") or [None])[0]
    mode = request.mode or ("inpaint" if mask_file is not None else "img2img")
    try:
      edit = edit_inputs.Edit(mode, DEFAULT_STRENGTH[mode] if request.strength is None
                              else request.strength, request.resample, request.jump,
                              request.fit)
    except edit_inputs.EditError as e:
      raise ApiError(400, str(e), "invalid_value") from e
    if edit.uses_mask != (mask_file is not None):
      raise ApiError(400, "inpainting needs a mask file (white or transparent = regenerate)"
                     if edit.uses_mask else f"mode {mode!r} takes no mask", "invalid_value",
                     "mask")
    image = _decode(uploads[0], "image", limits)
    mask = None
    if mask_file is not None:
      mask = _decode_mask(mask_file, limits)
      if mask.shape != image.shape[:2]:
        raise ApiError(400, f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                       f"{image.shape[1]}x{image.shape[0]}: they must be the same size",
                       "invalid_value", "mask")
      if not mask.any() or mask.all():
        raise ApiError(400, "the mask regenerates " + ("nothing" if not mask.any() else
                       "everything") + " (white or transparent = regenerate)", "invalid_value",
                       "mask")
    job_target = batcher.target(edit)
    try:
      image = edit_inputs.fit_square(image, edit.fit, "the image")
      mask = None if mask is None else edit_inputs.fit_square(mask, edit.fit, "the mask")
    except edit_inputs.EditError as e:
      raise ApiError(400, str(e), "invalid_value", "fit") from e
    if job_target is not None:
      side = job_target.input_size(edit)
      image = edit_inputs.at_size(image[None], side)[0]
      mask = None if mask is None else edit_inputs.regenerate_at_size(mask[None], side)[0]
    return await run_job(make_job(request, "edit", edit, image, mask), request, http)

  def get_job(job_id: str) -> batcher_lib.Job:
    job = batcher.get(job_id)
    if job is None:
      raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while only)",
                     "not_found")
    return job

  @app.get("/v1/jobs")
  async def list_jobs(http: fastapi.Request):
    return {"object": "list", "data": [job_json(j, str(http.base_url), data=False)
                                       for j in batcher.recent()]}

  @app.get("/v1/jobs/{job_id}")
  async def read_job(job_id: str, http: fastapi.Request):
    return job_json(get_job(job_id), str(http.base_url))

  @app.delete("/v1/jobs/{job_id}")
  async def delete_job(job_id: str, http: fastapi.Request):
    job = get_job(job_id)
    batcher.cancel(job)
    return job_json(job, str(http.base_url), data=False)

  @app.post("/v1/jobs/{job_id}/cancel")
  async def cancel_job(job_id: str, http: fastapi.Request):
    return await delete_job(job_id, http)

  @app.get("/v1/jobs/{job_id}/events")
  async def job_events(job_id: str, http: fastapi.Request):
    job = get_job(job_id)
    last = http.headers.get("last-event-id", "")
    start = int(last) + 1 if last.isdigit() else 0
    base_url = str(http.base_url)

    async def stream():
      sent = start
      while True:
        for event in job.events_since(sent):
          data = event["data"]
          if event["event"] in ("done", "error", "cancelled"):
            data = job_json(job, base_url)
          yield f"id: {sent}\nevent: {event['event']}\ndata: {json.dumps(data)}\n\n"
          sent += 1
        if job.done and not job.events_since(sent):
          return
        if not await _wait_change(job, sent, 15.0):
          yield ": keep-alive\n\n"

    return responses.StreamingResponse(stream(), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache"})

  @app.get("/v1/files/{name}")
  async def read_file(name: str):
    match = _FILE_NAME.fullmatch(name)
    job = batcher.get(match[1]) if match else None
    index = int(match[2]) if match else -1
    if job is None or not 0 <= index < job.n or job.status != batcher_lib.SUCCEEDED:
      raise ApiError(404, f"no image {name!r} (images of finished jobs are kept for a while "
                     "only)", "not_found")
    return responses.Response(job.pngs[index], media_type="image/png")

  @app.get("/v1/info")
  async def info():
    def stages(cascade, settings):
      return [{"stage": s.config.stage, "image_size": s.config.image_size,
               "checkpoint_step": s.step, "lora": bool(s.lora),
               "defaults": dataclasses.asdict(d)} for s, d in zip(cascade.stages, settings)]
    out = batcher.cascade.stages[-1].config.image_size
    return {"stages": stages(batcher.cascade, batcher.defaults), "size": f"{out}x{out}",
            "generates": not batcher.cascade.upscales,
            "modes": ["inpaint", "img2img"] * (not batcher.cascade.upscales)
                     + ["upscale"] * (batcher.upscaler is not None),
            "batch_sizes": batcher.batch_sizes, "max_queue": batcher.max_queue,
            "packing": batcher.packing, "workers": batcher.workers,
            "limits": dataclasses.asdict(limits), "samplers": list(samplers.SAMPLERS),
            "thresholds": list(thresholding.METHODS), "ready": batcher.ready}

  # --- Probes, metrics, the page --------------------------------------------------------------

  @app.get("/healthz")
  async def healthz():
    if batcher.worker_error:
      raise ApiError(503, batcher.worker_error, "worker_failed")
    return {"status": "ok"}

  @app.get("/readyz")
  async def readyz():
    ready = batcher.ready and batcher.accepting and not batcher.worker_error
    reason = ("ready" if ready else batcher.worker_error or
              ("shutting down" if not batcher.accepting else "compiling"))
    return responses.JSONResponse({"ready": ready, "reason": reason,
                                   "queue_images": batcher.queue_depth()}, 200 if ready else 503)

  @app.get("/metrics")
  async def metrics_page():
    return responses.Response(metrics.text(), media_type=metrics_lib.CONTENT_TYPE)

  static = importlib.resources.files("imagen_jax.serve") / "static"
  page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                  "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}

  @app.get("/")
  async def page():
    return responses.HTMLResponse((static / "index.html").read_text(encoding="utf-8"),
                                  headers=page_headers)

  @app.get("/static/{name}")
  async def page_file(name: str):
    if name not in PAGE_FILES:  # a fixed list: no request reaches any other file
      raise ApiError(404, f"no file {name!r}", "not_found")
    return responses.Response((static / name).read_bytes(), media_type=PAGE_FILES[name],
                              headers=page_headers)

  app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                     metrics=metrics)
  return app
