"""`imagen-jax serve` on the tiny cascade: every endpoint and error, batching that never changes a
request's pixels, cancel and disconnect freeing queued images, deadlines, the API key, and
SIGTERM draining a real server process."""

import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client import parser as prom_parser
import pydantic
import pytest

from helpers import REPO, cli_argv, free_port  # pylint: disable=g-bad-import-order
from imagen_jax.serve import api
from imagen_jax.serve import server as server_lib

STEPS = 3
LIMITS = api.Limits(max_n=3, max_steps=20, max_prompt_chars=100, max_body_bytes=100_000,
                    max_pixels=64 * 64, timeout_s=120)
RED = "a red circle at the top left corner"
BLUE = "a blue square above a white triangle"


# --- Helpers -----------------------------------------------------------------------------------

def png(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, "PNG")
  return out.getvalue()


def decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def b64_pixels(item: dict[str, Any]) -> np.ndarray:
  return decode(base64.b64decode(item["b64_json"]))


def metric(text: str, name: str, **labels: str) -> float:
  """A sample's value in Prometheus text (0 when absent)."""
  for family in prom_parser.text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
        return sample.value
  return 0.0


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
  """The server-sent events of a streamed response, (name, data), until the stream ends."""
  out, name, data = [], None, ""
  for line in response.iter_lines():
    if line.startswith("event: "):
      name = line[7:]
    elif line.startswith("data: "):
      data += line[6:]
    elif not line and name:
      out.append((name, json.loads(data)))
      name, data = None, ""
  return out


def wait_until(condition, timeout: float, what: str) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


@dataclasses.dataclass
class Served:
  client: httpx.Client
  batcher: Any
  cascade: Any
  settings: list

  def metrics(self) -> str:
    return self.client.get("/metrics").text

  def queued(self) -> int:
    return self.client.get("/readyz").json()["queue_images"]

  @contextlib.contextmanager
  def paused(self):
    """No batch starts inside: requests queue up, to be batched together or to expire."""
    self.batcher.pause()
    try:
      yield
    finally:
      self.batcher.resume()


@contextlib.contextmanager
def running_server(stages, **options):
  """A server on loopback (uvicorn in a thread of this process) over `stages`, one device,
  3 steps per stage, batch sizes 1 and 3 (or `options`), every batch size compiled."""
  cascade, settings = server_lib.load(stages, devices=1, steps=[str(STEPS)])
  port = free_port()
  options = {"batch_sizes": (1, 3), "max_queue": 8, "limits": LIMITS, "packing": "smallest",
             **options}
  server = server_lib.build(cascade, settings, port=port, log_level="warning", access_log=False,
                            **options)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
  try:
    wait_until(lambda: server.started and client.get("/readyz").status_code == 200, 900,
               "the server to compile its batch sizes")
    yield Served(client, server.batcher, cascade, settings)
  finally:
    server.drain_and_stop()
    thread.join(120)
    client.close()


@pytest.fixture(scope="module")
def served(tiny_cascade):
  with running_server(tiny_cascade) as running:
    yield running


# --- Request bodies, no server -----------------------------------------------------------------

def test_request_bodies_take_openai_fields_and_refuse_unknown_ones():
  sent = {"prompt": "a corgi", "model": "dall-e-3", "n": 1, "quality": "hd", "style": "vivid",
          "user": "u1", "size": "1024x1024", "response_format": "url", "background": "auto",
          "moderation": "low", "output_compression": 80, "partial_images": 0}
  request = api.GenerationRequest.model_validate(sent)
  assert request.response_format == "url" and request.wait is True
  ours = api.GenerationRequest.model_validate(
      {"prompt": "x", "guidance_scale": [5, 8], "steps": 10, "sampler": ["unipc", "ddim"],
       "negative_prompt": "blur", "seed": 3, "threshold": "dynamic"})
  assert ours.guidance_scale == [5.0, 8.0] and ours.steps == 10
  with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
    api.GenerationRequest.model_validate({"prompt": "x", "colour": "red"})
  with pytest.raises(pydantic.ValidationError):
    api.EditRequest.model_validate({"prompt": "x", "mode": "outpaint"})


