"""The README's main job, `imagen-jax demo`, typed as written (with --quick) in a fresh directory:
the relative --workdir lands there, scores.json is what the judge says of the written images,
report.html shows every image with its verdict, and a second run reuses what is done."""

import base64
import html
import io
import json
import re
import shlex
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from helpers import REPO, readme_commands, run_as_typed
from imagen_jax.workflows import demo
from imagen_jax.core import partitioning
from imagen_jax.eval import shapes as judge
from imagen_jax.sample import outdir as outdir_lib


def main_command() -> tuple[str, str]:
  """(the README's main-job command with --quick, its --workdir as written)."""
  install, demo = readme_commands("Quick start")[0].split(" && ")
  assert install == "pip install -e ."
  workdir = next(a.split("=", 1)[1] for a in shlex.split(demo) if a.startswith("--workdir="))
  return demo + " --quick", workdir


def report_figures(report: str) -> list[tuple[np.ndarray, str, str]]:
  """(image, prompt, verdict text) of every figure in report.html, in page order."""
  figures = re.findall(r"<figure><img src='data:image/png;base64,([^']+)'[^>]*>"
                       r"<figcaption>(.*?)<br>(.*?)</figcaption></figure>", report)
  return [(np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")),
           html.unescape(prompt), re.sub("<[^>]+>", "", verdict))
          for data, prompt, verdict in figures]


@pytest.mark.slow
def test_the_main_command_runs_as_typed_in_a_fresh_directory(tmp_path):
  command, workdir_arg = main_command()
  assert not workdir_arg.startswith(("/", "~"))  # the README's own relative --workdir
  first = run_as_typed(command, tmp_path, timeout=900)
  assert first.returncode == 0, first.stderr[-4000:]
  workdir = tmp_path / workdir_arg
  assert "all_correct" in first.stdout and "heldout" in first.stdout
  # Both stages trained data-parallel over one CPU device per core.
  batches = [demo.stage_configs(str(workdir), quick=True)[s].batch_size for s in ("base", "sr")]
  devices = partitioning.cpu_devices_per_core(batches)
  assert f"demo: {devices} CPU devices, one per core" in first.stderr

  # scores.json is the judge's verdict on the images the demo wrote.
  records = outdir_lib.read_records(str(workdir / "samples"))
  images = [outdir_lib.read_image(str(workdir / "samples"), r) for r in records]
  assert sorted({r["split"] for r in records}) == ["heldout", "validation"]
  assert [sum(r["split"] == s for r in records) for s in ("validation", "heldout")] == [8, 8]
  scores = json.loads((workdir / "scores.json").read_text())
  assert scores["scores"] == judge.score_by_split(records, images, by_kind=True)
  # One- and two-object prompts apart, each a part of its split.
  for split in ("validation", "heldout"):
    kinds = [scores["scores"][f"{split} {kind}"]["n"] for kind in ("singles", "pairs")
             if f"{split} {kind}" in scores["scores"]]
    assert sum(kinds) == scores["scores"][split]["n"]

  # report.html shows every image (as sampled, enlarged) over its prompt and verdict.
  figures = report_figures((workdir / "report.html").read_text())
  assert len(figures) == len(records)
  by_split = sorted(zip(records, images), key=lambda ri: ri[0]["split"] != "validation")
  for (record, image), (shown, prompt, verdict) in zip(by_split, figures):
    assert prompt == record["prompt"]
    scale = shown.shape[0] // image.shape[0]
    np.testing.assert_array_equal(shown, image.repeat(scale, 0).repeat(scale, 1))
    assert (verdict == "correct") == judge.judge(image, record["prompt"])["all_correct"]

  # The stages trained side by side, base to its switch step on one core, then on both.
  switch = round(demo.BASE_SHARE_BESIDE_SR * demo.stage_configs("x", quick=True)["base"].total_steps)
  assert f"demo: training base in {workdir / 'base'} on core(s) 0, 1 device(s), to step {switch}" \
      in first.stderr
  assert f"Resuming from the checkpoint at step {switch}" in first.stderr
  assert "[sr] " in first.stderr and "[base] " in first.stderr

  # A second run reuses the data, both stages and the samples.
  second = run_as_typed(command, tmp_path, timeout=900)
  assert second.returncode == 0, second.stderr[-4000:]
  assert second.stderr.count("reusing it") == 2
  assert "16 already in" in second.stderr
  again = json.loads((workdir / "scores.json").read_text())
  assert again["scores"] == scores["scores"]
  assert again["seconds"]["train_base"] < scores["seconds"]["train_base"] / 3

  # Another prompt count samples into samples_N with the same stages; the first samples stay.
  third = run_as_typed(command + " --num_prompts=3", tmp_path, timeout=900)
  assert third.returncode == 0, third.stderr[-4000:]
  assert third.stderr.count("reusing it") == 2
  more = outdir_lib.read_records(str(workdir / "samples_3"))
  assert [r["prompt"] for r in more if r["split"] == "heldout"] == [
      r["prompt"] for r in records if r["split"] == "heldout"][:3]
  assert len(more) == 6 and outdir_lib.read_records(str(workdir / "samples")) == records
  assert json.loads((workdir / "scores.json").read_text())["scores"]["heldout"]["n"] == 3

  # The sampler benchmark (issue 18) runs on the trained demo: one row per (sampler, budget)
  # plus the reference, the reference's PSNR with itself at the clamp, the others at most that.
  bench = subprocess.run(
      [sys.executable, "-m", "studies.sampler_quality", f"--workdir={workdir}",
       "--samplers=ddim,unipc", "--evals=2", "--ddpm_extra_evals=", "--reference=dpmpp_2m:6",
       "--num_prompts=3", "--batch_size=8"], cwd=REPO, capture_output=True, text=True,
      timeout=900)
  assert bench.returncode == 0, bench.stderr[-4000:]
  rows = json.loads(bench.stdout.split("RESULT_JSON ", 1)[1].splitlines()[0])["rows"]
  assert [(r["sampler"], r["steps"], r["evals"]) for r in rows] == [
      ("dpmpp_2m", 6, 6), ("ddim", 2, 2), ("unipc", 2, 2)]
  assert rows[0]["psnr_vs_reference"] > 100  # identical images
  assert all(0 < r["psnr_vs_reference"] <= rows[0]["psnr_vs_reference"] for r in rows[1:])
  assert all(0 <= r["validation_all_correct"] <= 1 for r in rows)


