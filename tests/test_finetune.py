"""Fine-tuning: LoRA adapters (models/lora.py), the training plan (train/plan.py), full
fine-tuning, class-prior preservation, `imagen-jax finetune` (workflows/finetune.py), sampling
with a LoRA workdir."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (FINETUNE_RUN, SMALL_BASE_NET, assert_trees_equal, run_cli,
                      tiny_config)
from imagen_jax import models
from imagen_jax.core import random_streams
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import partitioning
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import shapes
from imagen_jax.data import shapes_grammar as grammar
from imagen_jax.data import sources
from imagen_jax.models import lora
from imagen_jax.train import plan as plan_lib
from imagen_jax.train import step as step_lib

ATTENTION_LAYERS = {"query", "key", "value", "text_key", "text_value", "out"}


NETWORKS = {"base": ("base64", SMALL_BASE_NET), "sr": ("sr256", {})}


def network(name):
  """(config, model, params with every parameter non-zero, random inputs for 2 examples) of a
  tiny U-Net ("base") or Efficient U-Net ("sr")."""
  stage, settings = NETWORKS[name]
  config = tiny_config(stage, **settings)
  model = models.build_model(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **models.init_inputs(config))["params"])
  # Zero-initialized layers (output convs, attention outputs) would hide a wrong branch.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  inputs = models.init_inputs(config, batch_size=2)
  for i, name in enumerate(("x", "text_emb", "lowres")):
    if inputs[name] is not None:
      inputs[name] = jax.random.normal(jax.random.PRNGKey(10 + i), inputs[name].shape)
  inputs["log_snr"] = jnp.array([-2.0, 3.0])
  return config, model, params, inputs


def perturbed(adapters, seed=6):
  """Adapters with b != 0 (a fresh adapter's b is zero)."""
  leaves, tree = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def plain_apply(model, params, inputs):
  return jax.jit(lambda p: model.apply({"params": p}, **inputs))(params)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_adapters_fresh_merged_and_unmerged(name):
  """Fresh adapters are exactly the base model; trained ones give the same outputs merged into
  the kernels as beside them; scale 0 is the base again."""
  config, model, params, inputs = network(name)
  base = plain_apply(model, params, inputs)
  spec = lora.LoraSpec(4, 8.0, lora.GROUPS)
  fresh = nn.unbox(lora.init_adapters(jax.random.PRNGKey(2), model, config, spec))
  assert all(not np.any(a["b"]) and np.std(a["a"]) > 0 for _, a in lora.adapter_paths(fresh))
  apply_fn = jax.jit(lambda p, a, scale: lora.apply(model, p, a, spec, scale, **inputs))
  # The same arithmetic plus x @ a @ 0, compiled as another program: equal up to its float
  # rounding (bitwise on AVX2 CPUs; AVX-512 kernels fuse it differently, 7e-7 apart). A wrong
  # scale or a non-zero b would be off by the adapters' size, ~1e-2.
  np.testing.assert_allclose(apply_fn(params, fresh, 1.0), base, rtol=0, atol=2e-6)
  assert_trees_equal(lora.merge(params, fresh, spec), params)
  trained = perturbed(fresh)
  unmerged = apply_fn(params, trained, 0.7)
  merged = plain_apply(model, lora.merge(params, trained, spec, 0.7), inputs)
  assert float(jnp.abs(unmerged - base).max()) > 0.1  # the adapters change the output
  np.testing.assert_allclose(unmerged, merged, atol=2e-5 * float(jnp.abs(base).max()))
  assert_trees_equal(lora.merge(params, trained, spec, 0.0), params)


def test_layer_groups_pick_their_layers():
  config, model, params, _ = network("base")
  kernels = {path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if path[-1].key == "kernel"}
  kernels = {tuple(k.key for k in path) for path in kernels}
  by_group = {g: {t.path for t in lora.targets(model, config, lora.LoraSpec(layers=(g,)))}
              for g in lora.GROUPS}
  assert all(path[-1] in ATTENTION_LAYERS and "attn" in path[-2] for path in by_group["attention"])
  assert not any(path[-1] in ATTENTION_LAYERS and "attn" in path[-2] for path in by_group["dense"])
  assert all(path[-1].startswith(("conv", "skip", "stem", "out_conv", "in_conv")) or "conv" in
             path[-1] for path in by_group["conv"])
  # Every kernel belongs to exactly one group; the groups are disjoint.
  assert set().union(*by_group.values()) == kernels
  assert sum(map(len, by_group.values())) == len(kernels)
  # Each adapter's shapes: a [fan_in, rank], b [rank, out] of its kernel.
  spec = lora.LoraSpec(rank=3, layers=lora.GROUPS)
  adapters = nn.unbox(lora.init_adapters(jax.random.PRNGKey(0), model, config, spec))
  for path, adapter in lora.adapter_paths(adapters):
    kernel = params
    for name in path:
      kernel = kernel[name]
    kernel = kernel["kernel"]
    assert adapter["a"].shape == (int(np.prod(kernel.shape[:-1])), 3)
    assert adapter["b"].shape == (3, kernel.shape[-1])


@pytest.mark.parametrize("bad,message", [
    (dict(lora_rank=0), "lora_rank"), (dict(lora_layers="attention,mlp"), "lora_layers"),
    (dict(lora_layers=""), "lora_layers")])
def test_bad_lora_settings_are_named(bad, message):
  config = tiny_config("base64", "tiny,finetune", **{f"finetune.{k}": v for k, v in bad.items()})
  with pytest.raises(config_lib.ConfigError, match=f"config.finetune.{message}"):
    plan_lib.Plan.from_config(config)


def test_plan_of_each_method():
  scratch = plan_lib.Plan.from_config(tiny_config("base64"))
  assert (scratch.method, scratch.lora, scratch.base, scratch.uses_prior) == (
      "none", None, None, False)
  tuned = plan_lib.Plan.from_config(tiny_config("base64", "tiny,finetune", **{
      "finetune.base": "/b", "finetune.base_step": 7, "finetune.lora_rank": 3,
      "finetune.lora_layers": "attention, conv", "finetune.prior_class": "a triangle",
      "finetune.prior_weight": 0.25}))
  assert tuned.method == "lora" and tuned.lora == lora.LoraSpec(3, 8.0, ("attention", "conv"))
  assert tuned.base == plan_lib.Base("/b", 7) and tuned.prior_weight == 0.25
  full = plan_lib.Plan.from_config(tiny_config("base64", "tiny,finetune",
                                               **{"finetune.method": "full"}))
  assert full.method == "full" and full.lora is None and not full.uses_prior
  with pytest.raises(config_lib.ConfigError, match="finetune.method='half'"):
    plan_lib.Plan.from_config(tiny_config("base64", **{"finetune.method": "half"}))


def test_random_streams_never_meet_the_training_steps():
  """LoRA adapters and class-prior images draw from streams of their own: adapter i is not
  drawn from training step i's key, nor class image i from step i's keys."""
  config = tiny_config("base64", "tiny,finetune", **SMALL_BASE_NET)
  plan = plan_lib.Plan.from_config(config)
  model = models.build_model(config)
  adapters = plan.initial_trainable(config, model, None)()
  targets = lora.targets(model, config, plan.lora)
  step_keys = [jax.random.fold_in(jax.random.PRNGKey(config.seed), i) for i in range(len(targets))]
  for i, target in enumerate(targets):
    a = adapters
    for name in target.path:
      a = a[name]
    a = a["a"]
    fan_in = a.shape[0]
    for key in (step_keys[i], *jax.random.split(step_keys[i], 4)):  # the step and its draws
      assert not np.allclose(a, jax.random.normal(key, a.shape) / np.sqrt(fan_in))
  # What the adapters do draw from: the "lora_adapters" stream, folded per target.
  stream = random_streams.stream_key(config.seed, "lora_adapters")
  first = targets[0]
  a0 = adapters
  for name in first.path:
    a0 = a0[name]
  np.testing.assert_allclose(a0["a"], jax.random.normal(
      jax.random.fold_in(stream, 0), a0["a"].shape) / np.sqrt(a0["a"].shape[0]), rtol=1e-6)
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
  prior_keys = np.asarray(stage_sampler.image_keys(plan_lib.prior_seed(config), np.arange(64)))
  steps = [jax.random.fold_in(jax.random.PRNGKey(config.seed), i) for i in range(64)]
  drawn = {tuple(np.asarray(k).tolist()) for key in steps
           for k in (key, *jax.random.split(key, 4))}
  assert not drawn & {tuple(k.tolist()) for k in prior_keys}
  assert plan_lib.prior_seed(config) != config.seed


def test_the_finetune_variant_sets_the_ordinary_training_keys():
  stage = tiny_config("base64", **{"data.embed_cache": "/x"})
  tuned = tiny_config("base64", "tiny,finetune")
  assert (tuned.finetune.method, tuned.total_steps, tuned.optimizer.name, tuned.optimizer.lr,
          tuned.optimizer.schedule, tuned.data.embed_cache, tuned.sample_every) == (
              "lora", 400, "adam", 1e-3, "constant", "", 0)
  assert tuned.batch_size == stage.batch_size and tuned.model == stage.model
  assert tuned.checkpoint_every <= 400 and stage.total_steps != 400
  assert "steps" not in tuned.finetune and "lr" not in tuned.finetune  # one key per setting
  assert config_lib.load_config("configs/base64.py:finetune").model.model_dim == 512  # paper
  with pytest.raises(ValueError, match="one size variant"):
    tiny_config("base64", "tiny,paper")


def test_adapters_shard_by_their_kernels_axes():
  config = tiny_config("base64")
  model = models.build_model(config)
  spec = lora.LoraSpec(rank=8, layers=lora.GROUPS)
  boxed = jax.eval_shape(lambda k: lora.init_adapters(k, model, config, spec),
                         jax.random.PRNGKey(0))
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 2, "model": 4})
  shardings = partitioning.tree_shardings(boxed, mesh)
  kernels = partitioning.tree_shardings(models.param_shapes(config), mesh)
  checked = 0
  for path, adapter in lora.adapter_paths(shardings):
    kernel = kernels
    for name in path:
      kernel = kernel[name]
    kernel_spec = tuple(kernel["kernel"].spec) + (None,) * 4
    a_spec, b_spec = tuple(adapter["a"].spec) + (None,), tuple(adapter["b"].spec) + (None,)
    assert a_spec[1] is None and b_spec[0] is None  # the rank is never split
    assert b_spec[1] == kernel_spec[len(kernel["kernel"].spec) - 1 if kernel["kernel"].spec else 0]
    if len(path) and path[-1] in ATTENTION_LAYERS:  # dense [in, out]: a splits as the kernel's in
      assert a_spec[0] == kernel_spec[0]
    checked += b_spec[1] is not None
  assert checked > 0  # some output axes are split over 'model' as their kernels' are