def test_row_keys_are_the_sample_commands_keys():
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
  from imagen_jax.serve import batcher  # pylint: disable=g-import-not-at-top
  seeds = [0, 7, 7, 2**31, 2**32 - 1]
  indices = [0, 0, 5, 3, 2**31 + 1]
  keys = np.asarray(batcher.row_keys(np.asarray(seeds, np.uint32), np.asarray(indices, np.uint32)))
  for key, seed, index in zip(keys, seeds, indices):
    np.testing.assert_array_equal(key, np.asarray(stage_sampler.image_keys(seed, [index]))[0])


def test_packing_takes_the_size_that_serves_rows_fastest():
  from imagen_jax.serve import batcher  # pylint: disable=g-import-not-at-top
  sizes = [1, 4, 8, 16]
  untimed = lambda size: None
  linear = {1: 0.1, 4: 0.4, 8: 0.8, 16: 1.6}.get    # a CPU: a batch costs its rows' worth
  flat = {1: 0.5, 4: 0.5, 8: 0.55, 16: 0.6}.get     # an accelerator: padding is almost free
  for rows, expected in [(1, 1), (3, 4), (13, 16), (16, 16), (40, 16)]:
    assert batcher.size_for_rows(rows, sizes, untimed) == expected   # smallest that holds them
    assert batcher.size_for_rows(rows, sizes, flat) == expected
  for rows, expected in [(1, 1), (3, 1), (5, 4), (13, 8), (16, 16), (40, 16)]:
    assert batcher.size_for_rows(rows, sizes, linear) == expected    # a full smaller batch
  # A smaller size not timed yet is not taken; the holding size untimed is (to time it).
  assert batcher.size_for_rows(13, sizes, {4: 0.4, 16: 1.6}.get) == 4
  assert batcher.size_for_rows(13, sizes, {4: 0.4, 8: 0.8}.get) == 16


# --- The server ------------------------------------------------------------------------------

