"""The U-Net (paper F.1) and Efficient U-Net (F.2, F.3): sizes, axis names, shapes, conditioning.

Sensitivity tests use randomly perturbed parameters: at initialization the output conv is zero,
so every output is exactly zero and nothing could change.
"""

import functools
import logging
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagen_jax import models
from imagen_jax.core import config_lib
from imagen_jax.core import partitioning
from imagen_jax.diffusion import guidance
from imagen_jax.models import chunked_attention
from imagen_jax.models import layers
from imagen_jax.train import step as step_lib

TINY = ("configs/base64.py:tiny", "configs/sr256.py:tiny", "configs/sr1024.py:tiny")
PAPER = (("configs/base64.py:paper", 2.0e9), ("configs/base64.py:500m", 0.5e9),
         ("configs/sr256.py:paper", 0.6e9), ("configs/sr1024.py:paper", 0.4e9))
PARAM_AXES = {"embed", "mlp", "heads", "kv", "joined_kv", "conv_h", "conv_w", "norm",
              "text_length"}


def is_box(x):
  return isinstance(x, nn.Partitioned)


@functools.lru_cache(maxsize=None)
def tiny_net(spec, **overrides):
  """(config, model, perturbed float32 params, jitted apply) for a tiny config."""
  config = config_lib.load_config(spec, overrides)
  model = models.build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **models.init_inputs(config))
                    ["params"])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                              for p, k in zip(leaves, keys)])
  return config, model, params, jax.jit(functools.partial(model.apply, {"params": params}))


def random_inputs(config, batch=3, seed=0, size=None):
  """Inputs with real tokens of different lengths per example (the rest padding). One batch
  size for every test: each distinct shape is one more compilation."""
  inputs = models.init_inputs(config, batch)
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  _, train_size, lowres_size = config_lib.stage_sizes(config)
  size = size or train_size
  length = config.text.max_length
  inputs["x"] = jax.random.normal(keys[0], (batch, size, size, 3))
  inputs["log_snr"] = jnp.linspace(-3.0, 3.0, batch)
  inputs["text_emb"] = jax.random.normal(keys[1], inputs["text_emb"].shape)
  inputs["text_mask"] = jnp.arange(length)[None, :] < (jnp.arange(batch)[:, None] % 3 + 3)
  if config.stage == "sr":
    lowres_size = lowres_size * size // train_size
    inputs["lowres"] = jax.random.uniform(keys[2], (batch, lowres_size, lowres_size, 3), minval=-1)
    inputs["aug_log_snr"] = jnp.full((batch,), 2.0)
  return inputs


def max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


# --- Sizes and parameter names (eval_shape only: no memory) ------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("spec,paper_count", PAPER)
def test_paper_variants_are_within_10_percent_of_the_paper(spec, paper_count):
  config = config_lib.load_config(spec)
  assert config.text.width == 4096  # T5-XXL's width, read from the text config
  table, total = models.parameter_table(config)
  assert 0.9 < total / paper_count < 1.1, f"{spec}: {total:,} vs {paper_count:,.0f}"
  leaves = jax.tree_util.tree_leaves(models.param_shapes(config), is_leaf=is_box)
  assert len(table.splitlines()) == len(leaves) + 1
  assert total == sum(int(np.prod(nn.unbox(x).shape)) for x in leaves)


def test_the_text_width_comes_from_the_text_config():
  for width in (48, 96):
    config = config_lib.load_config("configs/sr256.py:tiny", {"text.width": width})
    shapes = nn.unbox(models.param_shapes(config))
    assert shapes["conditioning"]["text_norm"]["scale"].shape == (width,)
    assert shapes["down2_attn"]["text_key"]["kernel"].shape == (width, 64)


@pytest.mark.parametrize("spec", TINY + tuple(spec for spec, _ in PAPER))
def test_every_parameter_carries_logical_axis_names(spec):
  shapes = models.param_shapes(config_lib.load_config(spec))
  leaves = jax.tree_util.tree_leaves_with_path(shapes, is_leaf=is_box)
  rule_names = {name for name, _ in partitioning.LOGICAL_AXIS_RULES}
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert is_box(leaf), f"{name} has no logical axis names"
    assert leaf.value.dtype == jnp.float32, name
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) <= PARAM_AXES & rule_names, (name, leaf.names)
    if leaf.value.ndim == 4:
      assert leaf.names == layers.CONV_AXES, name
    if "norm" in name.split("'")[-4]:  # ...['<norm module>']['scale' | 'bias']
      assert leaf.names == ("norm",), name


