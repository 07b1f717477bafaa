"""DeepFloyd IF's U-Net (models/if_unet.py) and diffusers' format (interop/diffusers_format.py),
checked against diffusers itself: outputs, gradients, weights in and out, refusals, sizes.

Each U-Net is a tiny IF-shaped `UNet2DConditionModel` with every weight perturbed (norms at 1/0
and diffusers' initialization would hide a mistake in a scale or a bias), written with
save_pretrained and read back without torch.
"""

import copy
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_equal
from imagen_jax.core import partitioning
from imagen_jax.interop import diffusers_format
from imagen_jax.models import if_unet

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.diffusers

_BLOCKS = dict(down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                 "SimpleCrossAttnDownBlock2D"],
               up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                               "ResnetUpsampleBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn")
# IF-I's layout (convert_if.py): a residual level, then simple cross-attention levels; T5 text
# projected by encoder_hid_proj and attention-pooled into the time embedding.
BASE = dict(**_BLOCKS, in_channels=3, out_channels=6, block_out_channels=[32, 64, 96],
            layers_per_block=1, cross_attention_dim=64, encoder_hid_dim=48,
            attention_head_dim=16, addition_embed_type="text", addition_embed_type_num_heads=4,
            cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
            act_fn="gelu")
# IF-II's: 6 input channels, the augmentation level as class_labels, layers per level, the
# residual scales and time activations of convert_if.py, text-only attention at the bottom.
SR = dict(in_channels=6, out_channels=6, block_out_channels=[32, 32, 64, 64],
          layers_per_block=[1, 2, 1, 2],
          down_block_types=["ResnetDownsampleBlock2D"] * 2 + ["SimpleCrossAttnDownBlock2D"] * 2,
          up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 2,
          mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32,
          encoder_hid_dim=40, attention_head_dim=32, addition_embed_type="text",
          addition_embed_type_num_heads=8, class_embed_type="timestep", time_embedding_dim=64,
          time_embedding_act_fn="gelu", resnet_skip_time_act=True,
          resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,
          only_cross_attention=[False, False, True, True], cross_attention_norm="group_norm",
          resnet_time_scale_shift="scale_shift", act_fn="gelu")
# Two levels with heads of 8 and 16 channels (an up block takes the width at its own index, as
# diffusers does), SiLU, the additive time conditioning, no text projection, pooling or norm.
SMALL = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1,
             down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
             up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
             mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32,
             attention_head_dim=[8, 16], act_fn="silu", norm_num_groups=16, norm_eps=1e-6)
CONFIGS = {"base": BASE, "sr": SR, "small": SMALL}
MASKED = ("base", "small")  # diffusers takes no text mask where attention is text-only


def torch_unet(config, seed=0):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**config)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return unet.eval()


def saved(unet, path, **kwargs):
  unet.save_pretrained(str(path), **kwargs)
  return str(path)


def random_inputs(config, masked, batch=2, size=16, length=7, seed=0):
  """NHWC inputs; non-integer timesteps; example 0's last 3 text positions padded if `masked`."""
  rng = np.random.default_rng(seed)
  text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
  return dict(
      sample=rng.standard_normal((batch, size, size, config["in_channels"])).astype(np.float32),
      timesteps=np.array([17.25, 803.6], np.float32)[:batch],
      encoder_hidden_states=rng.standard_normal((batch, length, text_dim)).astype(np.float32),
      encoder_attention_mask=(np.arange(length)[None] < np.array([4, length])[:batch, None]
                              if masked else None),
      class_labels=(np.array([20.0, 250.5], np.float32)[:batch]
                    if config.get("class_embed_type") else None))