@pytest.mark.parametrize("cores,batches,devices", [
    (2, [32, 32], 2), (1, [32, 32], 1), (8, [32, 12], 4), (3, [32, 16], 2), (16, [16], 16)])
def test_the_demo_trains_over_one_cpu_device_per_core_that_divides_its_batches(
    monkeypatch, cores, batches, devices):
  monkeypatch.setattr(partitioning, "cpu_cores", lambda: cores)
  assert partitioning.cpu_devices_per_core(batches) == devices


def test_a_cpu_device_count_the_user_chose_is_left_alone(monkeypatch):
  configs = demo.stage_configs("unused", quick=True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  assert partitioning.user_set_cpu_devices()
  assert demo.use_every_core(configs) == 0  # not even attempted
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert partitioning.user_set_cpu_devices() == (jax.config.jax_num_cpu_devices != -1)


def test_side_by_side_training_splits_the_cores_and_stops_the_base_at_its_share(
    monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(partitioning, "cpu_cores", lambda: 4)
  monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  monkeypatch.setattr(demo.os, "sched_setaffinity", lambda pid, cores: pinned.append(set(cores)))
  assert demo.side_by_side_cores(0) is None  # the user chose the device count
  assert demo.side_by_side_cores(4) == ([0, 1], [2, 3])
  monkeypatch.setattr(partitioning, "cpu_cores", lambda: 1)
  assert demo.side_by_side_cores(1) is None

  monkeypatch.setattr(partitioning, "cpu_cores", lambda: 4)
  started, pinned = [], []

  class FakeProcess:
    def __init__(self, command, env, **unused_kwargs):
      started.append((command, env["JAX_NUM_CPU_DEVICES"], pinned[-1]))
      self.stdout = iter(["a line\n"])

    def wait(self):
      return 0

  monkeypatch.setattr(demo.subprocess, "Popen", FakeProcess)
  trained = []
  monkeypatch.setattr(demo, "train_stage", lambda config, workdir: trained.append(workdir))
  laps = []
  demo.train_stages(str(tmp_path), quick=False, device_count=4, lap=laps.append)
  configs = demo.stage_configs(str(tmp_path), quick=False)
  switch = round(demo.BASE_SHARE_BESIDE_SR * configs["base"].total_steps)
  assert 0.5 * configs["base"].total_steps < switch < configs["base"].total_steps
  (base_cmd, base_devices, base_cores), (sr_cmd, sr_devices, sr_cores) = started
  assert base_cmd[1:4] == ["-m", "imagen_jax", "train"]
  assert "--config=configs/demo_base.py:full" in base_cmd and base_cmd[-1] == f"--stop_at_step={switch}"
  assert "--config=configs/demo_sr.py:full" in sr_cmd
  assert not any(a.startswith("--stop_at_step") for a in sr_cmd)
  for cmd, name in ((base_cmd, "base"), (sr_cmd, "sr")):
    assert f"--workdir={tmp_path / name}" in cmd
    assert f"--config.data.data_dir={tmp_path / 'data'}" in cmd
  assert (base_cores, sr_cores) == ({0, 1}, {2, 3}) and (base_devices, sr_devices) == ("2", "2")
  assert pinned[-1] == {0, 1, 2, 3}  # the parent's own cores back
  # Then the base stage continues in this process on every core (and the SR stage is reused).
  assert trained == [str(tmp_path / "base"), str(tmp_path / "sr")]
  assert laps == ["train_side_by_side", "train_base", "train_sr"]
  err = capsys.readouterr().err  # each child's output, forwarded under its name
  assert "[base] a line\n" in err and "[sr] a line\n" in err


def test_both_demo_variants_share_the_pretrained_builtin_encoder_written_once(monkeypatch):
  from imagen_jax.text import builtin
  # Both stages of a cascade must share one encoder and reading (sample/cascade.py checks it):
  # the text-pretrained encoder's final layer, as Imagen reads T5.
  for quick in (False, True):
    configs = demo.stage_configs("unused", quick=quick).values()
    assert {(c.text.encoder, c.text.output_layer) for c in configs} == {
        ("builtin:shapes-tiny-pretrained", -1)}
  written = []
  monkeypatch.setattr(builtin, "materialize", lambda name: written.append(name) or "/x/" + name)
  configs = demo.stage_configs("unused", quick=False)
  configs["other"] = ml_collections.ConfigDict({"text": {"encoder": "/weights/t5-small"}})
  demo.prepare_text_encoders(configs)
  assert written == ["builtin:shapes-tiny-pretrained"]  # once, and only builtin names