# --- Shapes, dtypes and what the output depends on ---------------------------------------------

@pytest.mark.parametrize("spec", TINY)
def test_output_shape_and_dtype(spec):
  config, _, _, apply = tiny_net(spec)
  out = apply(**random_inputs(config))
  size = config_lib.stage_sizes(config)[1]
  assert out.shape == (3, size, size, 3) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_a_fresh_network_predicts_zero():
  """The output conv starts at zero (and every residual branch at the identity)."""
  config = config_lib.load_config("configs/sr256.py:tiny")
  model = models.build_model(config)
  inputs = random_inputs(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), **inputs)["params"]
  out = jax.jit(model.apply)({"params": params}, **inputs)
  assert out.shape == (3, 32, 32, 3) and float(jnp.max(jnp.abs(out))) == 0.0


def test_sr_network_is_convolutional_trains_on_crops_and_samples_at_full_size():
  # SR 2 trains on 256 crops of 1024 images with the matching 64 crops of the 256 low-res input.
  assert config_lib.stage_sizes(config_lib.load_config("configs/sr1024.py:paper")) == (1024, 256, 64)
  config, _, _, apply = tiny_net("configs/sr1024.py:tiny")
  assert config.train_crop == 32 and config.image_size == 64
  crop = apply(**random_inputs(config, size=32))
  full = apply(**random_inputs(config, size=64))
  assert crop.shape == (3, 32, 32, 3) and full.shape == (3, 64, 64, 3)
  assert bool(jnp.all(jnp.isfinite(full)))


def test_space_to_depth_stem_keeps_the_interface():
  config, _, _, apply = tiny_net("configs/base64.py:tiny", **{"model.stem_patch": 2})
  out = apply(**random_inputs(config))
  assert out.shape == (3, 32, 32, 3)
  assert float(jnp.std(out)) > 1e-3


@pytest.mark.parametrize("every_block,expected", [
    (True, {"down1_attn0", "down1_attn1", "up1_attn0", "up1_attn1", "up1_attn2", "mid_attn"}),
    (False, {"down1_attn1", "up1_attn2", "mid_attn"})])
def test_attention_after_every_block_or_once_per_level(every_block, expected):
  overrides = {"model.num_res_blocks": 2, "model.attn_resolutions": (16,),
               "model.attn_every_block": every_block}
  config = config_lib.load_config("configs/base64.py:tiny", overrides)
  assert {k for k in models.param_shapes(config) if "attn" in k} == expected
  if not every_block:  # the default placement's forward pass is tested throughout
    _, _, _, apply = tiny_net("configs/base64.py:tiny", **overrides)
    out = apply(**random_inputs(config))
    assert out.shape == (3, 32, 32, 3) and float(jnp.std(out)) > 1e-3


@pytest.mark.parametrize("spec", TINY[1:])
def test_sr_output_changes_with_the_lowres_image(spec):
  config, _, _, apply = tiny_net(spec)
  inputs = random_inputs(config)
  other = dict(inputs, lowres=-inputs["lowres"])
  assert max_diff(apply(**inputs), apply(**other)) > 1e-3


@pytest.mark.parametrize("spec", TINY)
def test_noise_level_and_aug_level_change_the_output(spec):
  config, _, _, apply = tiny_net(spec)
  inputs = random_inputs(config)
  out = apply(**inputs)
  assert max_diff(out, apply(**dict(inputs, log_snr=inputs["log_snr"] + 1.0))) > 1e-3
  if config.stage == "sr":
    assert max_diff(out, apply(**dict(inputs, aug_log_snr=inputs["aug_log_snr"] - 4.0))) > 1e-3


@pytest.mark.parametrize("spec", TINY)
def test_padded_tokens_are_ignored_and_real_tokens_are_not(spec):
  config, _, _, apply = tiny_net(spec)
  inputs = random_inputs(config)
  mask = inputs["text_mask"]
  out = apply(**inputs)

  noise = 100.0 * jax.random.normal(jax.random.PRNGKey(7), inputs["text_emb"].shape)
  padded_changed = jnp.where(mask[..., None], inputs["text_emb"], noise)
  assert max_diff(out, apply(**dict(inputs, text_emb=padded_changed))) <= 1e-6

  # Example 0 has 3 real tokens; change one (not by a constant: LayerNorm would remove that).
  real_changed = inputs["text_emb"].at[0, 1].set(noise[0, 1] / 100.0)
  changed = apply(**dict(inputs, text_emb=real_changed))
  assert max_diff(out[0], changed[0]) > 1e-3
  assert max_diff(out[1:], changed[1:]) <= 1e-6  # examples do not mix