def torch_forward(unet, inputs, sample=None):
  """diffusers' output (NHWC numpy) on `inputs`; `sample` replaces inputs["sample"] (NCHW)."""
  tensor = lambda x: None if x is None else torch.from_numpy(np.asarray(x))
  if sample is None:
    sample = tensor(inputs["sample"].transpose(0, 3, 1, 2))
  return unet(sample, tensor(inputs["timesteps"]), tensor(inputs["encoder_hidden_states"]),
              class_labels=tensor(inputs["class_labels"]),
              encoder_attention_mask=tensor(inputs["encoder_attention_mask"])).sample


def nhwc(x):
  return x.float().detach().numpy().transpose(0, 2, 3, 1)


def assert_close(actual, expected, rtol=1e-4):
  """Equal within `rtol` of the expected array's largest magnitude (and not all zero)."""
  scale = float(np.max(np.abs(expected)))
  assert scale > 0
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rtol * scale)


# SR's network is rematerialized: its gradients check remat="full" against diffusers too.
REMAT = {"sr": "full"}


@functools.lru_cache(maxsize=None)
def compiled(name, dtype=jnp.float32, grads=False):
  """jit(params, inputs -> output) of CONFIGS[name]'s net, or with `grads` jit(params, inputs,
  cotangent -> (output, (d params, d sample))): one compilation per use, shared by the tests."""
  model = if_unet.IFUNet(if_unet.from_diffusers_config(CONFIGS[name]), dtype=dtype,
                         remat=REMAT.get(name, "none"))

  def forward(params, inputs):
    return model.apply({"params": params}, **inputs)

  def forward_and_grads(params, inputs, cotangent):
    out, vjp = jax.vjp(lambda p, x: forward(p, dict(inputs, sample=x)), params,
                       inputs["sample"])
    return out, vjp(cotangent)
  return jax.jit(forward_and_grads if grads else forward)


def jax_forward(name, params, inputs, dtype=jnp.float32):
  return compiled(name, dtype)(params, inputs)


# --- Outputs and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_equal_diffusers(name, tmp_path):
  config = CONFIGS[name]
  unet = torch_unet(config)
  read = diffusers_format.read_unet(saved(unet, tmp_path))
  assert read.dtype == "float32" and read.config == if_unet.from_diffusers_config(config)
  inputs = random_inputs(config, masked=name in MASKED)
  with torch.no_grad():
    expected = nhwc(torch_forward(unet, inputs))
  out = jax_forward(name, read.params, inputs)
  assert out.shape == (2, 16, 16, config["out_channels"]) and out.dtype == jnp.float32
  assert_close(out, expected)
  if name in MASKED:  # the padding matters in both (example 0); without a mask, both agree again
    with torch.no_grad():
      unmasked = nhwc(torch_forward(unet, dict(inputs, encoder_attention_mask=None)))
    assert np.max(np.abs(unmasked[0] - expected[0])) > 1e-3
    np.testing.assert_allclose(unmasked[1], expected[1], atol=1e-5)  # nothing padded
    all_true = dict(inputs, encoder_attention_mask=np.ones_like(inputs["encoder_attention_mask"]))
    assert_close(jax_forward(name, read.params, all_true), unmasked)


