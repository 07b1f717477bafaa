"""Training: sharding-invariance, exact resume, preemption, faults, logging (8 fake CPU devices)."""

import functools
import glob
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import (  # pylint: disable=g-bad-import-order
    REPO, SMALL_BASE_NET, assert_trees_equal, cli_argv, config_flags, run_cli, short_run_config,
    short_run_settings, start_stopping_after_checkpoint)
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.diffusion import objectives
from imagen_jax.train import train as train_lib

# helpers' short run of a small base stage, 6 steps with checkpoints at 3 and 6 by default.
tiny_config = functools.partial(short_run_config, total_steps=6, checkpoint_every=3)


def read_scalars(workdir, tag):
  """{step: value} of one scalar from the TensorBoard events (tensorboard's own reader)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"),
                                           size_guidance={event_accumulator.SCALARS: 0,
                                                          event_accumulator.IMAGES: 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars(tag)}


def params_of(workdir, step=None):
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  restored = ckpt.restore_as_stored(step)
  return restored["state"], restored["data"]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_loss_trajectory_is_the_same_on_every_mesh(tmp_path, shapes_data_dir):
  losses = {}
  # Pure data parallelism (8x1x1) is the data axis of these two meshes and is left out: each
  # mesh is a compile of its own.
  for name, mesh, ndev in [("1dev", (1, 1, 1), 1), ("2x4x1", (2, 4, 1), 8),
                           ("2x2x2", (2, 2, 2), 8)]:
    # The narrow 16x16 net compiles in half the time; its widths (16-64) still split over
    # every mesh axis here.
    config = tiny_config(**{**SMALL_BASE_NET, "data.data_dir": shapes_data_dir,
                            "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.model": mesh[2],
                            "total_steps": 4, "checkpoint_every": 100})
    workdir = str(tmp_path / name)
    train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:ndev])
    losses[name] = read_scalars(workdir, "loss")
  reference = losses.pop("1dev")
  assert sorted(reference) == [1, 2, 3, 4]
  for name, trajectory in losses.items():
    for step, value in reference.items():
      assert trajectory[step] == pytest.approx(value, rel=1e-5), (name, step)


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_2(tmp_path, shapes_data_dir):
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "mesh.data": 2, "mesh.fsdp": 4,
                          "total_steps": 2, "checkpoint_every": 2})
  workdir = str(tmp_path / "w")
  final = train_lib.train_and_evaluate(config, workdir)
  config.mesh.fsdp = 1
  restored = train_lib.restore_state(config, workdir, devices=jax.devices()[:2])
  assert int(restored.step) == 2
  assert_trees_equal(jax.device_get(restored.params), jax.device_get(final.params))
  leaf = jax.tree_util.tree_leaves(restored.params)[0]
  assert len(leaf.sharding.device_set) == 2


@pytest.mark.slow
def test_injected_nan_stops_naming_the_step(tmp_path, shapes_data_dir):
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 8,
                          "checkpoint_every": 2, "log_every": 4, "debug.nan_at_step": 4})
  workdir = str(tmp_path / "w")
  with pytest.raises(train_lib.TrainingError, match="step 5"):
    train_lib.train_and_evaluate(config, workdir)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2, 4]  # step 4's checkpoint was written before the NaN
  state, _ = params_of(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))


@pytest.mark.slow
def test_nonfinite_skip_mode_counts_and_continues(tmp_path, shapes_data_dir):
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 4,
                          "debug.nan_at_step": 1, "nonfinite": "skip"})
  workdir = str(tmp_path / "w")
  final = train_lib.train_and_evaluate(config, workdir)
  assert int(final.skipped_updates) == 1
  assert read_scalars(workdir, "skipped_updates")[4] == 1


def test_bad_config_fails_before_compiling_naming_the_value(tmp_path, shapes_data_dir):
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "batch_size": 12})
  with pytest.raises(config_lib.ConfigError, match="batch_size=12"):
    train_lib.train_and_evaluate(config, str(tmp_path / "w"))  # 12 over 8 devices
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(train_lib.TrainingError, match="not writable"):
    train_lib.train_and_evaluate(tiny_config(**{"data.data_dir": shapes_data_dir}),
                                 str(blocker / "sub"))


def _train_flags(workdir, data_dir, **overrides):
  """`imagen-jax train` flags of helpers' short run, with `overrides`."""
  return ["--config=configs/base64.py:tiny", f"--workdir={workdir}",
          *config_flags(short_run_settings(data_dir, **overrides))]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{proc.stderr.read()[-3000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.2)


def _complete_checkpoints(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly(tmp_path, shapes_data_dir):
  n = 3
  straight = str(tmp_path / "straight")
  args = {"total_steps": 6, "checkpoint_every": n}
  run_cli("train", *_train_flags(straight, shapes_data_dir, **args), env=_env(), check=True)
  killed = str(tmp_path / "killed")
  # The run stops once its checkpoint at step n is complete: the kill lands between n and 2n.
  [proc] = start_stopping_after_checkpoint([_train_flags(killed, shapes_data_dir, **args)],
                                           killed, n, _env())
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert _complete_checkpoints(killed) == [n]  # nothing after step n was saved
  rerun = run_cli("train", *_train_flags(killed, shapes_data_dir, **args), env=_env())
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # A rerun that started over would end bitwise equal too: it must have resumed.
  assert f"Resuming from the checkpoint at step {n}" in rerun.stderr
  state_a, data_a = params_of(straight, 2 * n)
  state_b, data_b = params_of(killed, 2 * n)
  assert_trees_equal(state_a, state_b)  # params, EMA params, optimizer state, step: bitwise
  assert data_a == data_b  # the input iterator stands at the same example


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_rerun_continues(tmp_path, shapes_data_dir):
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(
      cli_argv("train", *_train_flags(workdir, shapes_data_dir, total_steps=1000,
                                      checkpoint_every=1000)),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "tb")) and
            len(glob.glob(os.path.join(workdir, "tb", "*"))) > 0, proc)
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
  saved = _complete_checkpoints(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 1000
  out = run_cli("train", *_train_flags(workdir, shapes_data_dir, total_steps=saved[0] + 2,
                                       checkpoint_every=1000), env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {saved[0]}" in out.stderr
  assert _complete_checkpoints(workdir)[-1] == saved[0] + 2


@pytest.mark.slow
def test_stop_at_step_saves_there_and_another_mesh_continues_the_same_run(tmp_path,
                                                                          shapes_data_dir):
  """The demo trains its base stage's first steps on one core, then the rest on every core."""
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 6,
                          "checkpoint_every": 100, "log_every": 1})
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train_lib.train_and_evaluate(config, straight, devices=jax.devices()[:1])
  state = train_lib.train_and_evaluate(config, split, devices=jax.devices()[:1], stop_at_step=4)
  assert int(state.step) == 4 and _complete_checkpoints(split) == [4]
  # The same 4 steps as the straight run's (the schedules are those of total_steps).
  lr_straight = read_scalars(straight, "learning_rate")
  assert read_scalars(split, "learning_rate") == {s: lr_straight[s] for s in range(1, 5)}
  train_lib.train_and_evaluate(config, split, devices=jax.devices()[:2])
  assert _complete_checkpoints(split) == [4, 6]
  assert read_scalars(split, "learning_rate") == lr_straight  # steps 1-6
  state_a, data_a = params_of(straight, 6)
  state_b, data_b = params_of(split, 6)
  assert data_a == data_b  # the input iterator stands at the same example
  assert_trees_close(state_a, state_b, rtol=1e-4, atol=1e-5)  # 1 vs 2 devices: rounding only
  with pytest.raises(config_lib.ConfigError, match="stop_at_step=7"):
    train_lib.train_and_evaluate(config, split, stop_at_step=7)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_tiny_stage_reduces_the_loss_on_shapes(tmp_path, shapes_data_dir, stage):
  # The base stage's loss falls to 0.39 of its first 25 steps' within 100 steps (0.30 in 100 of
  # 200); the SR stage's to 0.67 in 100 and below 0.6 in 200.
  steps = {"base64": 100, "sr256": 200}[stage]
  config = config_lib.load_config(f"configs/{stage}.py:tiny", {
      "data.data_dir": shapes_data_dir, "total_steps": steps, "batch_size": 16, "log_every": 25,
      "checkpoint_every": steps, "optimizer.warmup_steps": 20, "model.stem_patch": 2})
  workdir = str(tmp_path / stage)
  train_lib.train_and_evaluate(config, workdir)
  loss = read_scalars(workdir, "loss")
  assert loss[steps] < 0.6 * loss[25], loss