@pytest.mark.parametrize("spec", TINY)
def test_without_text_pooling_the_text_reaches_the_output_through_attention_only(spec):
  config, _, params, apply = tiny_net(spec, **{"model.text_pooling": False})
  assert not any("pool" in name for name in params["conditioning"])
  pooled_params = tiny_net(spec)[2]["conditioning"]
  assert {n for n in pooled_params if "pool" in n} == {"pool_in", "pool_query", "pool_key",
                                                         "pool_value", "pool_out"}
  inputs = random_inputs(config)
  out = apply(**inputs)
  noise = jax.random.normal(jax.random.PRNGKey(7), inputs["text_emb"].shape)
  padded_changed = jnp.where(inputs["text_mask"][..., None], inputs["text_emb"], 100.0 * noise)
  assert max_diff(out, apply(**dict(inputs, text_emb=padded_changed))) <= 1e-6
  changed = apply(**dict(inputs, text_emb=inputs["text_emb"].at[0, 1].set(noise[0, 1])))
  assert max_diff(out[0], changed[0]) > 1e-3


@pytest.mark.parametrize("spec", TINY[:2])
def test_word_order_reaches_the_net_only_through_learned_text_positions(spec):
  # Attention over the tokens and attention pooling are blind to their order: without
  # positions, reordering the real tokens (the same words) cannot change the output.
  config, _, _, apply = tiny_net(spec)
  inputs = random_inputs(config)
  order = jnp.array([2, 0, 1] + list(range(3, config.text.max_length)))  # the first 3 real
  reordered = dict(inputs, text_emb=inputs["text_emb"][:, order])
  assert max_diff(apply(**inputs), apply(**reordered)) <= 1e-4  # summation order only

  config, model, with_positions, apply = tiny_net(spec, **{"model.text_positions": True})
  position = with_positions["conditioning"]["text_position"]
  assert position.shape == (config.text.max_length, config.text.width)
  assert max_diff(apply(**inputs), apply(**reordered)) > 1e-3
  # They start as the transformer's sinusoids: order is readable from the first step.
  initial = nn.unbox(model.init(jax.random.PRNGKey(3), **models.init_inputs(config))["params"])
  length, width = config.text.max_length, config.text.width
  table = np.zeros((length, width))
  for p in range(length):
    for i in range(width // 2):
      table[p, i] = np.cos(p / 10_000 ** (i / (width // 2)))
      table[p, width // 2 + i] = np.sin(p / 10_000 ** (i / (width // 2)))
  np.testing.assert_allclose(initial["conditioning"]["text_position"], table, atol=1e-5)
  # Zero positions give the net without them, parameter for parameter.
  zeroed = dict(with_positions, conditioning=dict(with_positions["conditioning"],
                                                 text_position=jnp.zeros_like(position)))
  without = dict(with_positions, conditioning={
      k: v for k, v in with_positions["conditioning"].items() if k != "text_position"})
  plain_model = tiny_net(spec)[1]
  assert max_diff(model.apply({"params": zeroed}, **inputs),
                  plain_model.apply({"params": without}, **inputs)) <= 1e-5


def test_cross_attention_resolutions_add_text_only_attention_blocks_to_the_unet():
  config, model, params, apply = tiny_net("configs/base64.py:tiny", **{
      "model.attn_resolutions": (8,), "model.cross_attn_resolutions": (32,)})
  cross = sorted(name for name in params if "attn" in name and "text_key" in params[name]
                 and "key" not in params[name])
  # Level 0 (32x32) on both paths: one block after each residual block (1 down, 2 up).
  assert cross == ["down0_attn0", "up0_attn0", "up0_attn1"]
  assert all(set(params[n]) == {"norm", "query", "text_key", "text_value", "out"} for n in cross)
  assert "key" in params["down2_attn0"] and "down1_attn0" not in params  # 8x8 self+text; 16: none
  inputs = random_inputs(config)
  silenced = dict(params, **{n: dict(params[n], out=jax.tree_util.tree_map(jnp.zeros_like,
                                                                           params[n]["out"]))
                             for n in cross})
  assert max_diff(apply(**inputs), model.apply({"params": silenced}, **inputs)) > 1e-3


def test_text_positions_reach_the_attention_tokens_and_leave_the_pooled_vector_a_bag_of_words():
  # The pooled vector (the conditioning every block hears) stays blind to word order, so colors
  # and shapes combine as they do without positions; the tokens the attention blocks read carry it.
  conditioning = layers.Conditioning(emb_dim=32, feature_dim=16, pool_width=32, pool_head_dim=16,
                                     text_positions=True)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  text_emb = jax.random.normal(keys[0], (2, 6, 8))
  mask = jnp.array([[True] * 4 + [False] * 2, [True] * 6])
  log_snr = jnp.array([-1.0, 2.0])
  params = conditioning.init(keys[1], log_snr, text_emb, mask)
  order = jnp.array([2, 0, 3, 1, 4, 5])  # the first 4 (every first example's real token) permuted
  emb, text = conditioning.apply(params, log_snr, text_emb, mask)
  emb_r, text_r = conditioning.apply(params, log_snr, text_emb[:, order], mask)
  assert max_diff(emb[0], emb_r[0]) <= 1e-5
  moved_to = jnp.argsort(order)[:4]  # where each of the first 4 tokens went
  assert max_diff(text[0, :4], text_r[0, moved_to]) > 0.1  # same words, other positions
  position = params["params"]["text_position"].value
  np.testing.assert_allclose(text[0, :4] - text_r[0, moved_to], position[:4] - position[moved_to],
                             atol=1e-5)


@pytest.mark.parametrize("spec", TINY)
def test_empty_captions_and_the_null_condition_are_finite(spec):
  config, _, _, apply = tiny_net(spec)
  inputs = random_inputs(config)
  empty = dict(inputs, text_mask=inputs["text_mask"].at[0].set(False))
  out = apply(**empty)
  assert bool(jnp.all(jnp.isfinite(out)))
  # With no real token, the embeddings cannot matter (pooling gives zeros, not NaN or padding).
  other = apply(**dict(empty, text_emb=inputs["text_emb"] * 5.0))
  assert max_diff(out[0], other[0]) <= 1e-6

  null_emb, null_mask = guidance.null_text(inputs["text_emb"], inputs["text_mask"])
  null = apply(**dict(inputs, text_emb=null_emb, text_mask=null_mask))
  assert bool(jnp.all(jnp.isfinite(null)))
  assert max_diff(null, apply(**inputs)) > 1e-3  # the text is used


def test_bfloat16_compute_keeps_float32_params_and_output():
  config, model, params, apply = tiny_net("configs/base64.py:tiny")
  config16 = config_lib.load_config("configs/base64.py:tiny", {"dtype": "bfloat16"})
  model16 = models.build_model(config16)
  shapes = jax.tree_util.tree_leaves(models.param_shapes(config16))
  assert {x.dtype for x in shapes} == {jnp.dtype(jnp.float32)}
  inputs = random_inputs(config)
  out32 = apply(**inputs)
  out16 = jax.jit(model16.apply)({"params": params}, **inputs)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_output_and_gradients(policy):
  config, model, params, _ = tiny_net("configs/sr256.py:tiny")
  remat_model = models.build_model(
      config_lib.load_config("configs/sr256.py:tiny", {"model.remat": policy}))
  inputs = random_inputs(config)

  def grads(m):
    loss = lambda p: jnp.mean(jnp.square(m.apply({"params": p}, **inputs)))
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss, g), (loss_remat, g_remat) = grads(model), grads(remat_model)
  np.testing.assert_allclose(loss, loss_remat, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_an_unknown_remat_policy_is_named():
  config = config_lib.load_config("configs/sr256.py:tiny", {"model.remat": "some"})
  with pytest.raises(ValueError, match="model.remat 'some'"):
    models.param_shapes(config)


def test_dropout_applies_only_in_training():
  config, _, params, _ = tiny_net("configs/base64.py:tiny")
  model = models.build_model(config_lib.load_config("configs/base64.py:tiny",
                                                    {"model.dropout": 0.5}))
  inputs = random_inputs(config)
  apply = jax.jit(model.apply, static_argnames="train")
  rngs = {"dropout": jax.random.PRNGKey(3)}
  eval_out = apply({"params": params}, **inputs)
  np.testing.assert_array_equal(eval_out, apply({"params": params}, **inputs, rngs=rngs))
  assert max_diff(eval_out, apply({"params": params}, **inputs, train=True, rngs=rngs)) > 1e-3


def test_attention_masks_keys_like_a_reference_softmax():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 5, 2, 8))
  k = jax.random.normal(keys[1], (2, 7, 2, 8))
  v = jax.random.normal(keys[2], (2, 7, 2, 8))
  mask = jnp.array([[True] * 4 + [False] * 3, [True] * 7])
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  expected = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
  np.testing.assert_allclose(layers.attention(q, k, v, mask), expected, atol=1e-5)


def test_refused_cudnn_attention_falls_back_to_xla_and_warns_once_with_the_reason(monkeypatch,
                                                                                 caplog):
  # "auto" tries cuDNN on a GPU with 16-bit inputs: pretend to be one, and make cuDNN refuse.
  real = jax.nn.dot_product_attention
  tried = []

  def refusing(*args, implementation=None, **kwargs):
    tried.append(implementation)
    if implementation == "cudnn":
      raise ValueError("cuDNN attention does not support head_dim=8")
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(layers, "_cudnn_fallback_warned", False)  # as in a fresh process
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (2, 5, 2, 8), jnp.bfloat16) for key in keys)
  mask = jnp.array([[True] * 3 + [False] * 2, [True] * 5])
  with caplog.at_level(logging.WARNING, logger="absl"):
    outs = [layers.attention(q, k, v, mask),            # eager
            jax.jit(layers.attention)(q, k, v, mask),   # a trace
            layers.attention(q[:1], k[:1], v[:1], mask[:1])]  # another shape
  assert tried.count("cudnn") == 3  # every call tried cuDNN; only the first one says so
  warnings = [r for r in caplog.records if "cuDNN" in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  assert "ValueError: cuDNN attention does not support head_dim=8" in warnings[0].getMessage()
  assert warnings[0].levelno == logging.WARNING
  expected = layers.attention(q, k, v, mask, implementation="xla")
  for out in outs[:2]:
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("batch,query_len,key_len", [(6, 5, 7), (4, 1, 9), (3, 64, 80)])
def test_chunked_attention_matches_xla_values_and_gradients(batch, query_len, key_len):
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(keys[0], (batch, query_len, 2, 8))
  k = jax.random.normal(keys[1], (batch, key_len, 2, 8))
  v = jax.random.normal(keys[2], (batch, key_len, 2, 8))
  weights = jax.random.normal(keys[3], q.shape)
  # Different real lengths per example; example 0 has no real key (it attends uniformly).
  mask = jnp.arange(key_len)[None, :] < (jnp.arange(batch)[:, None] * 3 % (key_len + 1))
  assert not bool(jnp.any(mask[0]))

  def loss(impl, q, k, v):
    return jnp.sum(layers.attention(q, k, v, mask, implementation=impl) * weights)

  for chunk_examples in (1, batch):  # one example per chunk (lax.map) and the whole batch
    with mock.patch.object(chunked_attention, "examples_per_chunk", lambda b, *_: chunk_examples):
      np.testing.assert_allclose(layers.attention(q, k, v, mask, "chunked"),
                                 layers.attention(q, k, v, mask, "xla"), atol=1e-5)
      got = jax.grad(functools.partial(loss, "chunked"), (0, 1, 2))(q, k, v)
      expected = jax.grad(functools.partial(loss, "xla"), (0, 1, 2))(q, k, v)
      for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_attention_in_bfloat16_matches_xla():
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  q, k, v = (jax.random.normal(key, (4, 16, 2, 8), jnp.bfloat16) for key in keys)
  mask = jnp.ones((4, 16), bool).at[1, 10:].set(False)
  got = layers.attention(q, k, v, mask, "chunked")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32),
                             layers.attention(q, k, v, mask, "xla").astype(jnp.float32),
                             atol=2e-2)


