"""DeepFloyd IF's cascade in imagen-jax: the discrete schedule, the samplers against diffusers'
schedulers, noise augmentation, conversion both ways (bit for bit), and the README's commands
on a tiny random IF pipeline (import, sample, edit, LoRA fine-tune, export).

The pipelines are tiny IF-shaped `UNet2DConditionModel`s with perturbed weights, saved by
diffusers with their DDPMScheduler; the text encoder is the builtin shapes T5 in Hugging Face's
format, standing in for T5 v1.1 XXL.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import commands
from imagen_jax import models
from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import noise as noise_lib
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import thresholding
from imagen_jax.interop import diffusers_format
from imagen_jax.interop import if_stage
from imagen_jax.sample import network
from imagen_jax.text import builtin

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.diffusers

TEXT_WIDTH = 64  # the builtin shapes encoder's
_COMMON = dict(out_channels=6, cross_attention_dim=32, encoder_hid_dim=TEXT_WIDTH,
               attention_head_dim=16, addition_embed_type="text",
               addition_embed_type_num_heads=4, cross_attention_norm="group_norm",
               resnet_time_scale_shift="scale_shift", act_fn="gelu",
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=8)
BASE = dict(_COMMON, in_channels=3, sample_size=16, block_out_channels=[16, 32],
            layers_per_block=1,
            down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])
SR = dict(_COMMON, in_channels=6, sample_size=32, block_out_channels=[16, 16, 32],
          layers_per_block=[1, 1, 2],
          down_block_types=["ResnetDownsampleBlock2D"] * 2 + ["SimpleCrossAttnDownBlock2D"],
          up_block_types=["SimpleCrossAttnUpBlock2D"] + ["ResnetUpsampleBlock2D"] * 2,
          class_embed_type="timestep", time_embedding_dim=32, time_embedding_act_fn="gelu",
          resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
          mid_block_scale_factor=1 / 0.7071)
# IF-I's scheduler (IF-II's the same, sample_max_value 1.0): epsilon, learned-range variance,
# dynamic thresholding.
SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                 variance_type="learned_range", prediction_type="epsilon", thresholding=True,
                 dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True)


def write_pipeline(path, unet_config, seed=0):
  """A diffusers IF pipeline directory: unet/, scheduler/ (+ image_noising_scheduler/ for SR),
  text_encoder/ and tokenizer/ (the shapes T5). Returns its path."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**unet_config)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.1 * torch.randn_like(p))
  unet.eval().save_pretrained(os.path.join(path, "unet"))
  diffusers.DDPMScheduler(**SCHEDULER).save_config(os.path.join(path, "scheduler"))
  if unet_config["in_channels"] == 6:
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_config(
        os.path.join(path, "image_noising_scheduler"))
  encoder = builtin.resolve("builtin:shapes-tiny")
  shutil.copytree(encoder, os.path.join(path, "text_encoder"))
  os.makedirs(os.path.join(path, "tokenizer"))
  shutil.move(os.path.join(path, "text_encoder", "spiece.model"),
              os.path.join(path, "tokenizer", "spiece.model"))
  return str(path)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  root = tmp_path_factory.mktemp("if")
  return {"base": write_pipeline(root / "IF-I", BASE, 0), "sr": write_pipeline(root / "IF-II", SR, 1)}


@pytest.fixture(scope="module")
def stages(pipelines, tmp_path_factory):
  """{name: (workdir, config, network, params)} imported with the Python API."""
  root = tmp_path_factory.mktemp("stages")
  out = {}
  for name, pipeline in pipelines.items():
    workdir = str(root / name)
    if_stage.import_stage(os.path.join(pipeline, "unet"), workdir, lowres_size=16)
    config, params = if_stage.network_params(workdir)
    out[name] = (workdir, config, models.build_model(config), params)
  return out


# --- The schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule,ours", [("squaredcos_cap_v2", "cosine"),
                                                ("linear", "linear")])
def test_discrete_schedule_is_diffusers(beta_schedule, ours):
  theirs = diffusers.DDPMScheduler(beta_schedule=beta_schedule).alphas_cumprod.numpy()
  np.testing.assert_allclose(schedules.discrete_alphas_cumprod(ours, 1000), theirs, rtol=2e-6)
  schedule = schedules.DiscreteSchedule(ours, 1000)
  levels = np.log(theirs) - np.log1p(-theirs)
  k = np.array([0, 1, 250, 500, 998, 999])
  np.testing.assert_allclose(np.asarray(schedule(jnp.asarray((k + 1) / 1000, jnp.float32))),
                             levels[k], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(schedule.timestep(jnp.asarray(levels[k], jnp.float32))),
                             k, atol=2e-3)


