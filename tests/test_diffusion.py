"""The diffusion core against closed forms: schedules, marginals, conversions, samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from imagen_jax.diffusion import augmentation
from imagen_jax.diffusion import edm
from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import noise as diffusion_noise
from imagen_jax.diffusion import objectives
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion import thresholding


def test_training_noise_is_standard_gaussian():
  x = jnp.zeros((64, 16, 16, 3))
  _, _, eps = objectives.corrupt(jax.random.PRNGKey(0), x, schedules.cosine_log_snr)
  flat = np.asarray(eps).ravel()
  assert abs(flat.mean()) < 0.01
  assert abs(flat.var() - 1.0) < 0.01
  assert stats.kstest(flat[:20000], "norm").pvalue > 1e-3
  # A uniform of the same variance is rejected by the same test: the check has teeth.
  uniform = np.random.default_rng(0).uniform(-np.sqrt(3), np.sqrt(3), 20000)
  assert stats.kstest(uniform, "norm").pvalue < 1e-6
  assert abs(stats.kurtosis(flat)) < 0.05  # Gaussian 0, uniform -1.2


def test_training_times_are_uniform():
  x = jnp.zeros((20000, 1, 1, 1))
  _, log_snr, _ = objectives.corrupt(jax.random.PRNGKey(1), x, schedules.linear_log_snr)
  # Invert the monotone schedule on a fine grid to recover t.
  grid = np.linspace(0, 1, 100001)
  table = np.asarray(schedules.linear_log_snr(jnp.asarray(grid)))
  t = np.interp(-np.asarray(log_snr), -table, grid)
  assert stats.kstest(t, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_forward_marginals_match_alpha_sigma(name):
  log_snr_fn = schedules.get_log_snr_fn(name)
  x0 = 0.7
  for t in (0.1, 0.5, 0.9):
    log_snr = jnp.full((200000,), log_snr_fn(jnp.asarray(t)))
    eps = jax.random.normal(jax.random.PRNGKey(int(t * 10)), (200000, 1, 1, 1))
    z = np.asarray(objectives.q_sample(jnp.full((200000, 1, 1, 1), x0), eps, log_snr)).ravel()
    alpha, sigma = (float(v) for v in schedules.alpha_sigma(log_snr[0]))
    assert abs(alpha ** 2 + sigma ** 2 - 1) < 1e-6
    assert abs(z.mean() - alpha * x0) < 4 * sigma / np.sqrt(z.size) + 1e-4
    assert abs(z.std() - sigma) / sigma < 0.01


def test_cosine_log_snr_closed_form():
  t = np.linspace(0.01, 0.99, 99)
  s = 0.008
  alpha_bar = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
  expected = np.log(alpha_bar / (1 - alpha_bar))
  np.testing.assert_allclose(np.asarray(schedules.cosine_log_snr(jnp.asarray(t))), expected,
                             rtol=1e-5, atol=1e-5)
  # Monotone decreasing and clipped at both ends.
  full = np.asarray(schedules.cosine_log_snr(jnp.linspace(0, 1, 1001)))
  assert np.all(np.diff(full) <= 0)
  assert full[-1] == schedules.LOG_SNR_MIN


def test_linear_log_snr_matches_discrete_betas():
  betas = np.linspace(1e-4, 0.02, 1000)
  alpha_bar = np.cumprod(1 - betas)
  for n in (50, 200, 500, 900):
    discrete = np.log(alpha_bar[n - 1] / (1 - alpha_bar[n - 1]))
    continuous = float(schedules.linear_log_snr(jnp.asarray(n / 1000)))
    assert abs(continuous - discrete) < 0.05 * max(1.0, abs(discrete)), (n, continuous, discrete)


def test_parameterization_conversions_round_trip():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (8, 4, 4, 3), jnp.float64)
    eps = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float64)
    log_snr = jnp.linspace(-8.0, 8.0, 8, dtype=jnp.float64)
    z = objectives.q_sample(x, eps, log_snr)
    for param in objectives.PARAMETERIZATIONS:
      out = objectives.target(x, eps, log_snr, param)
      x_hat, eps_hat = objectives.to_x0_eps(z, out, log_snr, param)
      np.testing.assert_allclose(x_hat, x, atol=1e-6)
      np.testing.assert_allclose(eps_hat, eps, atol=1e-6)
      for other in objectives.PARAMETERIZATIONS:  # param -> other -> param
        converted = objectives.target(x_hat, eps_hat, log_snr, other)
        back = objectives.target(*objectives.to_x0_eps(z, converted, log_snr, other), log_snr, param)
        np.testing.assert_allclose(back, out, atol=1e-6)


def test_loss_weightings():
  log_snr = jnp.linspace(-6.0, 6.0, 13)
  snr = np.exp(np.asarray(log_snr))
  gamma = 5.0
  w = lambda p, m: np.asarray(objectives.loss_weight(log_snr, p, m, gamma))
  np.testing.assert_allclose(w("eps", "plain"), 1.0)
  np.testing.assert_allclose(w("eps", "min_snr"), np.minimum(snr, gamma) / snr, rtol=1e-5)
  np.testing.assert_allclose(w("v", "min_snr"), np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
  np.testing.assert_allclose(w("x0", "min_snr"), np.minimum(snr, gamma), rtol=1e-5)
  np.testing.assert_allclose(w("eps", "snr"), 1.0, rtol=1e-5)
  np.testing.assert_allclose(w("x0", "snr"), snr, rtol=1e-5)
  # Weighted losses agree across parameterizations for the same prediction error in x0.
  x = jnp.zeros((13, 2, 2, 1))
  eps = jnp.ones_like(x)
  z = objectives.q_sample(x, eps, log_snr)
  x_err = x + 0.1
  losses = {}
  for p in objectives.PARAMETERIZATIONS:
    out = objectives.target(x_err, objectives.eps_from_x0(z, x_err, log_snr), log_snr, p)
    losses[p] = objectives.diffusion_loss(out, x, eps, log_snr, parameterization=p,
                                          weighting="min_snr", min_snr_gamma=gamma)
  np.testing.assert_allclose(losses["eps"], losses["x0"], rtol=1e-4)
  np.testing.assert_allclose(losses["v"], losses["x0"], rtol=1e-4)


# --- samplers against the exact denoiser of Gaussian data --------------------------------------

MU = np.array([0.3, -0.5, 0.0, 0.8], np.float32).reshape(1, 2, 2, 1)
STD = np.array([0.2, 0.5, 0.1, 0.3], np.float32).reshape(1, 2, 2, 1)


def gaussian_x0_fn(z, log_snr):
  """E[x | z_t] for x ~ N(MU, STD^2) per pixel: MU + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha MU)."""
  alpha, sigma = schedules.alpha_sigma(schedules.right_broadcast(log_snr, z))
  gain = alpha * STD ** 2 / (alpha ** 2 * STD ** 2 + sigma ** 2)
  return MU + gain * (z - alpha * MU)


# Discretization error shrinks the smallest std most (measured: DDIM 100 steps -4.6% at std 0.1,
# -0.3% at 1000 steps; Heun 40 steps +1.5-2%, 20 steps +6%); the tolerances allow that and no more.
@pytest.mark.parametrize("sampler,steps,std_rtol", [
    ("ddpm", 1000, 0.025), ("ddim", 100, 0.06), ("ddim", 1000, 0.02), ("edm_heun", 40, 0.03)])
def test_samplers_reproduce_gaussian_data(sampler, steps, std_rtol):
  noise = jax.random.normal(jax.random.PRNGKey(0), (8000, 2, 2, 1))
  run = jax.jit(lambda n, k: samplers.solve(
      gaussian_x0_fn, n, k, sampler=sampler, num_steps=steps,
      log_snr_fn=schedules.cosine_log_snr))
  out = np.asarray(run(noise, jax.random.PRNGKey(1)))
  np.testing.assert_allclose(out.mean(0), MU[0], atol=0.01)
  np.testing.assert_allclose(out.std(0), STD[0], rtol=std_rtol)


def test_ddim_is_deterministic_and_ddpm_is_not():
  noise = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  kw = dict(num_steps=20, log_snr_fn=schedules.cosine_log_snr)
  a = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(1), sampler="ddim", **kw)
  b = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(2), sampler="ddim", **kw)
  np.testing.assert_array_equal(a, b)
  c = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(1), sampler="ddpm", **kw)
  d = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(2), sampler="ddpm", **kw)
  assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3


def test_eta_one_ddim_is_ddpm():
  noise = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  kw = dict(num_steps=10, log_snr_fn=schedules.linear_log_snr)
  a = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(3), sampler="ddpm", **kw)
  b = samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(3), sampler="ddim", eta=1.0, **kw)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_samplers_count_steps():
  calls = []
  noise = jnp.zeros((2, 2, 2, 1))
  samplers.solve(gaussian_x0_fn, noise, jax.random.PRNGKey(0), sampler="ddim", num_steps=7,
                  log_snr_fn=schedules.cosine_log_snr, on_step=lambda i: calls.append(int(i)))
  jax.effects_barrier()
  assert sorted(calls) == list(range(7))


def test_edm_preconditioned_net_matches_vp_denoiser():
  """An EDM network whose D is the exact denoiser gives the same x0_fn as the VP form."""
  sigma_data = 0.5

  def net(x_in, log_snr):  # F such that c_skip x + c_out F(c_in x) = E[y | x]
    sigma = jnp.exp(-0.5 * log_snr)
    c_skip, c_out, c_in = (schedules.right_broadcast(c, x_in)
                           for c in edm.preconditioning(sigma, sigma_data))
    x = x_in / c_in
    alpha = 1.0 / jnp.sqrt(1.0 + schedules.right_broadcast(sigma, x) ** 2)
    return (gaussian_x0_fn(x * alpha, log_snr) - c_skip * x) / c_out

  z = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))
  log_snr = jnp.linspace(-5.0, 5.0, 6)
  np.testing.assert_allclose(edm.denoiser(net, sigma_data)(z, log_snr),
                             gaussian_x0_fn(z, log_snr), rtol=1e-4, atol=1e-5)


def test_edm_loss_weight_normalizes_the_optimal_error():
  # Data y ~ N(0, sigma_data^2): the best denoiser of x = y + sigma n is linear, D*(x) = a x, and
  # its error grows with sigma by orders of magnitude; lambda(sigma) must bring the weighted
  # error of that optimum to 1 at every sigma (EDM's "unit loss" at initialisation: with the
  # preconditioning, F = 0 is this optimum). Everything is measured on samples.
  sigma_data = 0.5
  sigmas = [0.002, 0.05, 0.5, 2.0, 20.0, 80.0]
  raw_errors = []
  for i, sigma in enumerate(sigmas):
    y_key, n_key, loss_key = jax.random.split(jax.random.PRNGKey(i), 3)
    y = sigma_data * jax.random.normal(y_key, (128, 16, 16, 3))
    x = y + sigma * jax.random.normal(n_key, y.shape)
    a = jnp.vdot(x, y) / jnp.vdot(x, x)  # least-squares fit of the best linear denoiser
    raw = float(jnp.mean(jnp.square(a * x - y)))
    weight = float(edm.loss_weight(jnp.float32(sigma), sigma_data))
    assert weight * raw == pytest.approx(1.0, abs=0.02), sigma
    raw_errors.append(raw)
    # The training loss of a zero network at this sigma (log sigma ~ N(log sigma, 0)).
    loss, log_snr = edm.training_loss(lambda x_in, _: jnp.zeros_like(x_in), loss_key, y,
                                      sigma_data=sigma_data, p_mean=float(np.log(sigma)), p_std=0.0)
    np.testing.assert_allclose(np.exp(-0.5 * np.asarray(log_snr)), sigma, rtol=1e-5)
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.02), sigma
  assert max(raw_errors) / min(raw_errors) > 1e4  # so a constant weight would fail the test


# --- thresholding, guidance, augmentation -------------------------------------------------------

def test_dynamic_threshold_on_known_values():
  rng = np.random.default_rng(0)
  x = np.stack([rng.normal(0, 2.0, (8, 8, 3)), rng.normal(0, 0.2, (8, 8, 3))]).astype(np.float32)
  out = np.asarray(thresholding.dynamic_threshold(jnp.asarray(x), 99.5))
  s = np.maximum(np.percentile(np.abs(x).reshape(2, -1), 99.5, axis=1), 1.0)
  np.testing.assert_allclose(out, np.clip(x, -s[:, None, None, None], s[:, None, None, None])
                             / s[:, None, None, None], rtol=1e-5)
  assert s[0] > 1.0 and s[1] == 1.0
  assert out.min() >= -1.0 and out.max() <= 1.0
  np.testing.assert_allclose(out[1], x[1])  # |x| < 1 everywhere: unchanged
  # The 0-100 scale: 99.5, not 0.995 (which would pick a near-zero "threshold" of 1).
  assert np.abs(out[0]).max() == pytest.approx(1.0)
  # Percentile 100 is the max.
  top = np.asarray(thresholding.dynamic_threshold(jnp.asarray(x), 100.0))
  np.testing.assert_allclose(top[0], x[0] / np.abs(x[0]).max(), rtol=1e-5)


def test_static_threshold_clips():
  x = jnp.array([[-3.0, -0.5, 0.5, 2.0]])
  np.testing.assert_array_equal(thresholding.static_threshold(x), [[-1.0, -0.5, 0.5, 1.0]])


def test_guidance_weights_one_and_zero_are_exact():
  def model_fn(z, log_snr, text_emb, text_mask):
    return z * 1.3 + jnp.sum(text_emb * text_mask[..., None], axis=(1, 2))[:, None, None, None] \
        + log_snr[:, None, None, None] * 0.01

  key = jax.random.PRNGKey(0)
  z = jax.random.normal(key, (3, 4, 4, 3))
  log_snr = jnp.array([1.0, 0.0, -1.0])
  emb = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  cond = model_fn(z, log_snr, emb, mask)
  uncond = model_fn(z, log_snr, *guidance.null_text(emb, mask))
  assert np.abs(np.asarray(cond - uncond)).max() > 0.1
  for w, expected in ((1.0, cond), (0.0, uncond)):
    out = guidance.guided_model_fn(model_fn, jnp.asarray(w))(z, log_snr, emb, mask)
    np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(guidance.guided_model_fn(model_fn, 1.0)(z, log_snr, emb, mask), cond)
  out3 = guidance.guided_model_fn(model_fn, 3.0)(z, log_snr, emb, mask)
  np.testing.assert_allclose(out3, 3 * cond - 2 * uncond, rtol=1e-5, atol=1e-5)


def test_condition_dropout_rate():
  emb = jnp.ones((4000, 2, 3))
  dropped = guidance.drop_text(jax.random.PRNGKey(0), emb, 0.1)
  rows_zero = np.asarray(jnp.all(dropped == 0, axis=(1, 2)))
  assert abs(rows_zero.mean() - 0.1) < 0.02
  assert np.all(np.asarray(dropped)[~rows_zero] == 1)


def test_token_dropout_rate():
  emb = jnp.ones((400, 10, 3))
  dropped = np.asarray(guidance.drop_tokens(jax.random.PRNGKey(0), emb, 0.2))
  tokens_zero = np.all(dropped == 0, axis=2)
  assert abs(tokens_zero.mean() - 0.2) < 0.02
  assert np.all(dropped[~tokens_zero] == 1)
  # Per token, not per caption: most captions lose a token (1 - 0.8^10 = 0.89), hardly any all.
  assert 0.85 < tokens_zero.any(axis=1).mean() < 0.93 and tokens_zero.all(axis=1).sum() == 0


def test_noise_augmentation_levels():
  lowres = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3), minval=-1, maxval=1)
  levels = jnp.array([0.0, 0.25, 1.0])
  z, aug_log_snr = augmentation.noise_augment(jax.random.PRNGKey(1), lowres, levels,
                                              schedules.linear_log_snr)
  np.testing.assert_allclose(aug_log_snr, schedules.linear_log_snr(levels))
  np.testing.assert_allclose(z[0], lowres[0], atol=1e-3)  # level 0: nearly untouched
  corr = [np.corrcoef(np.ravel(z[i]), np.ravel(lowres[i]))[0, 1] for i in range(3)]
  assert corr[0] > 0.999 and 0.2 < corr[1] < 0.95 and abs(corr[2]) < 0.2
  levels = augmentation.random_aug_levels(jax.random.PRNGKey(2), 5000, 0.5)
  assert float(levels.min()) >= 0 and float(levels.max()) <= 0.5
  assert abs(float(levels.mean()) - 0.25) < 0.01


def test_per_example_keys_make_images_independent_of_the_batch():
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4))
  noise = diffusion_noise.normal(keys, (4, 2, 2, 1))
  kw = dict(num_steps=5, log_snr_fn=schedules.cosine_log_snr)
  full = samplers.solve(gaussian_x0_fn, noise, keys, sampler="ddpm", **kw)
  part = samplers.solve(gaussian_x0_fn, noise[2:], keys[2:], sampler="ddpm", **kw)
  np.testing.assert_allclose(full[2:], part, atol=1e-6)
  assert np.abs(np.asarray(full[0] - full[1])).max() > 1e-3


def test_shifted_schedule():
  t = jnp.linspace(0.05, 0.95, 10)
  np.testing.assert_allclose(schedules.get_log_snr_fn("cosine", -3.0)(t),
                             schedules.cosine_log_snr(t) - 3.0, rtol=1e-6)
  assert float(schedules.get_log_snr_fn("cosine", -3.0)(jnp.asarray(1.0))) == schedules.LOG_SNR_MIN


def test_learned_range_vlb_is_zero_at_the_true_posterior_and_trains_only_the_variance():
  schedule = schedules.DiscreteSchedule("cosine", 1000)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
  log_snr = schedule(jnp.array([0.101, 0.501, 0.901]))  # timesteps 100, 500, 900
  z = objectives.q_sample(x, eps, log_snr)
  # The true noise and v = -1 (the posterior's own variance): p is q, the KL 0.
  exact = jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
  np.testing.assert_allclose(objectives.learned_range_vlb(exact, z, x, log_snr, schedule), 0.0,
                             atol=1e-4)
  # v = 1: beta, wider than q's (most at small timesteps, where the two differ most).
  wider = jnp.concatenate([eps, jnp.ones_like(eps)], -1)
  kl = np.asarray(objectives.learned_range_vlb(wider, z, x, log_snr, schedule))
  assert (kl > 1e-8).all() and kl[0] > kl[1] > kl[2]
  grads = jax.grad(lambda out: objectives.learned_range_vlb(out, z, x, log_snr, schedule).sum())(
      wider + 0.1)
  assert float(jnp.abs(grads[..., :3]).max()) == 0.0  # the mean's noise is held fixed
  assert float(jnp.abs(grads[..., 3:]).max()) > 0.0
  # At timestep 0 the step ends at the clean image: the term counts 0.
  at_zero = schedule(jnp.full((3,), 0.001))
  assert (objectives.learned_range_vlb(wider, objectives.q_sample(x, eps, at_zero), x, at_zero,
                                       schedule) == 0).all()


def test_learned_variance_spans_the_posterior_and_beta():
  schedule = schedules.DiscreteSchedule("cosine", 1000)
  lt, ls = schedule(jnp.array(0.501)), schedule(jnp.array(0.500))  # timesteps 500 -> 499
  bar = schedules.discrete_alphas_cumprod("cosine", 1000).astype(np.float64)
  beta = 1 - bar[500] / bar[499]
  posterior = beta * (1 - bar[499]) / (1 - bar[500])
  values = objectives.learned_variance(jnp.array([-1.0, 0.0, 1.0]), lt, ls)
  np.testing.assert_allclose(values, [posterior, np.sqrt(posterior * beta), beta], rtol=1e-3)