def loss_on_shapes(workdir, data_dir, steps=60, **overrides):
  """{step: mean loss of the 10 steps up to it} of the tiny stage trained at batch 16 on one
  device: the objective and the optimizer are under test here, not sharding, and one device
  compiles and steps fastest."""
  config = tiny_config(**{"data.data_dir": data_dir, "total_steps": steps, "batch_size": 16,
                          "log_every": 10, "checkpoint_every": steps,
                          "optimizer.warmup_steps": 5, **overrides})
  train_lib.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return read_scalars(str(workdir), "loss")


# optax's Adafactor factors the second moment only of parameters whose two largest dims are
# >= 128: these widths give the tiny net five (the conditioning's 128x128 kernels, FSDP-sharded),
# where its widths of 32 would leave Adafactor nothing to factor.
ADAFACTOR = {"optimizer.name": "adafactor", "model.emb_dim": 128, "model.pool_width": 128}


@pytest.mark.slow
def test_adafactor_reduces_the_loss_on_shapes(tmp_path, shapes_data_dir):
  # Adafactor scales each update by its parameter's RMS (at least 1e-3), so the zero-initialized
  # output layers move by lr * 1e-3 a step: at Adam's lr of 1e-3 the loss would not move in 60.
  loss = loss_on_shapes(tmp_path / "w", shapes_data_dir, **ADAFACTOR, **{"optimizer.lr": 0.1})
  assert loss[60] < 0.6 * loss[10], loss