@pytest.mark.slow
def test_probes_info_page_and_metrics(served):
  client = served.client
  assert client.get("/healthz").json() == {"status": "ok"}
  ready = client.get("/readyz")
  assert ready.status_code == 200 and ready.json()["ready"] is True
  info = client.get("/v1/info").json()
  assert info["size"] == "32x32" and info["batch_sizes"] == [1, 3] and info["max_queue"] == 8
  assert [s["image_size"] for s in info["stages"]] == [16, 32]
  assert [s["defaults"]["steps"] for s in info["stages"]] == [STEPS, STEPS]
  assert info["modes"] == ["inpaint", "img2img", "upscale"]
  assert info["limits"]["max_n"] == 3 and "unipc" in info["samplers"]
  page = client.get("/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  assert 'id="prompt"' in page.text and "/static/app.js" in page.text
  assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
  assert page.headers["content-security-policy"].startswith("default-src 'self'")
  script = client.get("/static/app.js")
  assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
  assert "/v1/jobs/" in script.text and "https://" not in script.text
  for path in ("/static/index.html", "/static/..%2F..%2Fsetup.py", "/static/batcher.py",
               "/v1/files/..%2Fsetup.py", "/v1/files/job_00_0.png"):
    response = client.get(path)
    assert response.status_code == 404, path
    assert response.json()["error"]["type"] == "not_found_error"
  text = served.metrics()
  # Each stage compiled at both batch sizes before /readyz said so.
  assert metric(text, "imagen_serve_compilations_total", when="start") >= 4
  assert metric(text, "imagen_serve_ready") == 1
  for name in ("imagen_serve_queue_images", "imagen_serve_batch_fill_ratio_count",
               "imagen_serve_padded_rows_total", "imagen_serve_queue_wait_seconds_count",
               "imagen_serve_images_per_second", "imagen_serve_batch_seconds_count"):
    assert f"\n{name}" in text or text.startswith(name), name


@pytest.mark.slow
def test_pixels_alone_in_a_full_batch_and_from_the_cascade_are_the_same(served):
  client = served.client
  red = {"prompt": RED, "seed": 7, "guidance_scale": [3, 2]}
  alone = client.post("/v1/images/generations", json=red)
  assert alone.status_code == 200, alone.text
  body = alone.json()
  assert body["seed"] == 7 and len(body["data"]) == 1 and body["size"] == "32x32"
  assert [s["guidance"] for s in body["settings"]] == [3.0, 2.0]
  red_alone = b64_pixels(body["data"][0])
  assert red_alone.shape == (32, 32, 3)
  compiled = metric(served.metrics(), "imagen_serve_compilations_total", when="request")
  # Another request with every per-image setting different, beside it in one full batch of 3.
  blue = {"prompt": BLUE, "n": 2, "seed": 3, "guidance_scale": 6, "threshold": "dynamic",
          "negative_prompt": "a white triangle", "wait": False}
  before = served.metrics()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    with served.paused():
      packed = pool.submit(client.post, "/v1/images/generations", json=red)
      wait_until(lambda: served.queued() == 1, 30, "the first request to queue")
      blue_job = client.post("/v1/images/generations", json=blue)
      assert blue_job.status_code == 202
      assert blue_job.headers["location"].startswith("/v1/jobs/")
      assert served.queued() == 3
    red_packed = packed.result(timeout=300)
  assert red_packed.status_code == 200
  np.testing.assert_array_equal(b64_pixels(red_packed.json()["data"][0]), red_alone)
  after = served.metrics()
  assert metric(after, "imagen_serve_batches_total", batch_size="3") == metric(
      before, "imagen_serve_batches_total", batch_size="3") + 1
  full = lambda text: (metric(text, "imagen_serve_batch_fill_ratio_bucket", le="1.0")
                       - metric(text, "imagen_serve_batch_fill_ratio_bucket", le="0.875"))
  assert full(after) == full(before) + 1
  # The other request's images, alone (2 images and a padding row), are those it got packed.
  job_id = blue_job.json()["id"]
  wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 300,
             "the packed job")
  packed_blue = [b64_pixels(d) for d in client.get(f"/v1/jobs/{job_id}").json()["data"]]
  blue_alone = client.post("/v1/images/generations", json={**blue, "wait": True}).json()
  for i in range(2):
    np.testing.assert_array_equal(b64_pixels(blue_alone["data"][i]), packed_blue[i])
  assert not np.array_equal(packed_blue[0], packed_blue[1])  # image i samples from (seed, i)
  assert metric(served.metrics(), "imagen_serve_padded_rows_total") == metric(
      after, "imagen_serve_padded_rows_total") + 1
  # Different per-image settings compiled nothing; the pixels are the sample command's.
  assert metric(served.metrics(), "imagen_serve_compilations_total",
                when="request") == compiled
  settings = [dataclasses.replace(s, guidance=g) for s, g in zip(served.settings, (3.0, 2.0))]
  direct = served.cascade.sample([RED], seed=7, settings=settings)[-1][0]
  np.testing.assert_array_equal(red_alone, direct)


@pytest.mark.slow
def test_other_steps_compile_once_then_reuse(served):
  client = served.client
  start = metric(served.metrics(), "imagen_serve_compilations_total", when="request")
  first = client.post("/v1/images/generations", json={"prompt": RED, "steps": [4, 2], "seed": 1})
  assert first.status_code == 200 and [s["steps"] for s in first.json()["settings"]] == [4, 2]
  compiled = metric(served.metrics(), "imagen_serve_compilations_total", when="request")
  assert compiled >= start + 2  # a program per stage
  again = client.post("/v1/images/generations",
                      json={"prompt": BLUE, "steps": [4, 2], "seed": 2, "guidance_scale": 9})
  assert again.status_code == 200
  assert metric(served.metrics(), "imagen_serve_compilations_total", when="request") == compiled