@pytest.mark.parametrize("spacing,steps", [("leading", 100), ("leading", 27), ("trailing", 50)])
def test_step_grid_is_diffusers_timesteps(spacing, steps):
  scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
  scheduler.set_timesteps(steps)
  schedule = schedules.DiscreteSchedule("cosine", 1000)
  grid = schedules.log_snr_grid(steps, schedule, {"trailing": "time"}.get(spacing, spacing))
  assert grid.shape == (steps + 1,) and grid[-1] == schedules.LOG_SNR_MAX
  np.testing.assert_array_equal(grid[:-1], schedule.log_snrs[scheduler.timesteps.numpy()])


def test_noise_augmentation_is_if_pipelines(stages):
  _, config, _, _ = stages["sr"]
  rng = np.random.default_rng(0)
  low = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  ours, aug_log_snr = augmentation.augment_lowres(config, key, jnp.asarray(low),
                                                  jnp.full((2,), config.sample.aug_level))
  noise = np.asarray(noise_lib.normal(key, (2, 32, 32, 3)))
  up = torch.nn.functional.interpolate(torch.from_numpy(low.transpose(0, 3, 1, 2)), (32, 32),
                                       mode="bilinear", align_corners=True)
  noising = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
  theirs = noising.add_noise(up, torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                             torch.tensor([250, 250])).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)
  schedule = schedules.DiscreteSchedule("cosine", 1000)
  np.testing.assert_allclose(np.asarray(schedule.timestep(aug_log_snr)), [250, 250], atol=1e-3)


# --- Sampling against diffusers' schedulers ----------------------------------------------------

def _text(batch=2, length=8, seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((batch, length, TEXT_WIDTH)).astype(np.float32)
  null = np.repeat(rng.standard_normal((1, length, TEXT_WIDTH)).astype(np.float32), batch, 0)
  return emb, null


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("name", ["base", "sr"])
def test_sampler_matches_diffusers(stages, pipelines, name, sampler, monkeypatch):
  """The converted stage's DDPM (learned-range variance) and DDIM trajectories, guided and
  thresholded as IF's pipelines do, equal diffusers' from the same initial and per-step noise."""
  workdir, config, model, params = stages[name]
  steps, weight, batch = 6, 4.0, 2
  size = config.image_size
  emb, null = _text(batch)
  mask = np.ones(emb.shape[:2], bool)
  lowres, aug_log_snr, torch_lowres, labels = None, None, None, None
  if name == "sr":
    rng = np.random.default_rng(1)
    lowres = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    aug_log_snr = jnp.full((batch,), schedules.DiscreteSchedule("cosine", 1000).log_snrs[250])
    torch_lowres = torch.from_numpy(np.asarray(lowres).transpose(0, 3, 1, 2))
    labels = torch.tensor([250] * batch)
  settings = stage_sampler.StageSettings.from_config(config.sample, sampler=sampler, steps=steps,
                                                     guidance=weight, eta=0.0)
  x0_fn = stage_sampler.x0_denoiser(config, model, params, jnp.asarray(emb), jnp.asarray(mask),
                                    weight, lowres, aug_log_snr,
                                    null_text=(jnp.asarray(null), jnp.asarray(mask)))
  key = jax.random.PRNGKey(7)
  init = noise_lib.normal(jax.random.PRNGKey(8), (batch, size, size, 3))
  ours = samplers.solve(
      x0_fn, init, key, sampler=sampler, num_steps=steps,
      log_snr_fn=schedules.stage_log_snr_fn(config.diffusion), eta=0.0,
      spacing=settings.spacing, threshold_fn=thresholding.get_threshold_fn(
          settings.threshold, settings.percentile, settings.threshold_max))

  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(pipelines[name], "unet"))
  scheduler_cls = diffusers.DDPMScheduler if sampler == "ddpm" else diffusers.DDIMScheduler
  scheduler = scheduler_cls.from_pretrained(os.path.join(pipelines[name], "scheduler"))
  scheduler.set_timesteps(steps)
  fresh = iter([np.asarray(noise_lib.normal(noise_lib.fold_in(key, k), init.shape))
                for k in range(steps)])
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                      lambda *a, **kw: torch.from_numpy(next(fresh).transpose(0, 3, 1, 2)))
  x = torch.from_numpy(np.asarray(init).transpose(0, 3, 1, 2))
  text = torch.from_numpy(np.concatenate([emb, null]))
  with torch.no_grad():
    for t in scheduler.timesteps:
      model_input = torch.cat([x, x])
      if torch_lowres is not None:
        model_input = torch.cat([model_input, torch.cat([torch_lowres] * 2)], dim=1)
      out = unet(model_input, t, encoder_hidden_states=text,
                 class_labels=None if labels is None else torch.cat([labels] * 2)).sample
      cond, uncond = out.chunk(2)
      eps = uncond[:, :3] + weight * (cond[:, :3] - uncond[:, :3])
      # DDPM reads the conditional half's variance; DDIM the noise alone, re-derived from the
      # thresholded x0 as ours is (diffusers' use_clipped_model_output).
      if sampler == "ddpm":
        x = scheduler.step(torch.cat([eps, cond[:, 3:]], dim=1), t, x).prev_sample
      else:
        x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample
  theirs = x.numpy().transpose(0, 2, 3, 1)
  scale = float(np.abs(theirs).max())
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-3 * scale)
  assert float(np.std(theirs)) > 0.05  # not a degenerate trajectory


