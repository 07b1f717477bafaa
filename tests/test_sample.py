"""Cascade sampling: the command, reproducibility, resumption, guidance, the chain check."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import REPO, run_cli  # pylint: disable=g-bad-import-order
from imagen_jax.core import fileio
from imagen_jax.core import images as images_lib
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import thresholding
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import outdir as outdir_lib

PROMPTS = ["a red circle at the top left corner", "a blue square above a white triangle"]


def sample_cli(stages, outdir, *args):
  return run_cli("sample", f"--stages={','.join(stages)}", f"--outdir={outdir}", "--steps=3",
                 "--guidance=3,2", *args, env={"JAX_PLATFORMS": "cpu"})


def pixels(outdir, name):
  return np.asarray(Image.open(os.path.join(outdir, name)))


@pytest.fixture(scope="module")
def cascade(tiny_cascade):
  return cascade_lib.Cascade.from_workdirs(tiny_cascade)


@pytest.mark.slow
def test_command_writes_pngs_grid_and_jsonl(tiny_cascade, tmp_path):
  out = tmp_path / "out"
  result = sample_cli(tiny_cascade, out, *[f"--prompt={p}" for p in PROMPTS],
                      "--num_samples=2", "--seed=7", "--save_stages", "--sampler=unipc,ddim",
                      "--spacing=logsnr", "--guidance_interval=0.3:5,all")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(out / "samples.jsonl")]
  assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(4)]
  assert [r["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  assert all(r["seed"] == 7 for r in records)
  assert [s["guidance"] for s in records[0]["stages"]] == [3.0, 2.0]
  assert [s["steps"] for s in records[0]["stages"]] == [3, 3]
  assert [(s["sampler"], s["spacing"], s["guidance_interval"]) for s in records[0]["stages"]] == [
      ("unipc", "logsnr", [0.3, 5.0]), ("ddim", "logsnr", [])]
  for r in records:
    assert pixels(out, r["file"]).shape == (32, 32, 3)
    assert pixels(out / "stages", f"{r['index']:05d}_stage1.png").shape == (16, 16, 3)
  assert pixels(out, "grid.png").shape == (64, 64, 3)  # 4 images, 2 x 2


@pytest.mark.slow
def test_same_seed_same_pixels_other_seed_other_pixels(cascade, tmp_path):
  settings = outdir_lib.stage_settings(cascade, steps=["3"], guidance=["3"])
  prompts = [{"prompt": p} for p in PROMPTS]
  outdir_lib.sample_to_outdir(cascade, prompts, str(tmp_path / "a"), seed=1, settings=settings, show_progress=False)
  outdir_lib.sample_to_outdir(cascade, prompts, str(tmp_path / "b"), seed=1, settings=settings, show_progress=False)
  outdir_lib.sample_to_outdir(cascade, prompts, str(tmp_path / "c"), seed=2, settings=settings, show_progress=False)
  for name in ("00000.png", "00001.png"):
    np.testing.assert_array_equal(pixels(tmp_path / "a", name), pixels(tmp_path / "b", name))
    assert np.abs(pixels(tmp_path / "a", name).astype(int)
                  - pixels(tmp_path / "c", name).astype(int)).max() > 0


@pytest.mark.slow
def test_each_call_gets_its_own_progress_from_one_compiled_sampler(cascade):
  settings = outdir_lib.stage_settings(cascade, steps=["2"])
  reports, compiled = [[], []], []
  for seen in reports:
    cascade.sample(PROMPTS[:1], settings=settings, progress=lambda *a, seen=seen: seen.append(a))
    compiled.append(len(cascade._compiled))  # pylint: disable=protected-access
  # (stage, step, steps): every step of both stages, reported to the call that ran them.
  assert sorted(reports[0]) == sorted(reports[1]) == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]
  assert compiled[1] == compiled[0]  # the second call compiled nothing


@pytest.mark.slow
def test_rerun_with_more_prompts_samples_only_new_images(cascade, tmp_path):
  settings = outdir_lib.stage_settings(cascade, steps=["2"])
  out = str(tmp_path / "out")
  outdir_lib.sample_to_outdir(cascade, [{"prompt": PROMPTS[0]}], out, settings=settings, show_progress=False)
  first = os.path.getmtime(os.path.join(out, "00000.png"))
  before = pixels(out, "00000.png")
  records = outdir_lib.sample_to_outdir(cascade, [{"prompt": p} for p in PROMPTS], out, settings=settings,
                        show_progress=False)
  assert len(records) == 2
  assert os.path.getmtime(os.path.join(out, "00000.png")) == first
  np.testing.assert_array_equal(pixels(out, "00000.png"), before)
  assert len(open(os.path.join(out, "samples.jsonl")).readlines()) == 2
  # An image sampled alone equals the same index sampled in a batch (per-image keys).
  alone = str(tmp_path / "alone")
  outdir_lib.sample_to_outdir(cascade, [{"prompt": p} for p in PROMPTS], alone, settings=settings,
              batch_size=1, show_progress=False)
  np.testing.assert_array_equal(pixels(alone, "00001.png"), pixels(out, "00001.png"))
  with pytest.raises(outdir_lib.SampleError, match="new --outdir"):
    outdir_lib.sample_to_outdir(cascade, [{"prompt": "a green circle at the center"}], out, settings=settings,
                show_progress=False)


@pytest.mark.slow
def test_an_outdir_on_gcs_holds_the_same_images_and_resumes(cascade, tmp_path, gcs_emulator,
                                                           monkeypatch):
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  settings = outdir_lib.stage_settings(cascade, steps=["2"])
  remote = "gs://imagen-test/samples-run"
  outdir_lib.sample_to_outdir(cascade, [{"prompt": PROMPTS[0]}], remote, settings=settings, show_progress=False)
  records = outdir_lib.sample_to_outdir(cascade, [{"prompt": p} for p in PROMPTS], remote, settings=settings,
                        show_progress=False)  # resumes: only the second image is new
  local = str(tmp_path / "local")
  outdir_lib.sample_to_outdir(cascade, [{"prompt": p} for p in PROMPTS], local, settings=settings,
              show_progress=False)
  assert outdir_lib.read_records(remote) == outdir_lib.read_records(local) == records
  assert fileio.listdir(remote) == ["00000.png", "00001.png", "grid.png", "samples.jsonl"]
  for name in ("00000.png", "00001.png", "grid.png"):
    np.testing.assert_array_equal(images_lib.read_png(f"{remote}/{name}"), pixels(local, name))


@pytest.mark.slow
def test_guidance_one_is_the_conditional_sampler(cascade):
  base = cascade.stages[0]
  settings = [stage_sampler.StageSettings.from_config(base.config.sample, sampler="ddim", steps=4,
                                                guidance=1.0, threshold="static", eta=0.0,
                                                spacing="time")]
  one_stage = cascade_lib.Cascade(cascade.stages[:1], cascade.text_encoder, cascade.mesh)
  got = one_stage.sample(PROMPTS, seed=3, settings=settings)[0]
  # The conditional sampler written out by hand: model -> eps -> x0, no unconditional pass.
  emb, mask = cascade.text_encoder.encode(PROMPTS)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(stage_sampler.image_keys(3, np.arange(2)))
  noise_key, _, sample_key = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
                              for i in range(3))
  noise = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 3)))(noise_key)
  model_fn = lambda z, log_snr: base.model.apply({"params": base.params}, z, log_snr, emb, mask)
  out = samplers.ddpm_or_ddim(samplers.denoiser(model_fn, "eps"), noise, sample_key,
                              num_steps=4, log_snr_fn=schedules.cosine_log_snr,
                              threshold_fn=thresholding.static_threshold, eta=0.0)
  expected = np.asarray(jnp.round((jnp.clip(out, -1, 1) + 1) * 127.5)).astype(np.uint8)
  assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
  assert 0 < got.mean() < 255  # not a blank image: the comparison has something to compare


@pytest.mark.slow
def test_chain_check_rejects_mismatches(tiny_cascade, tmp_path):
  base, sr = tiny_cascade
  with pytest.raises(cascade_lib.ChainError, match="wrong order"):
    cascade_lib.Cascade.from_workdirs([sr, base])
  with pytest.raises(cascade_lib.ChainError, match="low-res"):
    cascade_lib.Cascade.from_workdirs([base, sr, sr])
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    cascade_lib.Cascade.from_workdirs([str(tmp_path / "empty")])


@pytest.mark.parametrize("args,message", [
    ([], "no prompts"),
    (["--prompt=x", "--guidance=1,2,3"], "--guidance has 3 values for 2 stages"),
    (["--prompt=x", "--steps=1,2,3"], "--steps has 3 values"),
])
@pytest.mark.slow
def test_bad_input_fails_before_compute(tiny_cascade, tmp_path, args, message):
  out = run_cli("sample", f"--stages={','.join(tiny_cascade)}", f"--outdir={tmp_path}", *args,
                timeout=300)
  assert out.returncode != 0
  assert message in out.stderr
  assert not os.path.exists(tmp_path / "samples.jsonl")


@pytest.mark.slow
def test_empty_and_overlong_prompts(cascade, tmp_path):
  long_prompt = " ".join(["a red circle"] * 20)  # far past max_length 16: truncated with a warning
  settings = outdir_lib.stage_settings(cascade, steps=["2"])
  records = outdir_lib.sample_to_outdir(cascade, [{"prompt": ""}, {"prompt": long_prompt}], str(tmp_path),
                        settings=settings, show_progress=False)
  assert [r["prompt"] for r in records] == ["", long_prompt]
  assert pixels(tmp_path, "00001.png").shape == (32, 32, 3)


@pytest.mark.slow
def test_notebook_runs_end_to_end(tiny_cascade, tiny_lora, tmp_path):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(REPO, "notebooks", "sampling.ipynb"), as_version=4)
  # The base stage as a LoRA workdir of `imagen-jax finetune`, its adapters at half weight.
  env = dict(IMAGEN_STAGES=f"{tiny_lora['workdir']},{tiny_cascade[1]}", IMAGEN_STEPS="3",
             IMAGEN_LORA_SCALE="0.5",
             IMAGEN_OUTDIR=str(tmp_path / "nb"), IMAGEN_NUM_SAMPLES="1",
             IMAGEN_SAMPLER="dpmpp_2m,unipc", IMAGEN_GUIDANCE_INTERVAL="0.3:5,all",
             IMAGEN_EDIT_OUTDIR=str(tmp_path / "edits"))
  os.environ.update(env)
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for key in env:
      os.environ.pop(key)
  stages = outdir_lib.read_records(str(tmp_path / "nb"))[0]["stages"]
  assert [(s["sampler"], s["guidance_interval"]) for s in stages] == [
      ("dpmpp_2m", [0.3, 5.0]), ("unipc", [])]
  assert stages[0]["lora"] == {"base": tiny_cascade[0], "base_step": 2, "scale": 0.5}
  assert "lora" not in stages[1]
  grid = pixels(tmp_path / "nb", "grid.png")
  assert grid.shape == (32, 64, 3)  # two prompts, one 32x32 image each, side by side
  # The edit section inpaints the centre of the first sample and keeps the rest exactly.
  edit_record = outdir_lib.read_records(str(tmp_path / "edits"))[0]
  assert edit_record["edit"]["mode"] == "inpaint"
  source, edited = pixels(tmp_path / "nb", "00000.png"), pixels(tmp_path / "edits", "00000.png")
  outside = np.ones((32, 32), bool)
  outside[8:24, 8:24] = False
  np.testing.assert_array_equal(edited[outside], source[outside])
  assert np.abs(edited[~outside].astype(int) - source[~outside]).max() > 0
  shown = [o for cell in notebook.cells if cell.cell_type == "code"
           for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(shown) == 2


def test_notebook_install_cell_installs_this_checkout(tmp_path, monkeypatch):
  """Where imagen_jax does not import yet, the install cell pip-installs the checkout it sits in
  (the end-to-end run above has it installed, so that branch never runs there)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(REPO, "notebooks", "sampling.ipynb"), as_version=4)
  cell = next(c.source for c in notebook.cells
              if c.cell_type == "code" and "pip" in c.source)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "imagen_jax" else real_find_spec(name, *a))
  commands = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
  monkeypatch.delenv("IMAGEN_JAX_REPO", raising=False)
  monkeypatch.chdir(os.path.join(REPO, "notebooks"))  # where Jupyter starts the kernel
  exec(compile(cell, "install cell", "exec"), {})  # pylint: disable=exec-used  (no ! magics)
  assert commands == [[sys.executable, "-m", "pip", "install", "-q", REPO]]
  monkeypatch.setenv("IMAGEN_JAX_REPO", str(tmp_path))  # a folder that is no checkout
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    exec(compile(cell, "install cell", "exec"), {})  # pylint: disable=exec-used
  assert len(commands) == 1