BAD_REQUESTS = [
    ({"prompt": "x", "n": 4}, 400, "max_n = 3"),
    ({"prompt": "x", "n": 0}, 400, "max_n"),
    ({"prompt": "x", "steps": 21}, 400, "max_steps = 20"),
    ({"prompt": "x" * 101}, 400, "max_prompt_chars = 100"),
    ({"prompt": "x", "negative_prompt": "y" * 101}, 400, "max_prompt_chars"),
    ({"prompt": "x", "size": "1024x1024"}, 400, "size must be '32x32'"),
    ({"prompt": "x", "guidance_scale": [1, 2, 3]}, 400, "guidance_scale has 3 values for 2"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale must be"),
    ({"prompt": "x", "sampler": "euler_a"}, 400, "unknown sampler 'euler_a'"),
    ({"prompt": "x", "threshold": "soft"}, 400, "unknown thresholding 'soft'"),
    ({"prompt": "x", "stream": True}, 400, "stream is not supported"),
    ({"prompt": "x", "output_format": "webp"}, 400, "png only"),
    ({"prompt": "x", "timeout": 1000}, 400, "timeout = 120"),
    ({"prompt": "x", "seed": -1}, 400, "seed must be"),
    ({"prompt": "x", "colour": "red"}, 422, "unknown field 'colour'"),
    ({"prompt": "x", "n": "many"}, 422, "n:"),
    ({"n": 1}, 422, "prompt"),
    ({"prompt": "x", "response_format": "jpeg"}, 422, "response_format"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_requests_name_the_field_or_limit(served, body, status, message):
  response = served.client.post("/v1/images/generations", json=body)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert message in error["message"] and error["type"] == "invalid_request_error"
  assert served.queued() == 0


@pytest.mark.slow
def test_bodies_over_the_limit_and_not_json(served):
  client = served.client
  big = json.dumps({"prompt": "x", "user": "u" * LIMITS.max_body_bytes})
  response = client.post("/v1/images/generations", content=big,
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]
  # Without a Content-Length (chunked), the body is counted as it comes.
  chunks = (big[i:i + 10_000].encode() for i in range(0, len(big), 10_000))
  response = client.post("/v1/images/generations", content=chunks,
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 413
  response = client.post("/v1/images/generations", content=b"{not json",
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_field"


@pytest.mark.slow
def test_openai_client_fields_and_urls(served):
  client = served.client
  sent = {"prompt": BLUE, "model": "dall-e-3", "quality": "standard", "style": "vivid",
          "user": "u1", "size": "32x32", "response_format": "url", "n": 2, "seed": 11}
  response = client.post("/v1/images/generations", json=sent)
  assert response.status_code == 200, response.text
  body = response.json()
  assert isinstance(body["created"], int) and body["output_format"] == "png"
  urls = [item["url"] for item in body["data"]]
  assert all(u.startswith(str(client.base_url).rstrip("/") + "/v1/files/") for u in urls)
  images = [client.get(u) for u in urls]
  assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in images)
  same = client.post("/v1/images/generations",
                     json={**sent, "response_format": "b64_json"}).json()
  for image, item in zip(images, same["data"]):
    np.testing.assert_array_equal(decode(image.content), b64_pixels(item))


@pytest.mark.slow
def test_full_queue_answers_429_and_cancel_frees_the_rows(served):
  client = served.client
  before = served.metrics()
  with served.paused():
    jobs = [client.post("/v1/images/generations",
                        json={"prompt": p, "n": 3, "wait": False}).json()["id"] for p in "ab"]
    full = client.post("/v1/images/generations", json={"prompt": "c", "n": 3})
    assert full.status_code == 429, full.text
    assert int(full.headers["retry-after"]) >= 1
    error = full.json()["error"]
    assert error["code"] == "queue_full" and "max_queue" in error["message"]
    assert error["type"] == "rate_limit_error"
    assert served.queued() == 6
    cancelled = client.delete(f"/v1/jobs/{jobs[0]}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{jobs[1]}/cancel").json()["status"] == "cancelled"
    assert served.queued() == 0
    room = client.post("/v1/images/generations", json={"prompt": "c", "n": 3, "wait": False})
    assert room.status_code == 202
    client.delete(f"/v1/jobs/{room.json()['id']}")
  for job_id in jobs:
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
  with client.stream("GET", f"/v1/jobs/{jobs[0]}/events") as stream:
    assert [name for name, _ in events(stream)] == ["queued", "cancelled"]
  after = served.metrics()
  assert metric(after, "imagen_serve_dropped_images_total", reason="cancelled") == metric(
      before, "imagen_serve_dropped_images_total", reason="cancelled") + 9
  assert metric(after, "imagen_serve_rejected_total", reason="queue_full") == metric(
      before, "imagen_serve_rejected_total", reason="queue_full") + 1
  assert client.delete("/v1/jobs/job_unknown").status_code == 404


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_rows(served):
  before = served.metrics()
  body = json.dumps({"prompt": RED, "n": 2}).encode()
  port = served.client.base_url.port
  with served.paused():
    with socket.create_connection(("127.0.0.1", port)) as sock:
      sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
      wait_until(lambda: served.queued() == 2, 30, "the request to queue")
    wait_until(lambda: served.queued() == 0, 30, "the disconnected request's rows to go")
  newest = served.client.get("/v1/jobs").json()["data"][0]
  assert newest["prompt"] == RED and newest["status"] == "cancelled"
  assert metric(served.metrics(), "imagen_serve_dropped_images_total",
                reason="disconnected") == metric(
                    before, "imagen_serve_dropped_images_total", reason="disconnected") + 2


@pytest.mark.slow
def test_a_job_past_its_deadline_is_answered_504(served):
  client = served.client
  with served.paused():
    start = time.time()
    late = client.post("/v1/images/generations", json={"prompt": RED, "timeout": 1})
    assert late.status_code == 504 and 1 <= time.time() - start < 10
    assert late.json()["error"]["code"] == "deadline_exceeded"
    job = client.post("/v1/images/generations",
                      json={"prompt": RED, "timeout": 1, "wait": False}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed", 10,
               "the waiting job to expire")
    assert client.get(f"/v1/jobs/{job['id']}").json()["error"]["status"] == 504
    assert served.queued() == 0


@pytest.mark.slow
def test_events_follow_a_job_to_its_images(served):
  client = served.client
  job = client.post("/v1/images/generations", json={"prompt": BLUE, "n": 2, "seed": 5,
                                                    "wait": False, "response_format": "url"})
  assert job.status_code == 202 and job.json()["status"] in ("queued", "running")
  job_id = job.json()["id"]
  with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
    assert stream.headers["content-type"].startswith("text/event-stream")
    seen = events(stream)
  names = [name for name, _ in seen]
  assert names[:2] == ["queued", "started"] and names[-1] == "done"
  progress = [(d["stage"], d["step"]) for name, d in seen if name == "progress"]
  assert progress[:STEPS] == [(1, s) for s in range(1, STEPS + 1)]
  assert (2, STEPS) in progress
  previews = [d for name, d in seen if name == "preview"]
  assert sorted(p["index"] for p in previews) == [0, 1]
  assert all(b64_pixels(p).shape == (16, 16, 3) for p in previews)
  assert names.index("preview") < names.index("image")  # the first stage shows first
  done = seen[-1][1]
  assert done["status"] == "succeeded" and len(done["data"]) == 2 and done["images_done"] == 2
  assert all(decode(client.get(d["url"]).content).shape == (32, 32, 3) for d in done["data"])
  # A client that reconnects with Last-Event-ID gets only what it missed.
  with client.stream("GET", f"/v1/jobs/{job_id}/events",
                     headers={"Last-Event-ID": str(len(seen) - 2)}) as stream:
    assert [name for name, _ in events(stream)] == ["done"]
  fetched = client.get(f"/v1/jobs/{job_id}").json()
  assert fetched["status"] == "succeeded" and fetched["seed"] == 5 and len(fetched["data"]) == 2
  assert job_id in [j["id"] for j in client.get("/v1/jobs").json()["data"]]
  missing = client.get("/v1/jobs/job_0000/events")
  assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_two_workers_sample_side_by_side_each_job_with_its_own_progress(tiny_cascade):
  bodies = [{"prompt": RED, "seed": 4, "response_format": "b64_json"},
            {"prompt": BLUE, "seed": 9, "response_format": "b64_json"}]
  with running_server(tiny_cascade, workers=2, packing="measured") as served:
    client = served.client
    alone = [b64_pixels(client.post("/v1/images/generations", json=b).json()["data"][0])
             for b in bodies]
    with served.paused():  # both queue, then each free worker takes one
      ids = [client.post("/v1/images/generations", json={**b, "wait": False}).json()["id"]
             for b in bodies]
    for job_id in ids:
      wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 300,
                 "the jobs")
    jobs = [served.batcher.get(job_id) for job_id in ids]
    assert max(j.started for j in jobs) < min(j.finished for j in jobs)  # side by side
    stages = len(served.cascade.stages)
    for job_id, pixels in zip(ids, alone):
      with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        seen = events(stream)
      # Each job heard its own batch's steps, each once, in order.
      assert [(d["stage"], d["step"]) for name, d in seen if name == "progress"] == [
          (k, step) for k in range(1, stages + 1) for step in range(1, STEPS + 1)]
      np.testing.assert_array_equal(b64_pixels(seen[-1][1]["data"][0]), pixels)


def png_bomb(side: int) -> bytes:
  """A small PNG whose header declares side x side 1-bit pixels (all black)."""
  row = b"\0" + b"\0" * ((side + 7) // 8)
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data)))
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_edits_inpaint_upscale_and_their_errors(served):
  client = served.client
  source = b64_pixels(client.post("/v1/images/generations",
                                  json={"prompt": RED, "seed": 2}).json()["data"][0])
  white = np.zeros((32, 32), np.uint8)
  white[8:24, 8:24] = 255
  form = {"prompt": BLUE, "seed": "4", "guidance_scale": "3,2"}
  files = lambda mask: {"image": ("in.png", png(source), "image/png"),
                        "mask": ("mask.png", png(mask), "image/png")}
  inpainted = client.post("/v1/images/edits", data=form, files=files(white))
  assert inpainted.status_code == 200, inpainted.text
  assert inpainted.json()["settings"][1]["guidance"] == 2.0
  edited = b64_pixels(inpainted.json()["data"][0])
  outside = white == 0
  np.testing.assert_array_equal(edited[outside], source[outside])
  assert np.abs(edited[~outside].astype(int) - source[~outside]).max() > 0
  # OpenAI's mask: transparent where the image is edited.
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 3] = 255 - white
  transparent = client.post("/v1/images/edits", data=form, files=files(rgba))
  np.testing.assert_array_equal(b64_pixels(transparent.json()["data"][0]), edited)
  small = source[::2, ::2].copy()  # 16x16: the SR stage's input size
  upscaled = client.post("/v1/images/edits", data={"prompt": RED, "mode": "upscale"},
                         files={"image": ("small.png", png(small), "image/png")})
  assert upscaled.status_code == 200, upscaled.text
  assert len(upscaled.json()["settings"]) == 1  # the SR stage alone
  assert b64_pixels(upscaled.json()["data"][0]).shape == (32, 32, 3)
  image_only = {"image": ("in.png", png(source), "image/png")}
  bad = [
      (dict(data={"prompt": "x", "mode": "img2img"}, files=files(white)), 400, "takes no mask"),
      (dict(data={"prompt": "x"}, files=files(white[:16])), 400, "same size"),
      (dict(data={"prompt": "x"}, files=files(np.zeros((32, 32), np.uint8))), 400,
       "regenerates nothing"),
      (dict(data={"prompt": "x", "mode": "inpaint"}, files=image_only), 400, "needs a mask"),
      (dict(data={"prompt": "x"}, files={"image": ("big.png", png(np.zeros((65, 65, 3),
                                                                       np.uint8)), "image/png")}),
       413, "max_pixels"),
      (dict(data={"prompt": "x"}, files={"image": ("bomb.png", png_bomb(8000), "image/png")}),
       413, "max_pixels"),
      (dict(data={"prompt": "x"}, files={"image": ("bad.png", b"not an image", "image/png")}),
       400, "cannot read the image"),
      (dict(data={"prompt": "x", "colour": "red"}, files=image_only), 422,
       "unknown field 'colour'"),
      (dict(data={"prompt": "x", "mode": "outpaint"}, files=image_only), 422, "mode"),
      (dict(data={"prompt": "x"}, files={**image_only, "extra": ("e.png", b"e", "image/png")}),
       422, "unknown file field 'extra'"),
      (dict(data={"prompt": "x", "n": "9"}, files=image_only), 400, "max_n"),
      (dict(data={"prompt": "x", "fit": "none"},
            files={"image": ("wide.png", png(np.zeros((16, 32, 3), np.uint8)), "image/png")}),
       400, "not square"),
      (dict(json={"prompt": "x"}), 400, "multipart/form-data"),
  ]
  for kwargs, status, message in bad:
    start = time.time()
    response = client.post("/v1/images/edits", **kwargs)
    assert response.status_code == status, (message, response.text)
    assert message in response.json()["error"]["message"], response.text
    assert time.time() - start < 5  # decoded (or refused) before any sampling
  assert served.queued() == 0


