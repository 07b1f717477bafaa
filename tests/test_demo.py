"""`imagen-jax demo --quick`: the README's main job end to end (scores mean little at this size)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_demo_trains_samples_scores_and_reuses(tmp_path):
  workdir = tmp_path / "demo"
  cmd = [sys.executable, "-m", "imagen_jax", "demo", f"--workdir={workdir}", "--quick"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  scores = json.loads((workdir / "scores.json").read_text())
  for split in ("validation", "heldout"):
    s = scores["scores"][split]
    assert s["n"] == 8
    assert all(0.0 <= s[a] <= 1.0 for a in ("objects", "color", "shape", "position", "all_correct"))
  assert "all_correct" in first.stdout and "heldout" in first.stdout
  report = (workdir / "report.html").read_text()
  assert report.count("<figure>") == 16 and "data:image/png;base64," in report
  records = [json.loads(l) for l in open(workdir / "samples" / "samples.jsonl")]
  assert sorted({r["split"] for r in records}) == ["heldout", "validation"]
  # A second run reuses the data, both stages and the samples.
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert second.stderr.count("reusing it") == 2
  assert "16 already in" in second.stderr
  again = json.loads((workdir / "scores.json").read_text())
  assert again["scores"] == scores["scores"]
  assert again["seconds"]["train_base"] < scores["seconds"]["train_base"] / 3
