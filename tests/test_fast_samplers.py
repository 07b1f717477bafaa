"""DPM-Solver++, UniPC and the guidance interval against closed forms and the exact Gaussian denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_diffusion import MU, STD, gaussian_x0_fn  # pylint: disable=g-bad-import-order
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import multistep
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import thresholding

NOISE = jax.random.normal(jax.random.PRNGKey(0), (4000, 2, 2, 1))
KEY = jax.random.PRNGKey(1)


def run(sampler, steps, noise=NOISE, log_snr_fn=schedules.cosine_log_snr, **kw):
  fn = jax.jit(lambda n: samplers.solve(gaussian_x0_fn, n, KEY, sampler=sampler, num_steps=steps,
                                         log_snr_fn=log_snr_fn, **kw))
  return np.asarray(fn(noise))


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_dpm_solver_order_one_is_ddim_and_its_sde_is_ddpm(steps):
  np.testing.assert_allclose(run("dpmpp_1m", steps), run("ddim", steps), atol=2e-6)
  np.testing.assert_allclose(run("dpmpp_1m_sde", steps), run("ddpm", steps), atol=1e-4)  # float32 rounding
  if steps > 2:  # a second-order step in the middle: 2M leaves DDIM's path
    assert np.abs(run("dpmpp_2m", steps) - run("ddim", steps)).max() > 1e-3
  else:  # the first step and (lower_order_final) the last are first order: 2M is DDIM
    np.testing.assert_allclose(run("dpmpp_2m", steps), run("ddim", steps), atol=2e-6)


# Measured maximum relative error of the stds: DDIM 0.20 at 10 log-SNR steps, 0.09 at 25; the
# tolerances are about 1.5x each solver's own error.
@pytest.mark.parametrize("sampler,steps,spacing,tol", [
    ("dpmpp_2m", 10, "logsnr", 0.11), ("unipc", 10, "logsnr", 0.07),
    ("dpmpp_3m", 25, "logsnr", 0.035), ("unipc", 25, "logsnr", 0.035),
    ("dpmpp_3m", 50, "time", 0.05), ("unipc", 50, "time", 0.09),
    ("dpmpp_2m_sde", 50, "logsnr", 0.045)])
def test_fast_samplers_reproduce_gaussian_data(sampler, steps, spacing, tol):
  out = run(sampler, steps, spacing=spacing)
  monte_carlo = 3 * STD[0] / np.sqrt(len(out))  # 3 standard errors of the mean of 4000 draws
  assert np.all(np.abs(out.mean(0) - MU[0]) < 0.1 * tol + monte_carlo)
  np.testing.assert_allclose(out.std(0), STD[0], rtol=tol)


def linear_log_snr(t):
  """A schedule whose log-SNR steps are equal at any step count: a clean convergence test."""
  return 6.0 - 12.0 * t


def solve(sampler, steps, noise, **options):
  """A multistep solver on `linear_log_snr` at its own order to the end (no lower-order final
  steps, which would cap the global order at 2)."""
  family, order = samplers.parse_sampler(sampler)
  return np.asarray(multistep.solve_multistep(gaussian_x0_fn, noise, KEY, solver=family, order=order,
                                     num_steps=steps, log_snr_fn=linear_log_snr,
                                     lower_order_final=False, **options))


# The global error of an order-p solver falls as steps^-p; UniPC's corrector adds one order.
@pytest.mark.parametrize("sampler,options,order", [
    ("dpmpp_1m", {}, 1), ("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 3), ("unipc_1m", {}, 2),
    ("unipc", {}, 3), ("unipc", {"variant": "bh1"}, 3)])
def test_error_falls_at_the_solvers_order(sampler, options, order):
  noise = NOISE[:64]
  exact = solve("dpmpp_3m", 1500, noise)
  steps = np.array([16, 32, 64])
  errors = [np.abs(solve(sampler, n, noise, **options) - exact).max() for n in steps]
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.35, (errors, slope)


def test_unipc_without_its_corrector_is_one_order_lower():
  noise = NOISE[:64]
  exact = solve("dpmpp_3m", 1500, noise)
  err = lambda corrector, n: np.abs(solve("unipc", n, noise, corrector=corrector) - exact).max()
  assert err(False, 32) / err(False, 64) == pytest.approx(4.0, rel=0.2)  # order 2
  assert err(True, 32) / err(True, 64) == pytest.approx(8.0, rel=0.2)    # order 3


def test_the_first_order_last_step_is_what_limits_the_default_at_many_steps():
  """With the default lower-order final steps the global error is second order (the last step is
  DDIM's); the solver's own order shows without them."""
  noise = NOISE[:64]
  exact = solve("dpmpp_3m", 1500, noise)
  default = lambda n: np.abs(np.asarray(samplers.solve(
      gaussian_x0_fn, noise, KEY, sampler="dpmpp_3m", num_steps=n,
      log_snr_fn=linear_log_snr)) - exact).max()
  assert default(32) / default(64) == pytest.approx(4.0, rel=0.25)


def test_orders_warm_up_and_drop_at_the_end():
  assert multistep.step_orders(6, 3) == [1, 2, 3, 3, 2, 1]
  assert multistep.step_orders(6, 3, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
  assert multistep.step_orders(50, 2)[-3:] == [2, 2, 1]
  assert multistep.step_orders(1, 2) == [1]


def test_step_grids():
  time_grid = schedules.log_snr_grid(4, schedules.cosine_log_snr, "time")
  np.testing.assert_allclose(time_grid, schedules.cosine_log_snr(jnp.array([1, .75, .5, .25, 0.])),
                             rtol=1e-6)
  grid = schedules.log_snr_grid(4, schedules.cosine_log_snr, "logsnr")
  np.testing.assert_allclose(np.diff(grid), (grid[-1] - grid[0]) / 4, rtol=1e-6)
  assert grid[0] == pytest.approx(-2 * np.log(80.0))  # EDM's sigma_max, not the clipped -20
  linear = schedules.log_snr_grid(4, schedules.linear_log_snr, "logsnr")
  assert linear[-1] == pytest.approx(-2 * np.log(0.002))  # EDM's sigma_min, not the clipped +20
  with pytest.raises(ValueError, match="spacing"):
    schedules.log_snr_grid(4, schedules.cosine_log_snr, "karras")
  # Inside jit the grid is still a constant (numpy) of the compiled loop.
  jax.jit(lambda: schedules.log_snr_grid(3, schedules.cosine_log_snr, "logsnr").sum())()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde"])
def test_thresholding_is_applied_to_every_data_prediction(sampler):
  """A denoiser that always predicts 2.0: clipped to 1 by static thresholding, the sample lands
  at alpha_0 * 1 (+ a little noise), without thresholding at 2."""
  constant = lambda z, log_snr: jnp.full_like(z, 2.0)
  noise = NOISE[:16]
  sample = lambda fn: np.asarray(samplers.solve(
      constant, noise, KEY, sampler=sampler, num_steps=8, log_snr_fn=schedules.cosine_log_snr,
      threshold_fn=fn))
  alpha0 = float(schedules.alpha_sigma(schedules.cosine_log_snr(jnp.zeros(())))[0])
  np.testing.assert_allclose(np.median(sample(thresholding.static_threshold)), alpha0, atol=0.01)
  np.testing.assert_allclose(np.median(sample(lambda x: x)), 2 * alpha0, atol=0.02)


def test_sampler_names():
  assert samplers.parse_sampler("dpmpp_2m") == ("dpmpp", 2)
  assert samplers.parse_sampler("dpmpp_3m_sde") == ("dpmpp_sde", 3)
  assert samplers.parse_sampler("unipc") == ("unipc", 2)
  assert samplers.parse_sampler("unipc_3m") == ("unipc", 3)
  assert samplers.parse_sampler("edm_heun") == ("edm_heun", 2)
  for bad in ("dpmpp_4m", "unipc_2m_sde", "dpm++", "euler"):
    with pytest.raises(ValueError, match="unknown sampler"):
      samplers.parse_sampler(bad)


# --- the guidance interval ----------------------------------------------------------------------

def fake_net(calls):
  """A 'network' whose output tells the conditional (emb 1) from the unconditional (emb 0) pass
  and records the batch size of every call (in the branch that runs)."""

  def net(z, log_snr, emb, mask):
    jax.debug.callback(lambda b: calls.append(int(b)), z.shape[0])
    return z * 0 + emb[:, :1, :1].reshape(-1, 1, 1, 1) * 10.0

  return net


def test_guidance_interval_guides_inside_and_skips_the_unconditional_pass_outside():
  calls = []
  z = jnp.ones((2, 2, 2, 1))
  emb, mask = jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool)
  fn = jax.jit(guidance.guided_model_fn(fake_net(calls), 4.0, (0.5, 2.0)))
  inside = -2 * np.log(1.0)   # sigma 1
  outside = -2 * np.log(3.0)  # sigma 3
  at_hi = -2 * np.log(2.0)    # the interval is (lo, hi]
  np.testing.assert_allclose(fn(z, jnp.full((2,), inside), emb, mask), 40.0)  # 4 * 10 + (1 - 4) * 0
  np.testing.assert_allclose(fn(z, jnp.full((2,), outside), emb, mask), 10.0)  # conditional
  np.testing.assert_allclose(fn(z, jnp.full((2,), at_hi, jnp.float32), emb, mask), 40.0,)
  jax.effects_barrier()
  assert calls == [4, 2, 4]  # guided passes are 2B, the skipped one B
  with pytest.raises(ValueError, match="guidance interval"):
    guidance.guided_model_fn(fake_net([]), 4.0, (2.0, 0.5))
  # No upper bound ("0.5:inf"): every noise level above lo is guided, however high.
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  open_ended = jax.jit(guidance.guided_model_fn(fake_net([]), 4.0,
                                                outdir_lib.parse_interval("0.5:inf")))
  np.testing.assert_allclose(open_ended(z, jnp.full((2,), -2 * np.log(1e3)), emb, mask), 40.0)
  np.testing.assert_allclose(open_ended(z, jnp.full((2,), -2 * np.log(0.1)), emb, mask), 10.0)


def test_guidance_interval_saves_the_evaluations_it_counts():
  calls = []
  emb, mask = jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool)
  interval = (0.3, 3.0)
  net = guidance.guided_model_fn(fake_net(calls), 3.0, interval)
  x0_fn = samplers.denoiser(lambda z, l: net(z, l, emb, mask), "x0")
  for sampler, steps in (("dpmpp_2m", 12), ("edm_heun", 6)):
    calls.clear()
    samplers.solve(x0_fn, jnp.zeros((2, 2, 2, 1)), KEY, sampler=sampler, num_steps=steps,
                    log_snr_fn=schedules.cosine_log_snr)
    jax.effects_barrier()
    passes = samplers.network_evaluations(sampler, steps, schedules.cosine_log_snr, guided=True,
                                          guidance_interval=interval)
    levels = samplers.evaluation_log_snrs(sampler, steps, schedules.cosine_log_snr)
    assert len(calls) == len(levels)
    assert sum(calls) // 2 == passes  # batch 2 per pass
    assert len(levels) < passes < 2 * len(levels)  # some steps guided, some not
    assert samplers.network_evaluations(sampler, steps, schedules.cosine_log_snr,
                                        guided=True) == 2 * len(levels)


def test_stage_settings_reject_bad_values_by_name():
  good = dict(sampler="unipc", steps=10, guidance=3.0, threshold="static", percentile=99.5,
              eta=0.0, aug_level=0.0)
  assert stage_sampler.StageSettings(**good, guidance_interval=[0.3, 5]).guidance_interval == (0.3, 5.0)
  for field, value, message in (("sampler", "dpm++", "unknown sampler"),
                                ("spacing", "karras", "spacing"),
                                ("unipc_variant", "bh3", "UniPC variant"),
                                ("guidance_interval", (5.0, 1.0), "guidance interval"),
                                ("threshold", "soft", "thresholding"),
                                ("steps", 0, "at least one step"),
                                ("steps", 25.0, "must be an integer")):
    with pytest.raises(ValueError, match=message):
      stage_sampler.StageSettings(**{**good, field: value})


# --- the command line's per-stage settings ------------------------------------------------------

def two_stage_cascade():
  """Just what `outdir.stage_settings` reads of a cascade: each stage's config and workdir."""
  import types  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  stages = [types.SimpleNamespace(config=config_lib.load_config(f"configs/demo_{name}.py:quick"),
                                  workdir=name) for name in ("base", "sr")]
  return types.SimpleNamespace(stages=stages)


def test_sampler_flags_per_stage():
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  cascade = two_stage_cascade()
  base, sr = outdir_lib.stage_settings(cascade, sampler=["unipc", "dpmpp_2m"], steps=["7"],
                                       spacing=["logsnr"], guidance_interval=["0.3:5", "all"])
  assert (base.sampler, base.steps, base.spacing, base.guidance_interval) == (
      "unipc", 7, "logsnr", (0.3, 5.0))
  assert (sr.sampler, sr.steps, sr.spacing, sr.guidance_interval) == ("dpmpp_2m", 7, "logsnr", ())
  for flag, values, message in (("sampler", ["dpmpp_9m"], "stage 0 .*unknown sampler"),
                                ("guidance_interval", ["5:1"], "guidance interval"),
                                ("guidance_interval", ["0.3-5"], "LO:HI"),
                                ("spacing", ["time", "karras"], "stage 1 .*spacing")):
    with pytest.raises(outdir_lib.SampleError, match=message):
      outdir_lib.stage_settings(cascade, **{flag: values})


def test_an_outdir_from_before_the_new_settings_resumes():
  """Records written before spacing / unipc_variant / guidance_interval existed compare equal to
  today's settings with those fields at their defaults, and unequal to other values."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import outdir as outdir_lib  # pylint: disable=g-import-not-at-top
  base, _ = outdir_lib.stage_settings(two_stage_cascade(), sampler=["ddim"])
  base = dataclasses.replace(base, spacing="time")  # what records from before sampled with
  now = json.loads(json.dumps([dataclasses.asdict(base)]))
  before = [{k: v for k, v in now[0].items()
             if k not in ("spacing", "unipc_variant", "guidance_interval")}]
  assert outdir_lib._with_later_fields(before) == now  # pylint: disable=protected-access
  for change in ({"guidance_interval": (0.3, 5.0)}, {"spacing": "logsnr"}):
    other = dataclasses.replace(base, **change)
    assert outdir_lib._with_later_fields(before) != json.loads(  # pylint: disable=protected-access
        json.dumps([dataclasses.asdict(other)]))