# --- Conversion ---------------------------------------------------------------------------------

def test_import_then_export_is_bit_exact(stages, pipelines, tmp_path):
  import safetensors.numpy
  for name, (workdir, config, _, _) in stages.items():
    out = tmp_path / name / "unet"
    if_stage.export_stage(workdir, str(out))
    before = safetensors.numpy.load_file(
        os.path.join(pipelines[name], "unet", diffusers_format.WEIGHTS_NAME))
    after = safetensors.numpy.load_file(str(out / diffusers_format.WEIGHTS_NAME))
    assert before.keys() == after.keys()
    for key in before:
      np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    scheduler = json.loads((tmp_path / name / "scheduler" / "scheduler_config.json").read_text())
    original = diffusers.DDPMScheduler.from_pretrained(os.path.join(pipelines[name], "scheduler"))
    exported = diffusers.DDPMScheduler.from_config(scheduler)
    for key in ("beta_schedule", "num_train_timesteps", "variance_type", "prediction_type",
                "thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
      assert exported.config[key] == original.config[key], key


def test_imported_config_comes_from_the_files(stages):
  _, base, _, _ = stages["base"]
  _, sr, _, _ = stages["sr"]
  assert (base.stage, base.image_size, sr.stage, sr.image_size, sr.lowres.size) == (
      "base", 16, "sr", 32, 16)
  assert base.diffusion.timesteps == 1000 and base.diffusion.variance == "learned_range"
  assert (base.sample.threshold, base.sample.percentile, base.sample.threshold_max) == (
      "dynamic", 95.0, 1.5)
  assert base.sample.spacing == "leading" and sr.sample.aug_level == pytest.approx(0.251)
  assert base.text.encoder.endswith(os.path.join("IF-I", "text_encoder"))
  assert (base.text.null, base.text.pad_outputs, base.text.max_length) == (
      "empty_prompt", "keep", 77)


def test_unsupported_settings_are_refused_by_name(pipelines, tmp_path):
  pipeline = tmp_path / "pipe"
  shutil.copytree(pipelines["base"], pipeline)
  scheduler = pipeline / "scheduler" / "scheduler_config.json"
  values = json.loads(scheduler.read_text())
  scheduler.write_text(json.dumps(dict(values, beta_schedule="scaled_linear")))
  with pytest.raises(if_stage.ConvertError, match="beta_schedule='scaled_linear'"):
    if_stage.import_stage(str(pipeline / "unet"), str(tmp_path / "w1"))
  scheduler.write_text(json.dumps(dict(values, variance_type="learned")))
  with pytest.raises(if_stage.ConvertError, match="variance_type='learned'"):
    if_stage.import_stage(str(pipeline / "unet"), str(tmp_path / "w2"))
  scheduler.write_text(json.dumps(values))
  unet_config = pipeline / "unet" / "config.json"
  unet_config.write_text(json.dumps(dict(json.loads(unet_config.read_text()), in_channels=4)))
  with pytest.raises(ValueError, match="in_channels"):
    if_stage.import_stage(str(pipeline / "unet"), str(tmp_path / "w3"))
  assert not (tmp_path / "w3").exists() or not os.listdir(tmp_path / "w3" / "checkpoints")


# --- The README's commands, as typed --------------------------------------------------------------

def test_commands_import_sample_edit_finetune_export(pipelines, tmp_path):
  """convert both stages, sample and inpaint the cascade, LoRA-fine-tune the base on two
  images, export it merged: diffusers loads the export and reproduces our network's outputs."""
  for name, pipeline in pipelines.items():
    shutil.copytree(pipeline, tmp_path / name)
  def run(*args):
    out = commands.run_cli(*args, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, f"imagen-jax {' '.join(args)}:\n{out.stderr[-3000:]}"
    return out

  run("convert", "--from=diffusers", "--unet=base/unet", "--workdir=if_base")
  run("convert", "--from=diffusers", "--unet=sr/unet", "--workdir=if_sr", "--lowres_size=16",
      "--text_encoder=base/text_encoder")  # the cascade's stages read one encoder
  run("sample", "--stages=if_base,if_sr", "--prompt=a red circle at the center",
      "--num_samples=2", "--outdir=out", "--steps=4,3")
  from PIL import Image
  images = [np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(2)]
  assert all(image.shape == (32, 32, 3) for image in images)
  assert not np.array_equal(images[0], images[1]) and np.std(images[0]) > 1
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255
  Image.fromarray(images[0]).save(tmp_path / "in.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  run("edit", "--mode=inpaint", "--stages=if_base,if_sr", "--image=in.png", "--mask=mask.png",
      "--prompt=a blue square at the center", "--outdir=edited", "--steps=4,3")
  edited = np.asarray(Image.open(tmp_path / "edited" / "00000.png"))
  keep = mask == 0
  assert np.abs(edited[keep].astype(int) - images[0][keep]).mean() < 12
  assert np.abs(edited[~keep].astype(int) - images[0][~keep]).mean() > 2
  subject = tmp_path / "subject"
  subject.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image[::2, ::2]).save(subject / f"{i}.png")
    (subject / f"{i}.txt").write_text("a blicket at the center")
  run("finetune", "--config=if_base/config.py:finetune", "--base=if_base", "--workdir=if_lora",
      "--config.data.source=folder:subject", "--config.total_steps=3", "--config.batch_size=8",
      "--config.checkpoint_every=3", "--config.log_every=1")
  run("convert", "--to=diffusers", "--workdir=if_lora", "--out=exported/unet")
  config, params = if_stage.network_params(str(tmp_path / "if_lora"))
  _, base_params = if_stage.network_params(str(tmp_path / "if_base"))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params, base_params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the adapters changed the network
  unet = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "exported" / "unet"))
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  text = rng.standard_normal((2, 77, TEXT_WIDTH)).astype(np.float32)
  ours = models.build_model(config).apply(
      {"params": params}, jnp.asarray(sample),
      schedules.DiscreteSchedule("cosine", 1000)(jnp.array([0.301, 0.801])), jnp.asarray(text),
      jnp.ones((2, 77), bool))
  with torch.no_grad():
    theirs = unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.tensor([300.0, 800.0]),
                  encoder_hidden_states=torch.from_numpy(text)).sample
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * float(np.abs(theirs).max()))