def test_chunks_keep_the_logits_small_and_divide_the_batch():
  assert chunked_attention.examples_per_chunk(16, 1024, 1056, 2) == 1   # 8.6 MB per example
  assert chunked_attention.examples_per_chunk(12, 64, 80, 4) == 12      # 82 KB per example
  assert chunked_attention.examples_per_chunk(14, 128, 128, 4) == 7     # 256 KB: 8 fit, 7 divides


def test_sharded_apply_matches_the_single_device_result():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  config, model, params, apply = tiny_net("configs/base64.py:tiny")
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  boxed = models.param_shapes(config)
  shardings = partitioning.tree_shardings(boxed, mesh)
  sharded = jax.device_put(params, shardings)
  # The logical names reach the devices: some parameter is actually split.
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree_util.tree_leaves(sharded))
  inputs = random_inputs(config, batch=4)
  with mesh, partitioning.axis_rules_context():
    out = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(sharded, inputs)
  np.testing.assert_allclose(out, apply(**inputs), atol=1e-4, rtol=1e-4)


# --- Overfitting a fixed batch ------------------------------------------------------------------

def shapes_images(size):
  """4 shapes-like images in [-1, 1]: a colored circle, square or triangle on black."""
  yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
  specs = (("circle", (0.3, 0.3), (1, -1, -1)), ("square", (0.65, 0.6), (-1, -1, 1)),
           ("triangle", (0.45, 0.35), (1, 1, -1)), ("circle", (0.35, 0.7), (-1, 1, -1)))
  images = np.full((4, size, size, 3), -1.0, np.float32)
  for image, (shape, (cy, cx), color) in zip(images, specs):
    if shape == "circle":
      inside = (yy - cy) ** 2 + (xx - cx) ** 2 < 0.16 ** 2
    elif shape == "square":
      inside = (abs(yy - cy) < 0.14) & (abs(xx - cx) < 0.14)
    else:
      inside = (yy < cy + 0.14) & (abs(xx - cx) < (yy - cy + 0.14) * 0.6)
    image[inside] = color
  return jnp.asarray(images)


