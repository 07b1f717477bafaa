"""The README as a newcomer types it: CI runs its Quick start, and its CPU commands run as
written from a fresh directory with relative paths."""

import json
import os
import shlex

import pytest

from helpers import REPO, readme_commands, run_as_typed
from imagen_jax.core import config_lib


def test_ci_runs_the_quick_start_exactly():
  install_and_demo, test = readme_commands("Quick start")
  assert install_and_demo.startswith("pip install -e . && imagen-jax demo --workdir=")
  assert test.startswith("pip install -e '.[test]' && python -m pytest")
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = [line.strip() for line in f]
  # CI types the same lines in a fresh, activated venv; the demo with --quick (the full one is
  # 14-42 minutes; tests/test_demo.py runs it the same way in a fresh directory).
  activate = ci.index("source .venv-ci/bin/activate")
  assert ci[activate - 1] == "fresh_venv .venv-ci"
  assert ci[activate + 1:activate + 3] == [install_and_demo + " --quick", test]
  # The slow tests, which the default run deselects (pytest.ini), run in a step of their own.
  assert test.split(" && ")[1] + " -m slow -p no:cacheprovider" in ci[activate + 3:]


@pytest.mark.slow
def test_every_cpu_command_runs_as_written_from_a_fresh_directory(tmp_path):
  commands = readme_commands("Every command on a CPU, in a minute each")
  assert [c.split()[:2] for c in commands if c.startswith("imagen-jax")] == [
      ["imagen-jax", "train"], ["imagen-jax", "train"], ["imagen-jax", "sample"],
      ["imagen-jax", "eval"], ["imagen-jax", "edit"], ["imagen-jax", "finetune"],
      ["imagen-jax", "sample"], ["imagen-jax", "inspect"], ["imagen-jax", "inspect"],
      ["imagen-jax", "encode"], ["imagen-jax", "encode"]]
  outputs = {}
  for command in commands:
    out = run_as_typed(command, tmp_path)
    assert out.returncode == 0, (command, out.stderr[-4000:])
    name = command.split(" ", 2)[1] if command.startswith("imagen-jax") else command
    outputs.setdefault(name + (" --memory" if " --memory" in command else ""), out)
    # Every path was relative: nothing lands outside the fresh directory.
    assert all(not os.path.isabs(a.split("=", 1)[-1]) for a in shlex.split(command)
               if a.startswith(("--workdir=", "--outdir=", "--samples=", "--config.output=",
                                "--base=", "--image=")))
  for stage in ("base", "sr"):
    total = config_lib.load_config(f"configs/demo_{stage}.py:quick").total_steps
    assert os.listdir(tmp_path / "runs" / stage / "checkpoints") == [str(total)]
    stored = json.loads((tmp_path / "runs" / stage / "config.json").read_text())
    assert stored["data"]["data_dir"] == str(tmp_path / "data")  # resolved, valid from anywhere
  pngs = sorted(p for p in os.listdir(tmp_path / "samples") if p.endswith(".png"))
  assert pngs == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
  records = [json.loads(line) for line in open(tmp_path / "samples" / "samples.jsonl")]
  assert [r["stages"][0]["workdir"] for r in records] == [str(tmp_path / "runs" / "base")] * 4
  edited = [json.loads(line) for line in open(tmp_path / "edits" / "samples.jsonl")]
  assert edited[0]["image"] == str(tmp_path / "samples" / "00000.png")
  assert edited[0]["edit"]["mode"] == "img2img" and edited[0]["edit"]["strength"] == 0.6
  assert (tmp_path / "edits" / "00000.png").is_file()
  # The LoRA workdir holds the adapters of 20 steps and names its base; it samples in its place.
  assert os.listdir(tmp_path / "runs" / "blicket" / "checkpoints") == ["20"]
  tuned = json.loads((tmp_path / "runs" / "blicket" / "config.json").read_text())
  assert tuned["finetune"]["method"] == "lora"
  assert tuned["finetune"]["base"] == str(tmp_path / "runs" / "base")
  blickets = [json.loads(line) for line in open(tmp_path / "blickets" / "samples.jsonl")]
  assert blickets[0]["stages"][0]["lora"] == {"base": str(tmp_path / "runs" / "base"),
                                              "base_step": 30, "scale": 1.0}
  scores = json.loads((tmp_path / "samples" / "scores.json").read_text())
  assert scores["all"]["n"] == 4 and 0 <= scores["all"]["all_correct"] <= 1
  assert '"batch_size": 64' in outputs["inspect"].stdout
  assert "total_params: " in outputs["inspect"].stdout
  memory = json.loads(outputs["inspect --memory"].stdout.split("MEMORY_JSON ", 1)[1])
  assert memory["mesh"]["fsdp"] == 2 and memory["per_device_batch"] == 16
  assert memory["largest_per_device_batch"] > 16  # a 1.8M-parameter net on an 80 GB device
  assert (tmp_path / "cache").is_dir()
