"""The GPU suite's commands run on a CPU with tiny configs, so a rare GPU session is never lost
to a typo or a renamed flag."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_suite_runs_on_tiny_configs(tmp_path):
  # One device, as on the one-GPU machine (not this test session's 8 fake CPU devices).
  env = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
         "XLA_FLAGS": ""}
  out = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=1800)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  log = (tmp_path / "gpu_suite.log").read_text()
  results = [json.loads(line.split("RESULT_JSON ", 1)[1]) for line in log.splitlines()
             if line.startswith("RESULT_JSON ")]
  expected = ["train_step", "train_step", "sample", "sampler_overhead", "serve_load"]
  if importlib.util.find_spec("diffusers") is not None:  # the diffusers extra's row
    expected.append("if_vs_diffusers")
  assert [r["benchmark"] for r in results] == expected
  assert all(row["images_per_s"] > 0 for r in results[:3] for row in r["rows"])
  overhead = results[3]["rows"]
  assert {row["config"] for row in overhead} == {"configs/base64.py:tiny", "configs/sr256.py:tiny"}
  assert {row["sampler"] for row in overhead} >= {"ddim", "dpmpp_2m", "unipc"}
  # The network's step is a difference of two timings (noisy at tiny sizes): it is there.
  assert all(row["solver_ms_per_step"] > 0 and row["network_ms_per_step"] is not None
             for row in overhead)
  memory = json.loads(log.split("MEMORY_JSON ", 1)[1].splitlines()[0])
  assert memory["per_device_batch"] == 2 and memory["params"] > 0
  serving = results[4]
  assert [row["clients"] for row in serving["rows"][:2]] == ["1", "4"]
  assert all(row["ok"] > 0 and row["5xx"] == 0 and row["lost"] == 0 for row in serving["rows"])
  assert serving["exit_code"] == 0


def test_demo_ablation_parses_arms():
  from studies import demo_ablation
  name, overrides = demo_ablation.parse_arm(
      "wide: model.attn_resolutions=(16,8,4) model.text_pooling=False optimizer.lr=1e-3 "
      "text.encoder=builtin:shapes-tiny-pretrained")
  assert name == "wide"
  assert overrides == {"model.attn_resolutions": (16, 8, 4), "model.text_pooling": False,
                       "optimizer.lr": 1e-3, "text.encoder": "builtin:shapes-tiny-pretrained"}
  assert demo_ablation.parse_arm("demo:") == ("demo", {})
  for bad in ("no colon here", ": optimizer.lr=1", "x: optimizer.lr"):
    with pytest.raises(ValueError, match="arm"):
      demo_ablation.parse_arm(bad)
