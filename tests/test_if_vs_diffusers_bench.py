"""benchmarks/if_vs_diffusers.py at its tiny size: both sides run, agree and report rates."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, USER_XLA_FLAGS

pytest.importorskip("diffusers")
pytest.importorskip("torch")


@pytest.mark.diffusers
@pytest.mark.slow  # about a minute on 2 cores (three XLA compilations, torch's model load)
def test_if_vs_diffusers_tiny():
  # One CPU device, as the benchmark runs (not this session's 8 fake devices).
  env = {**os.environ, "XLA_FLAGS": USER_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "benchmarks.if_vs_diffusers", "--size=tiny",
                        "--rounds=1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT_JSON ")]
  assert len(lines) == 1, out.stdout[-4000:]
  result = json.loads(lines[0].split(" ", 1)[1])
  assert result["benchmark"] == "if_vs_diffusers" and result["params"] > 0
  rows = {(row["job"], row["dtype"]): row for row in result["rows"]}
  assert set(rows) == {("sample (guided eval)", "float32"), ("sample (guided eval)", "bfloat16"),
                       ("train step", "float32")}
  for (job, dtype), row in rows.items():
    assert row["jax_images_per_s"] > 0 and row["jax_calls_per_s"] > 0, row
    if dtype == "float32":  # torch's bf16 autocast may be missing somewhere: then it says why
      assert row["torch_images_per_s"] > 0 and row["torch_calls_per_s"] > 0, row
      assert row["ratio"] > 0
      # The same network on the same inputs: the guided outputs (|output| ~ 10 here) and the
      # warm-up steps' training losses agree.
      assert row["max_abs_diff"] is not None and row["max_abs_diff"] < 1e-3, row
    elif row["torch_images_per_s"] is None:
      assert f"sample {dtype}" in result["torch_errors"], result["torch_errors"]
  seconds = result["seconds"]
  assert all(len(s["jax"]) == 1 for s in seconds.values())
  assert len(seconds["sample float32"]["torch"]) == 1 == len(seconds["train float32"]["torch"])