@pytest.mark.slow  # XLA:CPU compiles a forward and backward pass for 15-30 s
@pytest.mark.parametrize("name", ["base", "sr"])
def test_gradients_equal_diffusers(name, tmp_path):
  config = CONFIGS[name]
  unet = torch_unet(config)
  read = diffusers_format.read_unet(saved(unet, tmp_path))
  inputs = random_inputs(config, masked=name in MASKED)
  cotangent = np.random.default_rng(1).standard_normal((2, 16, 16, 6)).astype(np.float32)
  _, (grad_params, grad_sample) = compiled(name, grads=True)(read.params, inputs, cotangent)
  sample = torch.from_numpy(inputs["sample"].transpose(0, 3, 1, 2)).requires_grad_()
  out = torch_forward(unet, inputs, sample)
  (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  assert_close(grad_sample, nhwc(sample.grad))
  expected = {n: p.grad.numpy() for n, p in unet.named_parameters()}
  grads = diffusers_format.tensors_from_params(grad_params)
  assert set(grads) == set(expected)
  for key in ("conv_in.weight", "mid_block.attentions.0.to_q.weight",
              "mid_block.attentions.0.add_k_proj.weight", "up_blocks.0.resnets.0.norm2.bias",
              "down_blocks.1.downsamplers.0.time_emb_proj.weight", "conv_out.bias",
              "add_embedding.pool.positional_embedding", "time_embedding.linear_1.weight",
              "class_embedding.linear_2.weight" if name == "sr" else "encoder_hid_proj.weight"):
    assert_close(grads[key], expected[key], rtol=2e-4)


def test_bfloat16_compute(tmp_path):
  read = diffusers_format.read_unet(saved(torch_unet(SMALL), tmp_path))
  inputs = random_inputs(SMALL, masked=True)
  reference = jax_forward("small", read.params, inputs)
  low = jax_forward("small", read.params, inputs, dtype=jnp.bfloat16)
  assert low.dtype == jnp.float32
  assert_close(low, reference, rtol=5e-2)


# --- Weights in and out -------------------------------------------------------------------------

def stored_tensors(directory, variant=None):
  return dict(diffusers_format.iter_tensors(str(directory), variant))


def test_reads_fp16_variant_and_sharded_weights(tmp_path):
  unet = torch_unet(BASE)
  full = diffusers_format.read_unet(saved(unet, tmp_path / "full"))
  sharded_dir = saved(unet, tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / diffusers_format.INDEX_NAME).exists()
  assert_trees_equal(diffusers_format.read_unet(sharded_dir).params, full.params)
  with pytest.raises(FileNotFoundError, match="fp16"):
    diffusers_format.read_unet(str(tmp_path / "full"), variant="fp16")

  half = copy.deepcopy(unet).half()
  fp16_dir = saved(half, tmp_path / "fp16", variant="fp16")
  fp16_sharded_dir = saved(half, tmp_path / "fp16_sharded", variant="fp16",
                           max_shard_size="100KB")
  assert len(list((tmp_path / "fp16_sharded").glob("*.safetensors"))) > 1
  fp16 = diffusers_format.read_unet(fp16_dir)  # no float32 files: the fp16 variant
  assert fp16.dtype == "float16"
  assert_trees_equal(diffusers_format.read_unet(fp16_dir, variant="fp16").params, fp16.params)
  assert_trees_equal(diffusers_format.read_unet(fp16_sharded_dir).params, fp16.params)
  halved = {n: t.numpy() for n, t in half.state_dict().items()}
  for name, tensor in diffusers_format.tensors_from_params(fp16.params, "float16").items():
    np.testing.assert_array_equal(tensor, halved[name])
  inputs = random_inputs(BASE, masked=True)
  with torch.no_grad():
    expected = nhwc(torch_forward(copy.deepcopy(half).float(), inputs))
  assert_close(jax_forward("base", fp16.params, inputs), expected)


@pytest.mark.parametrize("dtype,variant,torch_dtype", [
    ("float32", None, torch.float32), ("float16", "fp16", torch.float16),
    ("bfloat16", "bf16", torch.bfloat16)])
def test_written_weights_load_in_diffusers(dtype, variant, torch_dtype, tmp_path):
  unet = torch_unet(SR)
  read = diffusers_format.read_unet(saved(unet, tmp_path / "in"))
  for config in (read.diffusers_config, read.config):  # as read, and made from the dataclass
    out = tmp_path / f"out_{type(config).__name__}"
    diffusers_format.write_unet(str(out), read.params, config, dtype=dtype, variant=variant)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(str(out), variant=variant,
                                                            torch_dtype=torch_dtype)
    assert loaded.config.class_embed_type == "timestep"
    original = copy.deepcopy(unet).to(torch_dtype).state_dict()
    assert set(loaded.state_dict()) == set(original)
    for name, tensor in loaded.state_dict().items():
      assert tensor.dtype == torch_dtype
      assert torch.equal(tensor, original[name]), name
  if dtype == "float32":
    inputs = random_inputs(SR, masked=False)
    with torch.no_grad():
      np.testing.assert_array_equal(nhwc(torch_forward(loaded, inputs)),
                                    nhwc(torch_forward(unet, inputs)))


@pytest.mark.parametrize("dtype,variant", [("float32", None), ("float16", "fp16"),
                                           ("bfloat16", "bf16")])
def test_import_then_export_is_bit_for_bit(dtype, variant, tmp_path):
  unet = torch_unet(SMALL).to({"float32": torch.float32, "float16": torch.float16,
                               "bfloat16": torch.bfloat16}[dtype])
  source = saved(unet, tmp_path / "in", variant=variant)
  read = diffusers_format.read_unet(source, variant=variant)
  assert read.dtype == dtype
  out = tmp_path / "out"
  diffusers_format.write_unet(str(out), read.params, read.diffusers_config, dtype=dtype,
                              variant=variant)
  before, after = stored_tensors(source, variant), stored_tensors(out, variant)
  assert sorted(before) == sorted(after)
  for name, tensor in before.items():
    assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
    assert after[name].tobytes() == tensor.tobytes(), name
  config_in = json.loads((tmp_path / "in" / "config.json").read_text())
  assert json.loads((out / "config.json").read_text()) == config_in


def test_reader_names_the_tensor_that_does_not_fit(tmp_path):
  read = diffusers_format.read_unet(saved(torch_unet(SMALL), tmp_path))
  good = diffusers_format.tensors_from_params(read.params)
  cases = {
      "down_blocks.0.resnets.0.extra.weight": dict(good, **{
          "down_blocks.0.resnets.0.extra.weight": np.zeros((3,), np.float32)}),
      "conv_in.weight": dict(good, **{"conv_in.weight": good["conv_in.weight"][:, :2]}),
      "mid_block.attentions.0.to_q.bias": {
          k: v for k, v in good.items() if k != "mid_block.attentions.0.to_q.bias"},
      "conv_out.bias": dict(good, **{"conv_out.bias": good["conv_out.bias"].astype(np.int32)}),
  }
  for name, tensors in cases.items():
    with pytest.raises(ValueError, match=re.escape(name)):
      diffusers_format.params_from_tensors(tensors, read.config)
  assert_trees_equal(diffusers_format.params_from_tensors(good, read.config), read.params)


# --- Configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("in_channels", 4),                                      # a latent (Stable Diffusion) U-Net
    ("down_block_types", ["CrossAttnDownBlock2D"] * 3),      # transformer blocks
    ("up_block_types", ["UpBlock2D"] * 3),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("transformer_layers_per_block", 2),
    ("class_embed_type", "projection"),
    ("addition_embed_type", "text_time"),
    ("dual_cross_attention", True),
    ("time_embedding_type", "fourier"),
    ("cross_attention_dim", [64, 64, 64]),
    ("layers_per_block", [1, 2]),
    ("attention_head_dim", 128),
    ("norm_num_groups", 24),
    ("dropout", 0.1),
    ("a_setting_from_the_future", 1),
    ("_class_name", "UNet2DModel"),
])
def test_config_refusals_name_the_key_and_value(key, value):
  with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
    if_unet.from_diffusers_config(dict(BASE, **{key: value}))