@pytest.mark.slow
def test_muon_reduces_the_loss_on_shapes(tmp_path, shapes_data_dir):
  # Muon beside Adam (optimizer.name = muon) at Adam's learning rate: its updates are scaled to
  # Adam's RMS, so the same schedule serves; the tiny stage's loss falls as fast as with Adam.
  muon = loss_on_shapes(tmp_path / "muon", shapes_data_dir, **{"optimizer.name": "muon"})
  adam = loss_on_shapes(tmp_path / "adam", shapes_data_dir, **{"optimizer.name": "adam"})
  assert muon[60] < 0.6 * muon[10], muon
  assert muon[60] < 1.2 * adam[60], (muon, adam)


@pytest.mark.slow
def test_edm_objective_reduces_the_loss_on_shapes(tmp_path, shapes_data_dir):
  # The output layer starts at 0: training starts at the loss of the denoiser c_skip * x. At
  # Adam's lr of 1e-3, 60 steps bring it to 0.56 of the first 10 steps' mean, near the bound;
  # at 3e-3 to 0.51.
  loss = loss_on_shapes(tmp_path / "w", shapes_data_dir,
                        **{"diffusion.formulation": "edm", "optimizer.lr": 3e-3})
  assert loss[60] < 0.6 * loss[10], loss


def adafactor_stats(opt_state):
  """The FactoredState (count, v_row, v_col, v) in an Adafactor chain's state."""
  [stats] = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
             if isinstance(s, optax.FactoredState)]
  return stats


def assert_adafactor_stats_follow_their_params(state):
  """Unfactored second moments (shaped like their parameter) have the parameter's sharding; the
  factored row and column statistics and the step count are replicated."""
  stats = adafactor_stats(state.opt_state)
  assert stats.count.sharding.is_fully_replicated
  factored = sharded = 0
  for param, row, col, v in zip(*(jax.tree_util.tree_leaves(t) for t in (
      state.params, stats.v_row, stats.v_col, stats.v)), strict=True):
    if v.shape == param.shape:
      assert v.sharding.is_equivalent_to(param.sharding, param.ndim), (v.sharding, param.sharding)
      sharded += not param.sharding.is_fully_replicated
    else:
      assert row.sharding.is_fully_replicated and col.sharding.is_fully_replicated
      assert row.size > 1 and col.size > 1  # real statistics, not placeholders
      factored += 1
  assert factored and sharded, (factored, sharded)  # both kinds were checked