def test_loss_weight_weights_each_example():
  config = tiny_config("base64", **SMALL_BASE_NET)
  model = models.build_model(config)
  params = model.init(jax.random.PRNGKey(1), **models.init_inputs(config))["params"]
  length, width = config.text.max_length, config.text.width
  batch = {"image": jnp.full((4, 16, 16, 3), 100, jnp.uint8),
           "text_mask": jnp.ones((4, length), bool),
           "text_emb": jax.random.normal(jax.random.PRNGKey(0), (4, length, width))}
  loss_fn = jax.jit(step_lib.make_loss_fn(config, model, text_apply=None))
  plain, (per_example, _) = loss_fn(params, batch, None, jax.random.PRNGKey(3))
  np.testing.assert_allclose(plain, per_example.mean(), rtol=1e-6)
  weights = jnp.array([1.0, 1.0, 0.25, 0.25])
  weighted, (same, _) = loss_fn(params, {**batch, "loss_weight": weights}, None,
                                jax.random.PRNGKey(3))
  np.testing.assert_array_equal(same, per_example)
  np.testing.assert_allclose(weighted, (per_example * weights).mean(), rtol=1e-6)
  assert abs(float(weighted) - float(plain)) > 1e-4


class _FakePipeline:
  def __init__(self, value, batch):
    self.value, self.local_batch_size, self.position = value, batch, 0

  def __next__(self):
    self.position += 1
    return {"image": np.full((self.local_batch_size, 2, 2, 3), self.value, np.uint8),
            "index": np.arange(self.local_batch_size) + 100 * self.position}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]

  def skip_counts(self):
    return {"corrupt_image": self.value}

  def convert_counts(self):
    return {}

  def close(self):
    self.closed = True