def test_config_round_trip_and_diffusers_defaults():
  for config in CONFIGS.values():
    parsed = if_unet.from_diffusers_config(config)
    assert if_unet.from_diffusers_config(parsed.to_diffusers_config()) == parsed
  sr = if_unet.from_diffusers_config(SR)
  assert sr.only_cross_attention == (False, False, True, True)
  assert not sr.mid_block_only_cross_attention  # a list leaves the middle block alone
  assert if_unet.from_diffusers_config(dict(BASE, only_cross_attention=True)
                                       ).mid_block_only_cross_attention
  with pytest.raises(ValueError, match="in_channels=4"):  # diffusers' default where omitted
    if_unet.from_diffusers_config({k: v for k, v in BASE.items() if k != "in_channels"})


def test_scheduler_config(tmp_path):
  scheduler = diffusers.DDPMScheduler(
      variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
      prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95,
      sample_max_value=1.5)
  scheduler.save_pretrained(str(tmp_path / "scheduler"))
  config = diffusers_format.read_scheduler_config(str(tmp_path))  # a pipeline directory
  assert config.num_train_timesteps == 1000 and config.beta_schedule == "squaredcos_cap_v2"
  assert config.variance_type == "learned_range" and config.thresholding
  assert (config.dynamic_thresholding_ratio, config.sample_max_value) == (0.95, 1.5)
  for key, value in scheduler.config.items():
    if not key.startswith("_"):
      assert getattr(config, key) == value, key
  path = tmp_path / "scheduler" / "scheduler_config.json"
  stored = json.loads(path.read_text())
  path.write_text(json.dumps(dict(stored, karras_sigmas=True)))
  with pytest.raises(ValueError, match="karras_sigmas=True"):
    diffusers_format.read_scheduler_config(str(path))
  path.write_text(json.dumps(dict(stored, _class_name="DDIMScheduler")))
  with pytest.raises(ValueError, match="'DDIMScheduler'"):
    diffusers_format.read_scheduler_config(str(path))


