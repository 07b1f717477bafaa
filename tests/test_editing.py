"""Editing in the samplers (image-to-image, inpainting, RePaint's jumps) against exact denoisers,
and the host side of `imagen-jax edit` (inputs, masks, sizes, errors)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_diffusion import MU, STD, gaussian_x0_fn  # pylint: disable=g-bad-import-order
from imagen_jax.core import images as images_lib
from imagen_jax.diffusion import editing
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.sample import edit_inputs

EVERY_SAMPLER = ("ddpm", "ddim", "edm_heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
NOISE = jax.random.normal(jax.random.PRNGKey(0), (512, 2, 2, 1))
INPUT = jnp.broadcast_to(jnp.asarray([[0.9], [-0.7]]).reshape(1, 2, 1, 1) * jnp.ones((1, 2, 2, 1)),
                         NOISE.shape)
KEEP = jnp.broadcast_to(jnp.asarray([1.0, 0.0]).reshape(1, 1, 2, 1), NOISE.shape)  # column 0


def run(sampler, steps=12, noise=NOISE, **kw):
  fn = jax.jit(lambda n: samplers.solve(gaussian_x0_fn, n, jax.random.PRNGKey(1),
                                         sampler=sampler, num_steps=steps,
                                         log_snr_fn=schedules.cosine_log_snr, **kw))
  return np.asarray(fn(noise))


def repaint_reference_times(t_T, jump_length, jump_n_sample):
  """RePaint's jump schedule as its paper's code lays it out (Lugmayr et al. 2022, the
  scheduler's `get_schedule_jump`): times t from t_T down to -1 (the clean image), with a jump
  of `jump_length` back up at t = 0, jump_length, 2 jump_length, ... below t_T - jump_length."""
  jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
  t, times = t_T, [t_T]
  while t >= 0:
    t -= 1
    times.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        times.append(t)
  return times


def test_repaint_path_walks_down_and_jumps_back_resample_times():
  np.testing.assert_array_equal(editing.repaint_path(4), [0, 1, 2, 3, 4])
  path = editing.repaint_path(6, resample=3, jump=2)
  assert path[0] == 0 and path[-1] == 6 and set(np.abs(np.diff(path))) == {1}
  # Jump points one step before the clean end and every `jump` levels above it (5, 3; not 1,
  # within the first `jump` levels): the path goes `jump` levels back up resample - 1 = 2
  # times at each.
  ups = [int(a) for a, b in zip(path[:-1], path[1:]) if b < a]
  assert ups == [3, 2, 3, 2, 5, 4, 5, 4]
  downs = editing.steps_down(6, resample=3, jump=2)
  assert len(downs) == 6 + 2 * 2 * 2  # each of 2 jump points re-descends 2 steps twice
  assert len(editing.steps_down(250, resample=10, jump=10)) == 250 + 24 * 9 * 10  # RePaint's


@pytest.mark.parametrize("t_T,jump,resample", [(250, 10, 10), (20, 3, 2), (12, 4, 3), (7, 1, 2),
                                               (9, 2, 1)])
def test_repaint_path_is_repaints_reference_schedule(t_T, jump, resample):
  # Level L of our path is the reference's time t_T - L; its clean image, t = -1, is level
  # t_T + 1 = num_steps. The resampling reaches the last step before the clean image.
  expected = [t_T - t for t in repaint_reference_times(t_T, jump, resample)]
  path = editing.repaint_path(t_T + 1, resample=resample, jump=jump)
  np.testing.assert_array_equal(path, expected)
  if resample > 1:
    ups = [int(a) for a, b in zip(path[:-1], path[1:]) if b < a]
    assert max(ups) == t_T  # a jump from one step before the end


@pytest.mark.parametrize("sampler", EVERY_SAMPLER)
def test_inpainting_keeps_the_known_region_exactly_and_fills_the_rest(sampler):
  out = run(sampler, init=INPUT, known=editing.Known(INPUT, KEEP))
  np.testing.assert_array_equal(out[:, :, 0], np.asarray(INPUT)[:, :, 0])
  # The regenerated column follows the data, not the input: its mean is the data's.
  regenerated = out[:, :, 1]
  assert np.abs(regenerated.mean(0) - MU[0, :, 1]).max() < 0.1
  assert np.abs(regenerated - np.asarray(INPUT)[:, :, 1]).mean() > 0.2


@pytest.mark.parametrize("sampler", EVERY_SAMPLER)
def test_strength_zero_returns_the_input_and_one_ignores_it(sampler):
  np.testing.assert_array_equal(run(sampler, start=0.0, init=INPUT), np.asarray(INPUT))
  np.testing.assert_array_equal(run(sampler, start=1.0, init=INPUT), run(sampler))
  changed = run(sampler, start=0.5, init=INPUT)
  assert 0.0 < np.abs(changed - np.asarray(INPUT)).mean() < np.abs(run(sampler) - INPUT).mean()


def exact_ode_map(y, eps, log_snr):
  """The probability-flow ODE of Gaussian data from z = alpha y + sigma eps at `log_snr` to t = 0:
  the monotone transport x = MU + STD (z - alpha MU) / sqrt(alpha^2 STD^2 + sigma^2)."""
  alpha, sigma = schedules.alpha_sigma(jnp.asarray(log_snr))
  z = alpha * y + sigma * eps
  return MU + STD * (z - alpha * MU) / jnp.sqrt(alpha ** 2 * STD ** 2 + sigma ** 2)


@pytest.mark.parametrize("strength", [0.2, 0.5, 0.8])
def test_image_to_image_is_the_exact_ode_map_from_the_noised_input(strength):
  start_level = float(schedules.cosine_log_snr(jnp.float32(strength)))
  expected = exact_ode_map(INPUT, NOISE, start_level)
  # Measured maximum errors: DDIM 200 0.001-0.009, UniPC 25 log-SNR steps 0.003-0.004, EDM
  # Heun 40 0.003-0.004 (DDIM at 25 steps: 0.02-0.08).
  for sampler, steps, tol in (("ddim", 200, 0.015), ("unipc", 25, 0.007), ("edm_heun", 40, 0.007)):
    out = run(sampler, steps, start=strength, init=INPUT, spacing="logsnr" if
              sampler == "unipc" else "time")
    np.testing.assert_allclose(out, expected, atol=tol, err_msg=sampler)


def correlated_x0_fn(z, log_snr, rho=0.9):
  """E[x | z_t] for x ~ N(0, [[1, rho], [rho, 1]]), z [B, 2]."""
  cov = jnp.array([[1.0, rho], [rho, 1.0]])
  alpha, sigma = schedules.alpha_sigma(log_snr[0])
  gain = alpha * cov @ jnp.linalg.inv(alpha ** 2 * cov + sigma ** 2 * jnp.eye(2))
  return z @ gain.T


CORRELATED_NOISE = jax.random.normal(jax.random.PRNGKey(0), (4000, 2))
KEEP_FIRST = editing.Known(jnp.tile(jnp.array([[1.5, 0.0]]), (4000, 1)),
                           jnp.tile(jnp.array([[1.0, 0.0]]), (4000, 1)))


@pytest.mark.parametrize("sampler", EVERY_SAMPLER)
def test_the_known_region_steers_the_regenerated_one(sampler):
  """Correlated data (rho 0.9): keeping x_a = 1.5 must pull the regenerated x_b towards
  E[x_b | x_a] = 1.35 while sampling. A sampler that only pasted the known region at the end
  would leave x_b where it is without one: mean 0."""
  fill = lambda known: np.asarray(jax.jit(lambda n: samplers.solve(
      correlated_x0_fn, n, jax.random.PRNGKey(1), sampler=sampler, num_steps=25,
      log_snr_fn=schedules.cosine_log_snr, known=known))(CORRELATED_NOISE))
  kept, free = fill(KEEP_FIRST), fill(None)
  np.testing.assert_array_equal(kept[:, 0], 1.5)
  assert abs(free[:, 1].mean()) < 0.05
  assert kept[:, 1].mean() > 0.5  # measured 0.61 (EDM Heun) to 0.96 (DPM-Solver++ SDE)


def test_resampling_jumps_bring_the_filled_value_to_the_true_conditional():
  # Keep x_a = 1.5, regenerate x_b: the true conditional is N(0.9 * 1.5, 1 - 0.81). Replacing
  # the known value alone is biased (measured: mean 0.92, std 0.63 with DDPM 50); RePaint's
  # resampling harmonizes the filled value with the kept one (1.26, 0.46).
  def fill(resample):
    out = jax.jit(lambda n: samplers.solve(
        correlated_x0_fn, n, jax.random.PRNGKey(1), sampler="ddpm", num_steps=50,
        log_snr_fn=schedules.cosine_log_snr, known=KEEP_FIRST, resample=resample))(
            CORRELATED_NOISE)
    return np.asarray(out[:, 1])

  plain, resampled = fill(1), fill(5)
  target_mean, target_std = 1.35, np.sqrt(1 - 0.81)
  assert abs(resampled.mean() - target_mean) < 0.5 * abs(plain.mean() - target_mean)
  assert abs(resampled.mean() - target_mean) < 0.15
  assert abs(resampled.std() - target_std) < 0.5 * abs(plain.std() - target_std)


def test_evaluation_counts_follow_the_start_and_the_jumps():
  cosine = schedules.cosine_log_snr
  assert samplers.network_evaluations("ddim", 20, cosine, guided=False, resample=3,
                                      jump=5) == 20 + 3 * 2 * 5
  assert samplers.network_evaluations("edm_heun", 10, cosine, guided=True) == 2 * 19
  assert samplers.network_evaluations("unipc", 10, cosine, guided=False, start=0.0) == 0
  levels = samplers.evaluation_log_snrs("unipc", 10, cosine, "logsnr", start=0.5)
  assert len(levels) == 10 and levels[0] == pytest.approx(float(cosine(jnp.float32(0.5))))
  sigma_min, sigma_max = samplers.edm_sigma_range(cosine, start=0.5)
  assert sigma_max == pytest.approx(float(np.exp(-cosine(jnp.float32(0.5)) / 2)), rel=1e-5)


def test_sampler_rejects_bad_editing_settings():
  with pytest.raises(ValueError, match="multistep solver"):
    run("unipc", known=editing.Known(INPUT, KEEP), resample=2)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    run("ddim", start=1.5, init=INPUT)
  with pytest.raises(ValueError, match="needs the input image"):
    run("ddim", start=0.5)


# The host side: inputs, masks, sizes, errors.


def write(path, array):
  images_lib.write_png(np.asarray(array, np.uint8), str(path))
  return str(path)


def test_load_inputs_reads_fits_and_resizes(tmp_path):
  image = np.zeros((40, 64, 3), np.uint8)
  image[:, 20:30] = 200
  mask = np.zeros((40, 64, 3), np.uint8)
  mask[10:20, 30:40] = 255
  edit = edit_inputs.Edit("inpaint", fit="pad")
  got, regen = edit_inputs.load_inputs(write(tmp_path / "i.png", image),
                                    write(tmp_path / "m.png", mask), edit)
  assert got.shape == (64, 64, 3) and regen.shape == (64, 64)
  np.testing.assert_array_equal(got[12:52], image)       # padded 12 rows above and below
  assert regen.sum() == 100 and regen[22:32, 30:40].all()
  cropped, _ = edit_inputs.load_inputs(str(tmp_path / "i.png"), None, edit_inputs.Edit(
      "img2img", strength=0.5, fit="crop"))
  np.testing.assert_array_equal(cropped, image[:, 12:52])
  small, small_regen = edit_inputs.load_inputs(str(tmp_path / "i.png"), str(tmp_path / "m.png"),
                                            edit, size=16)
  assert small.shape == (16, 16, 3) and small_regen.shape == (16, 16)
  # Every low-res pixel touching the regenerated region is regenerated: 10 px at 1/4 scale
  # span 3-4 pixels each way, never fewer.
  assert 9 <= small_regen.sum() <= 16 and small_regen[5:8, 8:10].all()


@pytest.mark.parametrize("make,message", [
    (lambda d: (write(d / "i.png", np.zeros((8, 8, 3))), None, "inpaint"), "needs a mask"),
    (lambda d: (write(d / "i.png", np.zeros((8, 8, 3))), write(d / "m.png", np.zeros((8, 8, 3))),
                "inpaint"), "all black"),
    (lambda d: (write(d / "i.png", np.zeros((8, 8, 3))),
                write(d / "m.png", np.full((8, 8, 3), 255)), "inpaint"), "all white"),
    (lambda d: (write(d / "i.png", np.zeros((8, 8, 3))),
                write(d / "m.png", np.full((16, 16, 3), 255)), "inpaint"), "must be the image's size"),
    (lambda d: (write(d / "i.png", np.zeros((8, 12, 3))), None, "img2img"), "not square"),
    (lambda d: (str(d / "missing.png"), None, "img2img"), "does not exist"),
    (lambda d: ((d / "bad.png").write_bytes(b"not an image") and str(d / "bad.png"), None,
                "img2img"), "cannot read image"),
    (lambda d: (write(d / "i.png", np.zeros((8, 8, 3))), write(d / "m.png", np.zeros((8, 8, 3))),
                "upscale"), "takes no mask"),
])
def test_bad_inputs_are_named(tmp_path, make, message):
  image, mask, mode = make(tmp_path)
  with pytest.raises(edit_inputs.EditError, match=message):
    edit_inputs.load_inputs(image, mask, edit_inputs.Edit(mode))


@pytest.mark.parametrize("fields,message", [
    ({"mode": "paint"}, "unknown edit mode"),
    ({"mode": "img2img", "strength": -0.1}, r"in \[0, 1\]"),
    ({"mode": "img2img", "resample": 3}, "resampling jumps"),
    ({"mode": "upscale", "strength": 0.5}, "strength is for"),
    ({"mode": "inpaint", "jump": 0}, ">= 1"),
    ({"mode": "inpaint", "fit": "stretch"}, "unknown fit"),
])
def test_bad_edit_settings_are_named(fields, message):
  with pytest.raises(edit_inputs.EditError, match=message):
    edit_inputs.Edit(**fields)


# The cascade, the command and the outdir, on the tests' tiny trained cascade (16 -> 32).


@pytest.fixture(scope="module")
def cascade(tiny_cascade):
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  return cascade_lib.Cascade.from_workdirs(tiny_cascade)


def shapes_image(size=32):
  image = np.zeros((size, size, 3), np.uint8)
  image[4:14, 4:14] = (230, 40, 40)
  image[18:28, 16:30] = (40, 40, 230)
  return image


@pytest.mark.slow
def test_cascade_edits_hold_their_invariants_at_every_stage(cascade):
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  image = np.stack([shapes_image(), shapes_image()[::-1]])
  settings = outdir_lib.stage_settings(cascade, steps=["3"], sampler=["ddim", "unipc"])
  prompts = ["a red square at the top left corner", "a blue square below a red square"]
  sample = lambda edit, **kw: cascade.sample(prompts, settings=settings, edit=edit, images=image,
                                             seed=3, **kw)
  # Strength 0 returns the input, at every stage's size.
  for k, out in enumerate(sample(edit_inputs.Edit("img2img", strength=0.0))):
    np.testing.assert_array_equal(out, edit_inputs.at_size(image, (16, 32)[k]))
  # Nothing to regenerate (a mask of zeros): every stage returns its input exactly.
  nothing = np.zeros(image.shape[:3], bool)
  for k, out in enumerate(sample(edit_inputs.Edit("inpaint"), masks=nothing)):
    np.testing.assert_array_equal(out, edit_inputs.at_size(image, (16, 32)[k]))
  with pytest.raises(edit_inputs.EditError, match="stage 2 .* samples with 'unipc'"):
    sample(edit_inputs.Edit("inpaint", resample=2), masks=nothing)
  # A mask: the known region is the input at every stage; same seed, same pixels.
  regen = np.zeros(image.shape[:3], bool)
  regen[:, 16:, :] = True
  first = sample(edit_inputs.Edit("inpaint"), masks=regen)
  np.testing.assert_array_equal(first[-1], sample(edit_inputs.Edit("inpaint"), masks=regen)[-1])
  for k, out in enumerate(first):
    size = (16, 32)[k]
    keep = ~edit_inputs.regenerate_at_size(regen, size)
    np.testing.assert_array_equal(out[keep], edit_inputs.at_size(image, size)[keep])
    assert np.abs(out[~keep].astype(int) - edit_inputs.at_size(image, size)[~keep]).mean() > 5
  with pytest.raises(edit_inputs.EditError, match="SR stages only"):
    cascade.sample(prompts, edit=edit_inputs.Edit("upscale"), images=image)


@pytest.mark.slow
def test_edit_command_as_typed_with_relative_paths(tiny_cascade, tmp_path):
  from helpers import run_cli  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  for name, workdir in zip(("base", "sr"), tiny_cascade):
    os.symlink(workdir, tmp_path / name)
  image = shapes_image()
  write(tmp_path / "in.png", image)
  mask = np.zeros_like(image)
  mask[16:, :] = 255
  write(tmp_path / "mask.png", mask)
  edit = lambda *args: run_cli("edit", "--steps=3", "--prompt=a red square at the top", *args,
                               cwd=tmp_path, env={"JAX_PLATFORMS": "cpu"})
  result = edit("--mode=inpaint", "--stages=base,sr", "--image=in.png", "--mask=mask.png",
                "--outdir=out", "--sampler=ddim,edm_heun", "--resample=2", "--jump=1",
                "--num_samples=2")
  assert result.returncode == 0, result.stderr[-3000:]
  records, pictures = outdir_lib.read_samples(str(tmp_path / "out"))
  assert len(records) == 2 and records[0]["edit"] == {
      "mode": "inpaint", "strength": 1.0, "resample": 2, "jump": 1, "fit": "none"}
  assert records[0]["image"] == str(tmp_path / "in.png") and len(records[0]["mask_sha256"]) == 64
  for picture in pictures:
    np.testing.assert_array_equal(picture[:16], image[:16])
  assert np.abs(pictures[0].astype(int) - pictures[1]).max() > 0  # two samples, two fillings
  # Another input under the same name is caught before anything is overwritten.
  write(tmp_path / "in.png", image[::-1])
  again = edit("--mode=inpaint", "--stages=base,sr", "--image=in.png", "--mask=mask.png",
               "--outdir=out", "--sampler=ddim,edm_heun", "--resample=2", "--jump=1",
               "--num_samples=2")
  assert again.returncode == 2 and "input image" in again.stderr
  # Upscaling: the SR stage alone, on a 16x16 image.
  write(tmp_path / "small.png", edit_inputs.at_size(image[None], 16)[0])
  up = edit("--mode=upscale", "--stages=sr", "--image=small.png", "--outdir=up")
  assert up.returncode == 0, up.stderr[-3000:]
  assert outdir_lib.read_samples(str(tmp_path / "up"))[1][0].shape == (32, 32, 3)
  wrong = edit("--mode=upscale", "--stages=base,sr", "--image=small.png", "--outdir=up2")
  assert wrong.returncode == 2 and "upscaling an image runs SR stages only" in wrong.stderr
  assert not os.path.exists(tmp_path / "up2")