def test_mixture_batches_weights_and_state():
  parts = [_FakePipeline(1, 2), _FakePipeline(2, 2)]
  mix = pipeline_lib.Mixture(parts, [1.0, 0.5])
  batch = next(mix)
  assert batch["image"].shape == (4, 2, 2, 3)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [1, 1, 2, 2])
  np.testing.assert_array_equal(batch["loss_weight"], [1.0, 1.0, 0.5, 0.5])
  state = mix.get_state()
  following = next(mix)
  mix.set_state(state)
  np.testing.assert_array_equal(next(mix)["index"], following["index"])
  assert mix.skip_counts() == {"corrupt_image": 3}
  with pytest.raises(ValueError, match="mixture"):
    mix.set_state({"iterator": 1})


def test_base_without_checkpoint_is_named(tmp_path):
  config = tiny_config("base64", "tiny,finetune", **{"finetune.base": str(tmp_path / "nothing")})
  with pytest.raises(plan_lib.FinetuneError, match="nothing.*no complete checkpoint"):
    plan_lib.prepare(config, str(tmp_path / "out"))
  config.finetune.base = ""
  with pytest.raises(plan_lib.FinetuneError, match="--base"):
    plan_lib.prepare(config, str(tmp_path / "out"))


def test_finetune_without_a_finetuning_config_names_the_variant(tmp_path):
  from imagen_jax.workflows import finetune as finetune_run  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match="finetune` variant"):
    finetune_run.run(tiny_config("base64"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# --- Training runs (slow) ----------------------------------------------------------------------

BLICKET = grammar.Obj("yellow", "triangle")


def finetune_settings(base, subject, data_dir, **overrides):
  """A tiny fine-tuning run of the tiny cascade's 16x16 base stage."""
  return {**FINETUNE_RUN, "data.source": f"folder:{subject}", "data.data_dir": data_dir,
          "finetune.base": base, **overrides}


@pytest.fixture
def subject(tmp_path):
  folder = str(tmp_path / "subject")
  shapes.write_subject_folder(folder, BLICKET, "blicket", [(0, 0), (1, 1), (2, 1)])
  return folder


def stored_state(workdir, step=None):
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  return ckpt.restore_as_stored(ckpt.latest_step() if step is None else step)


@pytest.mark.slow
def test_lora_finetune_command_resume_and_sampling(tiny_cascade, tiny_lora, tmp_path):
  from imagen_jax.diffusion import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import stage_sampler  # pylint: disable=g-import-not-at-top
  from imagen_jax.sample import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.workflows import finetune as imagen_finetune  # pylint: disable=g-import-not-at-top
  base, sr = tiny_cascade
  # `tiny_lora` ran `imagen-jax finetune` (relative paths) on the base; its config in-process:
  lora_dir = tiny_lora["workdir"]
  config = tiny_config("base64", "tiny,finetune", **tiny_lora["settings"])

  # The class images: sampled from the base with their own seed, listed for the folder source.
  prior = plan_lib.prior_folder(config, lora_dir)
  captions = [json.loads(l) for l in open(os.path.join(prior, "captions.jsonl"))]
  assert [c["caption"] for c in captions] == ["a triangle"] * 3
  assert all(os.path.exists(os.path.join(prior, c["file"])) for c in captions)
  records = [json.loads(l) for l in open(os.path.join(prior, "samples.jsonl"))]
  assert {r["seed"] for r in records} == {plan_lib.prior_seed(config)}

  # The checkpoint: adapters only, the base named with its step; the base untouched.
  stored = stored_state(lora_dir)
  spec = plan_lib.Plan.from_config(config).lora
  fresh = nn.unbox(lora.init_adapters(jax.random.PRNGKey(config.seed), models.build_model(config),
                                      config, spec))
  adapters = stored["state"]["params"]
  assert jax.tree_util.tree_structure(adapters) == jax.tree_util.tree_structure(fresh)
  assert lora.count(adapters) < 0.2 * sum(x.size for x in jax.tree_util.tree_leaves(
      nn.unbox(models.param_shapes(config))))
  # b starts at zero; every attention adapter trained. (The tiny base's residual blocks end in
  # convolutions still exactly zero after its 2 steps, so nothing reaches their emb_proj yet.)
  attention = [a for path, a in lora.adapter_paths(adapters) if path[-1] in ATTENTION_LAYERS]
  assert attention and all(np.any(a["b"] != 0) for a in attention)
  assert stored["config"]["finetune"]["base"] == base
  assert stored["config"]["finetune"]["base_step"] == 2
  # The base stage is read, never written: its newest file predates the fine-tuning.
  newest_base_file = max(os.path.getmtime(os.path.join(r, f))
                         for r, _, fs in os.walk(base) for f in fs)
  assert newest_base_file < os.path.getmtime(os.path.join(lora_dir, "config.json"))

  # Resume: 2 steps, stop, then on to 4 = 4 straight (adapters, EMA, optimizer, data).
  resumed = str(tmp_path / "resumed")
  first = config_lib.copy(config)
  first.total_steps = 2
  imagen_finetune.run(first, resumed)
  imagen_finetune.run(config, resumed)
  # The same examples were read (the class images lie in each workdir: only their path differs).
  positions = lambda data: [part["iterator"] for part in data["mixture"]]
  assert positions(stored_state(resumed)["data"]) == positions(stored["data"])
  assert_trees_equal(stored_state(resumed)["state"], stored["state"])

  # Sampling: the LoRA workdir in place of the base stage, the adapters merged once; scale 0
  # is the base stage itself, and unmerged adapters sample the merged ones' images.
  tuned = cascade_lib.Cascade.from_workdirs([lora_dir, sr])
  assert tuned.stages[0].lora == {"base": base, "base_step": 2, "scale": 1.0}
  off = cascade_lib.Cascade.from_workdirs([lora_dir], lora_scale=0.0).stages[0]
  assert_trees_equal(off.params, cascade_lib.Cascade.from_workdirs([base]).stages[0].params)
  stage = tuned.stages[0]
  base_params = jax.device_put(off.params)

  class Unmerged:
    def apply(self, variables, *args, **kwargs):
      return lora.apply(stage.model, base_params, variables["params"], spec, 1.0, *args, **kwargs)

  emb, mask = tuned.text_encoder.encode(["a blicket at the center", "a red circle at the top"])
  keys = noise_lib.fold_in(stage_sampler.image_keys(1, np.arange(2)), 0)
  settings = tuned.default_settings(steps=3)[0]
  run = lambda model, params: jax.jit(lambda p: stage_sampler.sample_stage(
      stage.config, model, p, keys, emb, mask, settings=settings, image_size=16))(params)
  merged = run(stage.model, stage.params)
  np.testing.assert_allclose(run(Unmerged(), stored["state"]["ema_params"]), merged, atol=1e-4)
  assert float(jnp.abs(merged - run(stage.model, off.params)).max()) > 1e-3


@pytest.mark.slow
def test_full_finetune_starts_from_the_base_ema(tiny_cascade, subject, tmp_path):
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top
  base = tiny_cascade[0]
  config = tiny_config("base64", "tiny,finetune", **finetune_settings(
      base, subject, str(tmp_path / "data"), **{
          "finetune.method": "full", "optimizer.lr": 0.0, "total_steps": 2}))
  train.train_and_evaluate(config, str(tmp_path / "full"))
  state = stored_state(str(tmp_path / "full"))["state"]
  base_ema = stored_state(base)["state"]["ema_params"]
  # At learning rate 0 the parameters stay the base's EMA parameters, bit for bit.
  assert_trees_equal(state["params"], base_ema)
  jax.tree_util.tree_map(lambda e, b: np.testing.assert_allclose(e, b, rtol=1e-6, atol=1e-9),
                         state["ema_params"], base_ema)
  assert int(state["step"]) == 2


@pytest.mark.slow
def test_finetune_bad_inputs_are_named_before_compute(tiny_cascade, tmp_path):
  base = tiny_cascade[0]
  data_dir = str(tmp_path / "data")
  empty = tmp_path / "empty"
  empty.mkdir()
  unreadable = tmp_path / "unreadable"
  unreadable.mkdir()
  (unreadable / "a.png").write_bytes(b"not a png")
  (unreadable / "a.txt").write_text("a blicket")
  cases = [
      ({"data.source": f"folder:{empty}"}, sources.SourceError, "empty.*none found"),
      ({"data.source": f"folder:{unreadable}"}, sources.SourceError,
       "unreadable.*no usable image.*corrupt_image"),
      ({"model.model_dim": 8}, plan_lib.FinetuneError, "parameter conditioning/.*kernel is"),
      ({"text.output_layer": 0}, plan_lib.FinetuneError,
       r"text.output_layer=0 but the base stage .* was trained with -1"),
      ({"finetune.base_step": 7}, plan_lib.FinetuneError, r"no checkpoint at step 7.*\[2\]"),
  ]
  subject = tmp_path / "subject"
  shapes.write_subject_folder(str(subject), BLICKET, "blicket", [(0, 0)])
  for overrides, error, message in cases:
    config = tiny_config("base64", "tiny,finetune", **finetune_settings(
        base, str(subject), data_dir, **overrides))
    with pytest.raises(error, match=message):
      plan_lib.prepare(config, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "checkpoints").exists()
  # The command says it in one line, exit code 2.
  result = run_cli("finetune", "--config=configs/base64.py:tiny,finetune", f"--base={base}",
                   f"--workdir={tmp_path / 'out'}", f"--config.data.source=folder:{empty}",
                   f"--config.data.data_dir={data_dir}", "--config.image_size=16", check=False)
  assert result.returncode == 2 and "imagen-jax: error:" in result.stderr
  assert "no usable image" in result.stderr and "Traceback" not in result.stderr
