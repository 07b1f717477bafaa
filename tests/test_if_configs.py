"""The DeepFloyd IF stage configs (configs/if_stage1.py, configs/if_stage2.py): their networks'
sizes against IF's published parameter counts, IF-I-XL's and IF-II-L's networks against their
published config.json, the settings IF's stages share, and the variants' names.

Sizes are counted from parameter shapes alone (jax.eval_shape: a 4.3B network allocates nothing).
"""

import jax
import flax.linen as nn
import numpy as np
import pytest

from imagen_jax import models
from imagen_jax.configs import common
from imagen_jax.configs import if_stage1
from imagen_jax.configs import if_stage2
from imagen_jax.core import config_lib
from imagen_jax.models import if_unet

STAGES = {"if_stage1": if_stage1, "if_stage2": if_stage2}
# The model cards' counts (DeepFloyd/IF-*-v1.0, and the model zoo table of deep-floyd/IF).
PUBLISHED = {("if_stage1", "xl"): 4.3e9, ("if_stage1", "l"): 900e6, ("if_stage1", "m"): 400e6,
             ("if_stage2", "l"): 1.2e9, ("if_stage2", "m"): 450e6}
VARIANTS = [*PUBLISHED, ("if_stage1", "tiny"), ("if_stage2", "tiny")]


def _ids(pairs):
  return [f"{stage}:{variant}" for stage, variant in pairs]

# The networks' settings as DeepFloyd/IF-I-XL-v1.0 and DeepFloyd/IF-II-L-v1.0 publish them in
# unet/config.json (the keys that shape the network; the rest are diffusers' defaults).
_SHARED = dict(
    act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=64,
    attention_head_dim=64, cross_attention_norm="group_norm", encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    only_cross_attention=False, out_channels=6, resnet_time_scale_shift="scale_shift")
IF_I_XL = dict(
    _SHARED, block_out_channels=[704, 1408, 2112, 2816], cross_attention_dim=2816, in_channels=3,
    layers_per_block=3, class_embed_type=None, mid_block_scale_factor=1,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, time_embedding_dim=None,
    time_embedding_act_fn=None,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"])
IF_II_L = dict(
    _SHARED, block_out_channels=[160, 320, 640, 960, 1280], cross_attention_dim=1280,
    in_channels=6, layers_per_block=[2, 2, 3, 5, 5], class_embed_type="timestep",
    mid_block_scale_factor=1.4142271248762552, resnet_out_scale_factor=1.4142271248762552,
    resnet_skip_time_act=True, time_embedding_dim=1280, time_embedding_act_fn="gelu",
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3)


def config(stage, variant):
  return STAGES[stage].get_config(variant)


def count(c):
  """Parameters of the stage's IF U-Net, from its diffusers config dict."""
  shapes = if_unet.param_shapes(if_unet.from_diffusers_config(c.model.diffusers.to_dict()))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("stage,variant", list(PUBLISHED), ids=_ids(PUBLISHED))
def test_published_sizes(stage, variant):
  n, published = count(config(stage, variant)), PUBLISHED[stage, variant]
  assert abs(n - published) <= 0.05 * published, (stage, variant, n, published)


@pytest.mark.parametrize("stage,variant,published",
                         [("if_stage1", "xl", IF_I_XL), ("if_stage2", "l", IF_II_L)],
                         ids=["IF-I-XL", "IF-II-L"])
def test_published_networks(stage, variant, published):
  ours = config(stage, variant).model.diffusers.to_dict()
  assert {key: ours.get(key) for key in published} == published
  assert if_unet.from_diffusers_config(ours) == if_unet.from_diffusers_config(published)


@pytest.mark.parametrize("stage", ["if_stage1", "if_stage2"])
def test_tiny_is_cpu_sized(stage):
  c = config(stage, "tiny")
  assert count(c) < 2_000_000
  assert c.text.encoder == "builtin:shapes-tiny" and c.text.width == 64
  assert c.image_size == 32 and c.batch_size <= 16


@pytest.mark.parametrize("stage,variant", VARIANTS, ids=_ids(VARIANTS))
def test_if_settings(stage, variant):
  c = config(stage, variant)
  sr = stage == "if_stage2"
  expected = {
      "model.name": "if_unet", "model.remat": "none", "model.attention_impl": "auto",
      "diffusion.timesteps": 1000, "diffusion.schedule": "cosine",
      "diffusion.parameterization": "eps", "diffusion.variance": "learned_range",
      "text.output_layer": -1, "text.null": "empty_prompt", "text.pad_outputs": "keep",
      "stage": "sr" if sr else "base",
      "sample.sampler": "ddpm", "sample.spacing": "leading", "sample.threshold": "dynamic",
      "sample.percentile": 95.0, "sample.threshold_max": 1.0 if sr else 1.5,
  }
  if variant != "tiny":
    expected.update({
        "text.encoder": "t5-v1_1-xxl", "text.width": 4096, "text.max_length": 77,
        "image_size": 256 if sr else 64, "sample.steps": 50 if sr else 100,
        "sample.guidance": 4.0 if sr else 7.0})
  if sr:
    expected.update({"lowres.size": 64 if variant != "tiny" else 16,
                     "lowres.aug_timesteps": 1000, "lowres.aug_schedule": "cosine",
                     "lowres.augment_at": "output", "sample.aug_level": 0.251})
  for key, value in expected.items():
    node = c
    for part in key.split("."):
      node = node[part]
    assert node == value, (key, node, value)
  unet = c.model.diffusers
  assert unet["_class_name"] == "UNet2DConditionModel"
  assert unet["in_channels"] == (6 if sr else 3) and unet["out_channels"] == 6
  assert unet["encoder_hid_dim"] == c.text.width
  assert unet["class_embed_type"] == ("timestep" if sr else None)
  assert unet["sample_size"] == c.image_size
  models.build_model(c)  # the stage's checks: channels, class embedding, text width, schedule


@pytest.mark.parametrize("stage,variant", VARIANTS, ids=_ids(VARIANTS))
def test_every_variant_finetunes(stage, variant):
  c = config(stage, f"{variant},finetune")
  assert c.finetune.method == "lora" and c.optimizer.schedule == "constant"
  assert c.model.diffusers.to_dict() == config(stage, variant).model.diffusers.to_dict()


def test_defaults_and_spec_loading():
  assert count(if_stage1.get_config()) == count(config("if_stage1", "xl"))
  assert if_stage2.get_config().model.diffusers.to_dict() == \
      config("if_stage2", "l").model.diffusers.to_dict()
  c = config_lib.load_config("configs/if_stage2.py:tiny", {"sample.steps": 10})
  assert c.lowres.size == 16 and c.model.name == "if_unet" and c.sample.steps == 10


@pytest.mark.parametrize("stage", ["if_stage1", "if_stage2"])
def test_unknown_variants_are_named(stage):
  with pytest.raises(ValueError, match="'huge'"):
    config(stage, "huge")
  with pytest.raises(ValueError, match="one size variant"):
    config(stage, "tiny,m")
  with pytest.raises(ValueError, match="one size variant"):
    common.parse_variants("tiny,m,finetune", default="tiny")