@pytest.mark.slow
def test_adafactor_on_fsdp_shards_its_stats_and_resumes_exactly(tmp_path, shapes_data_dir,
                                                                caplog):
  config = tiny_config(**{**ADAFACTOR, "data.data_dir": shapes_data_dir, "mesh.data": 2,
                          "mesh.fsdp": 4, "total_steps": 6, "checkpoint_every": 3})
  straight_dir, workdir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  straight = train_lib.train_and_evaluate(config, straight_dir)
  # The run as if killed between its checkpoints at steps 3 and 6.
  shutil.copytree(straight_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  with caplog.at_level(logging.INFO, logger="absl"):
    resumed = train_lib.train_and_evaluate(config, workdir)
  # A rerun that started over would end bitwise equal too: it must have resumed.
  assert "Resuming from the checkpoint at step 3" in caplog.text
  assert_adafactor_stats_follow_their_params(resumed)
  assert_adafactor_stats_follow_their_params(train_lib.restore_state(config, workdir))
  assert_trees_equal(jax.device_get(resumed), jax.device_get(straight))


def noise_fixed_by_pixels(key, x, log_snr_fn):
  """objectives.corrupt with t and eps functions of each example's pixels, not draws from `key`.

  Accumulation draws each micro-batch's noise from its own key, so its noise differs from that
  of one big batch; with the noise fixed per example, both steps take the mean over the same
  per-example losses, and must agree up to the order of float sums.
  """
  del key
  t = 0.5 + 0.4 * jnp.tanh(4.0 * jnp.mean(x, axis=(1, 2, 3)))
  eps = jnp.sin(50.0 * x)
  log_snr = log_snr_fn(t)
  return objectives.q_sample(x, eps, log_snr), log_snr, eps


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(tmp_path, shapes_data_dir, monkeypatch):
  monkeypatch.setattr(objectives, "corrupt", noise_fixed_by_pixels)
  runs = {}
  for accum in (1, 4):
    # Batch 8 on 2 devices: 4 micro-batches of 2, one example per device. No condition dropout
    # (drawn per micro-batch too).
    config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 2,
                            "checkpoint_every": 2, "cond_drop_rate": 0.0,
                            "optimizer.grad_accum_steps": accum})
    workdir = str(tmp_path / f"accum{accum}")
    state = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
    runs[accum] = (jax.device_get(state), {tag: read_scalars(workdir, tag)
                                           for tag in ("loss", "grad_norm")})
  (one, one_scalars), (four, four_scalars) = runs[1], runs[4]
  # Adam's steps barely depend on the gradient's scale: the loss and the gradient norm catch a
  # sum where a mean belongs, or a micro-batch counted twice.
  for tag, by_step in one_scalars.items():
    for step in (1, 2):
      assert four_scalars[tag][step] == pytest.approx(by_step[step], rel=1e-5), (tag, step)
  assert_trees_close(four, one)  # params, EMA params, optimizer state


def test_metrics_merged_in_one_dispatch_average_like_clus_own_merge():
  from imagen_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def step_metrics(i):
    return step_lib.TrainMetrics.single_from_model_output(
        loss=jnp.float32(rng.random()), grad_norm=jnp.float32(rng.random()),
        param_norm=jnp.float32(10 + i), learning_rate=jnp.float32(i / 10),
        skipped_updates=jnp.int32(i // 2), per_example=jnp.asarray(rng.random(8), jnp.float32),
        quartile=jnp.asarray(rng.integers(0, 4, 8)))

  steps = [step_metrics(i) for i in range(5)]
  merged, expected = steps[0], steps[0]
  for m in steps[1:]:
    merged, expected = train_lib.merge_metrics(merged, m), expected.merge(m)
  got, want = merged.compute(), expected.compute()
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6, err_msg=key)
  assert float(got["param_norm"]) == 14 and float(got["learning_rate"]) == np.float32(0.4)


@pytest.mark.slow
def test_events_hold_scalars_and_a_sample_grid(tmp_path, shapes_data_dir):
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 2, "log_every": 2,
                          "sample_every": 2, "sample.steps": 3, "sample.num_images": 2})
  workdir = str(tmp_path / "w")
  train_lib.train_and_evaluate(config, workdir)
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"),
                                           size_guidance={event_accumulator.IMAGES: 0})
  acc.Reload()
  tags = acc.Tags()
  for scalar in ("loss", "loss_q1", "loss_q4", "grad_norm", "param_norm", "learning_rate",
                 "images_per_sec", "steps_per_sec", "tflops_per_device", "mfu"):
    assert scalar in tags["scalars"], scalar
  assert all(np.isfinite(e.value) for e in acc.Scalars("loss"))
  image = acc.Images("samples")[0]
  assert image.step == 2 and image.width == 2 * 16 and image.height == 16
  assert os.path.exists(os.path.join(workdir, "config.json"))


@pytest.mark.slow
def test_gcs_workdir_trains_checkpoints_resumes_and_logs(gcs_emulator, shapes_data_dir,
                                                        monkeypatch):
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  workdir = "gs://imagen-test/train-run"
  config = tiny_config(**{"data.data_dir": shapes_data_dir, "total_steps": 2,
                          "checkpoint_every": 2, "log_every": 1})
  train_lib.train_and_evaluate(config, workdir)
  config.total_steps = 4
  state = train_lib.train_and_evaluate(config, workdir)  # resumes from the step-2 checkpoint
  assert int(state.step) == 4
  assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
  restored_config, step = checkpoints.restore_config(workdir)
  assert step == 4 and restored_config.total_steps == 4
  loss = read_scalars(workdir, "loss")
  assert sorted(loss) == [1, 2, 3, 4]
  from etils import epath  # pylint: disable=g-import-not-at-top
  assert '"total_steps": 4' in epath.Path(workdir, "config.json").read_text()