def to_pixels(images):
  """[-1, 1] -> uint8-valued float32 [0, 255], unrounded: the step's to_model_range inverts it."""
  return (images + 1.0) * 127.5


def overfit(spec, steps):
  """(eval loss before, after) `steps` Adam steps on one fixed batch of 4, with fresh t, eps and
  aug noise every step; the eval loss averages 32 fixed draws of them.

  The loss is the training step's own (train/step.py): the eps objective with plain weighting,
  the text always kept, aug levels U(0, 0.5) under the diffusion schedule.
  """
  config = config_lib.load_config(spec, {
      "diffusion.formulation": "vp", "diffusion.parameterization": "eps",
      "diffusion.loss_weighting": "plain", "cond_drop_rate": 0.0, "lowres.aug_max": 0.5})
  config.lowres.aug_schedule = config.diffusion.schedule
  model = models.build_model(config)
  _, size, lowres_size = config_lib.stage_sizes(config)
  x = shapes_images(size)
  text_shape = (4, config.text.max_length, config.text.width)
  text_mask = jnp.arange(config.text.max_length)[None, :] < jnp.array([[5], [7], [6], [8]])
  batch = {"image": to_pixels(x), "text_mask": text_mask,
           "text_emb": jax.random.normal(jax.random.PRNGKey(0), text_shape)}
  if lowres_size:
    batch["lowres"] = to_pixels(jax.image.resize(x, (4, lowres_size, lowres_size, 3), "linear"))
  params = model.init(jax.random.PRNGKey(1), **models.init_inputs(config))["params"]
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  step_loss = step_lib.make_loss_fn(config, model, text_apply=None)

  def loss_fn(params, key):
    return step_loss(params, batch, None, key)[0]  # the mean over the batch

  @jax.jit
  def train_step(params, opt_state, key):
    grads = jax.grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  eval_keys = jax.random.split(jax.random.PRNGKey(123), 32)
  eval_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, k))(eval_keys)))
  before = float(eval_loss(params))
  for i in range(steps):
    params, opt_state = train_step(params, opt_state, jax.random.fold_in(jax.random.PRNGKey(2), i))
  return before, float(eval_loss(params))


@pytest.mark.slow
@pytest.mark.parametrize("spec,steps", [("configs/base64.py:tiny", 150),
                                        ("configs/sr256.py:tiny", 300)])
@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch(spec, steps):
  before, after = overfit(spec, steps)
  assert before > 0.9  # zero output at init: the eps loss is E[eps^2] = 1
  assert after < before / 10, (before, after)