# --- IF's published sizes -----------------------------------------------------------------------

# IF's released U-Nets: config.json as published with DeepFloyd/IF-I-XL-v1.0 and
# DeepFloyd/IF-II-L-v1.0 (IF-II-L's time embedding, up blocks and size as convert_if.py sets
# them), and the parameter counts of their model cards.
IF_I_XL = dict(
    _BLOCKS, down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    sample_size=64, in_channels=3, out_channels=6, block_out_channels=[704, 1408, 2112, 2816],
    layers_per_block=3, attention_head_dim=64, cross_attention_dim=2816, encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=64, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", only_cross_attention=False,
    mid_block_scale_factor=1, upcast_attention=False, use_linear_projection=False)
IF_II_L = dict(
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", sample_size=256, in_channels=6,
    out_channels=6, block_out_channels=[160, 320, 640, 960, 1280],
    layers_per_block=[2, 2, 3, 5, 5], attention_head_dim=64, cross_attention_dim=1280,
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=64, class_embed_type="timestep",
    time_embedding_dim=1280, time_embedding_act_fn="gelu", resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552, mid_block_scale_factor=1.4142271248762552,
    cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
    only_cross_attention=False)
PARAM_AXES = {"embed", "mlp", "heads", "kv", "joined_kv", "conv_h", "conv_w", "norm", None}


@pytest.mark.parametrize("config,published", [(IF_I_XL, 4.3e9), (IF_II_L, 1.2e9)],
                         ids=["IF-I-XL", "IF-II-L"])
def test_published_sizes(config, published):
  count = if_unet.count_parameters(config)
  assert abs(count - published) < 0.04 * published, count
  with torch.device("meta"):  # diffusers' own count, without allocating the weights
    reference = diffusers.UNet2DConditionModel(**config)
  assert count == sum(p.numel() for p in reference.parameters())


def test_if_i_xl_is_fsdp_sharded():
  shapes = if_unet.param_shapes(if_unet.from_diffusers_config(IF_I_XL))
  boxes = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(b, nn.Partitioned) and set(b.names) <= PARAM_AXES for b in boxes)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 8, "model": 1})
  shardings = jax.tree_util.tree_leaves(partitioning.tree_shardings(shapes, mesh))
  sizes = [int(np.prod(b.value.shape)) for b in boxes]
  unsharded = sum(n for n, s in zip(sizes, shardings) if s.is_fully_replicated)
  assert unsharded < 0.001 * sum(sizes), unsharded  # norms and biases only
