"""Per-image sampling settings as traced arrays (`stage_sampler.RowSettings`): guidance weights,
thresholding and a negative prompt's text per example give each example exactly what its own
float settings give, in one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance
from imagen_jax.diffusion import stage_sampler
from imagen_jax.diffusion import thresholding


def test_per_example_threshold_is_each_methods_own():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 3)) * 2.5
  method = jnp.asarray([thresholding.METHODS.index(m) for m in
                        ("none", "static", "dynamic", "dynamic", "static")])
  percentile = jnp.asarray([99.5, 99.5, 99.5, 90.0, 50.0])
  out = np.asarray(jax.jit(thresholding.per_example_threshold)(x0, method, percentile))
  np.testing.assert_array_equal(out[0], np.asarray(x0[0]))
  np.testing.assert_array_equal(out[1], np.asarray(thresholding.static_threshold(x0[1])))
  for i, p in ((2, 99.5), (3, 90.0)):
    expected = np.asarray(thresholding.dynamic_threshold(x0[i:i + 1], p))[0]
    np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-6)
  # A percentile only matters to dynamic thresholding.
  np.testing.assert_array_equal(out[4], np.asarray(thresholding.static_threshold(x0[4])))
  assert np.abs(out[2]).max() <= 1.0 and not np.array_equal(out[2], out[3])


def test_array_guidance_weights_guide_each_example_by_its_own():
  cond, uncond = jnp.full((3, 2, 2, 1), 2.0), jnp.full((3, 2, 2, 1), -1.0)
  weights = jnp.asarray([1.0, 0.0, 4.0])
  out = np.asarray(guidance.combine(cond, uncond, weights))
  for i, w in enumerate([1.0, 0.0, 4.0]):
    np.testing.assert_array_equal(out[i], np.asarray(guidance.combine(cond[i], uncond[i], w)))
  np.testing.assert_array_equal(out[0], np.asarray(cond[0]))  # w = 1: exactly the conditional


def fake_model(z, log_snr, text_emb, text_mask):
  """A stand-in network whose output depends on every input, example by example."""
  del log_snr
  text = (text_emb * text_mask[..., None]).sum(axis=(1, 2))
  return z * 0.5 + text[:, None, None, None]


def test_array_weights_and_a_null_text_match_float_guidance_per_example():
  key = jax.random.PRNGKey(1)
  z = jax.random.normal(key, (3, 4, 4, 3))
  emb = jax.random.normal(jax.random.fold_in(key, 1), (3, 5, 6))
  mask = jnp.asarray(np.arange(5) < np.asarray([[5], [3], [1]]))
  negative = jax.random.normal(jax.random.fold_in(key, 2), (3, 5, 6))
  log_snr = jnp.zeros((3,))
  weights = [3.0, 1.0, 7.5]
  rows = guidance.guided_model_fn(fake_model, jnp.asarray(weights),
                                  null=(negative.at[1].set(0.0), mask))
  out = np.asarray(jax.jit(rows)(z, log_snr, emb, mask))
  for i, w in enumerate(weights):
    one = lambda a: a[i:i + 1]
    expected = guidance.guided_model_fn(
        fake_model, w, null=None if i == 1 else (one(negative), one(mask)))(
            one(z), one(log_snr), one(emb), one(mask))
    np.testing.assert_allclose(out[i], np.asarray(expected)[0], rtol=1e-6, atol=1e-6)


def test_a_batch_of_weights_all_one_skips_the_unconditional_pass():
  # A network that returns NaN for the zeroed (unconditional) text: any pass over it would show.
  def conditional_only(z, log_snr, text_emb, text_mask):
    seen = jnp.abs(text_emb).sum(axis=(1, 2))[:, None, None, None]
    return jnp.where(seen > 0, fake_model(z, log_snr, text_emb, text_mask), jnp.nan)
  key = jax.random.PRNGKey(3)
  z = jax.random.normal(key, (2, 4, 4, 3))
  emb = jax.random.normal(jax.random.fold_in(key, 1), (2, 5, 6))
  mask, log_snr = jnp.ones((2, 5), bool), jnp.zeros((2,))
  run = jax.jit(lambda w: guidance.guided_model_fn(conditional_only, w)(z, log_snr, emb, mask))
  np.testing.assert_array_equal(run(jnp.ones(2)), fake_model(z, log_snr, emb, mask))
  assert np.isnan(np.asarray(run(jnp.asarray([1.0, 2.0])))).all()  # guided: both passes ran


def test_row_settings_stack_reads_each_images_settings():
  base = stage_sampler.StageSettings(sampler="ddim", steps=4, guidance=3.0, threshold="static",
                                     percentile=99.5, eta=0.0, aug_level=0.0)
  other = stage_sampler.StageSettings(sampler="ddim", steps=4, guidance=1.5,
                                      threshold="dynamic", percentile=95.0, eta=0.0,
                                      aug_level=0.0)
  rows = stage_sampler.RowSettings.stack([base, other, base])
  np.testing.assert_array_equal(rows.guidance, [3.0, 1.5, 3.0])
  assert [thresholding.METHODS[m] for m in rows.threshold] == ["static", "dynamic", "static"]
  np.testing.assert_array_equal(rows.percentile, [99.5, 95.0, 99.5])
  assert rows.null_emb is None and rows.null_mask is None