@pytest.mark.slow
def test_an_api_key_guards_the_api_but_not_the_probes(served):
  from fastapi import testclient  # pylint: disable=g-import-not-at-top
  app = api.create_app(served.batcher, LIMITS, api_key="s3cret")
  with testclient.TestClient(app) as client:
    for path in ("/v1/info", "/v1/jobs", "/metrics"):
      refused = client.get(path)
      assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
      assert refused.json()["error"]["type"] == "authentication_error"
      assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
      assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # Refused before the body is read: an unauthenticated client learns nothing of the schema.
    assert client.post("/v1/images/generations", json={"bogus": 1}).status_code == 401
    for path in ("/healthz", "/readyz", "/", "/static/app.js"):
      assert client.get(path).status_code == 200, path


@pytest.mark.slow
def test_sigterm_drains_every_accepted_request_and_exits_0(tiny_cascade, tmp_path):
  port = free_port()
  env = {**os.environ, "IMAGEN_JAX_API_KEY": "k3y"}
  log = tmp_path / "serve.log"
  with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        cli_argv("serve", f"--stages={','.join(tiny_cascade)}", f"--port={port}",
                 "--batch_sizes=1", "--steps=3", "--devices=1", "--max_queue=16"),
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  auth = {"Authorization": "Bearer k3y"}
  client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=300)

  def ready():
    assert proc.poll() is None, log.read_text()[-4000:]
    try:
      return client.get("/readyz").status_code == 200
    except httpx.TransportError:
      return False

  def accepted(prompt):
    return any(j["prompt"] == prompt for j in client.get("/v1/jobs").json()["data"])

  try:
    wait_until(ready, 900, "the server to compile")
    jobs = [client.post("/v1/images/generations",
                        json={"prompt": p, "n": 4, "wait": False}).json()["id"]
            for p in (RED, BLUE, "a green triangle")]
    with contextlib.ExitStack() as streams, concurrent.futures.ThreadPoolExecutor(4) as pool:
      opened = [streams.enter_context(client.stream("GET", f"/v1/jobs/{j}/events"))
                for j in jobs]
      followed = [pool.submit(lambda s: [name for name, _ in events(s)], s) for s in opened]
      waiting = pool.submit(client.post, "/v1/images/generations",
                            json={"prompt": "waiting", "n": 2})
      wait_until(lambda: accepted("waiting"), 60, "the waiting request to be accepted")
      proc.send_signal(signal.SIGTERM)
      refused = client.post("/v1/images/generations", json={"prompt": "too late"})
      assert refused.status_code == 503, refused.text
      assert refused.json()["error"]["message"] == "the server is shutting down"
      assert client.get("/readyz").json()["reason"] == "shutting down"
      answered = waiting.result(timeout=600)
      assert answered.status_code == 200 and len(answered.json()["data"]) == 2
      for stream in followed:
        assert stream.result(timeout=600)[-1] == "done"
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    assert "draining" in log.read_text()
  finally:
    client.close()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
