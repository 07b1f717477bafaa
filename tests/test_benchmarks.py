"""The GPU suite's commands run on a CPU with tiny configs, so a rare GPU session is never lost
to a typo or a renamed flag."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_suite_runs_on_tiny_configs(tmp_path):
  # One device, as on the one-GPU machine (not this test session's 8 fake CPU devices).
  env = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
         "XLA_FLAGS": ""}
  out = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=1200)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  log = (tmp_path / "gpu_suite.log").read_text()
  results = [json.loads(line.split("RESULT_JSON ", 1)[1]) for line in log.splitlines()
             if line.startswith("RESULT_JSON ")]
  assert [r["benchmark"] for r in results] == ["train_step", "train_step", "sample"]
  assert all(row["images_per_s"] > 0 for r in results for row in r["rows"])
  memory = json.loads(log.split("MEMORY_JSON ", 1)[1].splitlines()[0])
  assert memory["per_device_batch"] == 2 and memory["params"] > 0