def test_stage_network_entry_point_matches_diffusers(stages, pipelines):
  """network.StageNetwork: diffusers' inputs (timestep, the noised up-sampled low-res image, its
  class label) give diffusers' output."""
  workdir, _, _, _ = stages["sr"]
  net = network.StageNetwork.from_workdir(workdir)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  low = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  text = rng.standard_normal((2, 9, TEXT_WIDTH)).astype(np.float32)
  ours = net(x, timestep=np.array([999, 37]), text_emb=text, lowres=low,
             aug_timestep=np.array([250, 100]))
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(pipelines["sr"], "unet"))
  with torch.no_grad():
    theirs = unet(torch.from_numpy(np.concatenate([x, low], -1).transpose(0, 3, 1, 2)),
                  torch.tensor([999, 37]), encoder_hidden_states=torch.from_numpy(text),
                  class_labels=torch.tensor([250, 100])).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * float(np.abs(theirs).max()))
  with pytest.raises(ValueError, match="aug_log_snr= or aug_timestep="):
    net(x, timestep=np.array([1, 2]), text_emb=text, lowres=low)


@pytest.mark.parametrize("sampler", ["ddim", "edm_heun", "dpmpp_2m", "unipc"])
def test_every_sampler_and_edit_runs_on_an_imported_stage(stages, sampler):
  """The framework's other samplers, a guidance interval and image-to-image on IF's network:
  finite images in range that depend on the prompt."""
  _, config, model, params = stages["base"]
  emb, null = _text(2)
  mask = np.ones(emb.shape[:2], bool)
  keys = stage_sampler.image_keys(0, [0, 1])
  settings = stage_sampler.StageSettings.from_config(
      config.sample, sampler=sampler, steps=4, guidance_interval=(0.2, 50.0))
  run = lambda e, **kw: np.asarray(stage_sampler.sample_stage(
      config, model, params, keys, jnp.asarray(e), jnp.asarray(mask), settings,
      null_text=(jnp.asarray(null), jnp.asarray(mask)), **kw))
  images = run(emb)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  assert np.abs(images).max() <= 1.0 and np.std(images) > 0.05
  assert np.abs(run(emb[::-1]) - images[::-1]).max() > 0  # each image follows its text only
  init = np.clip(images[::-1], -1, 1)
  edited = run(emb, image=jnp.asarray(init), start=0.3)
  assert np.abs(edited - init).mean() < np.abs(images - init).mean()
