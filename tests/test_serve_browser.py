"""The page of `imagen-jax serve` in a real browser (Playwright driving Debian's Chromium): a
prompt typed in, the progress moving, the first stage's preview, the images arriving and
decoding, cancel."""

import base64
import os
import shutil
import time

import numpy as np
import pytest

from test_serve import RED, STEPS, decode, running_server  # pylint: disable=g-bad-import-order

CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches beyond loopback (the machine may have no network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; "
                       "Playwright's own browser download is not used)"),
]

def wait_for(page, expression: str, arg=None, timeout: float = 300) -> None:
  """Polls `expression` in the page until it is truthy (page.evaluate runs beside the page's
  Content-Security-Policy; Playwright's wait_for_function would need 'unsafe-eval')."""
  deadline = time.time() + timeout
  while not page.evaluate(expression, arg):
    assert time.time() < deadline, f"timed out waiting for {expression}"
    page.wait_for_timeout(100)


IMAGES_DECODED = """n => {
  const images = [...document.querySelectorAll('#gallery .result img')];
  return images.length === n && images.every(i => i.complete && i.naturalWidth === 32);
}"""


def test_the_page_generates_shows_progress_and_images_and_cancels(tiny_cascade, tmp_path):
  sync_api = pytest.importorskip("playwright.sync_api")
  with running_server(tiny_cascade) as served, sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(str(served.client.base_url))
    page.wait_for_selector("#status.ready", timeout=60_000)
    assert page.input_value("#steps-0") == str(STEPS)  # the stages' defaults, from /v1/info
    page.fill("#prompt", RED)
    page.fill("#seed", "7")
    page.fill("#n", "2")
    page.click("#generate")
    wait_for(page, IMAGES_DECODED, 2)
    # Progress moved through every step of both stages, and the first stage's preview decoded.
    assert int(page.evaluate("document.body.dataset.progressEvents")) >= 2 * STEPS
    assert page.evaluate("document.getElementById('bar-1').value") == STEPS
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 16
    assert page.text_content("#progress-text") == "done"
    meta = page.text_content("#gallery .result .meta")
    assert RED in meta and "seed 7" in meta and f"{STEPS} steps" in meta
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    if os.environ.get("IMAGEN_JAX_SERVE_SCREENSHOT"):  # benchmarks/RESULTS.md's picture
      shutil.copy(tmp_path / "serve.png", os.environ["IMAGEN_JAX_SERVE_SCREENSHOT"])
    # The page shows what the API gives for the same request.
    shown = page.evaluate("[...document.querySelectorAll('#gallery .result img')].map(i => i.src)")
    api = served.client.post("/v1/images/generations",
                             json={"prompt": RED, "seed": 7, "n": 2}).json()
    for src, item in zip(shown, api["data"]):
      np.testing.assert_array_equal(decode(base64.b64decode(src.split(",", 1)[1])),
                                    decode(base64.b64decode(item["b64_json"])))
    # Cancel: a job held in the queue is cancelled from the page.
    served.batcher.pause()
    try:
      page.fill("#prompt", "a blue square")
      page.click("#generate")
      page.wait_for_selector("#cancel:not([disabled])", timeout=30_000)
      page.click("#cancel")
      wait_for(page, "document.getElementById('message').textContent === 'cancelled'",
               timeout=30)
    finally:
      served.batcher.resume()
    assert served.client.get("/v1/jobs").json()["data"][0]["status"] == "cancelled"
    assert page.evaluate("document.querySelectorAll('#gallery .result').length") == 1
    browser.close()
  assert not errors, errors
  host = str(served.client.base_url).rstrip("/")
  assert requests and all(url.startswith(host) or url.startswith("data:") for url in requests)
