"""Per-device memory before launch (train/memory.py, `imagen-jax inspect --memory`)."""

import json

import jax
import pytest

from helpers import run_cli
from imagen_jax import models
from imagen_jax.core import config_lib
from imagen_jax.train import memory

TINY = "configs/base64.py:tiny"


@pytest.fixture(scope="module")
def config():
  return config_lib.load_config(TINY)


@pytest.fixture(scope="module")
def estimates(config):
  """The tiny base stage's training step: fsdp 1 at batches 2 and 4, fsdp 8 at batch 2."""
  one = memory.mesh_for(memory.parse_mesh("fsdp:1"))
  eight = memory.mesh_for(memory.parse_mesh("fsdp:8"))
  return {"b2": memory.train_step_memory(config, one, 2),
          "b4": memory.train_step_memory(config, one, 4),
          "fsdp8": memory.train_step_memory(config, eight, 2)}


def test_state_bytes_are_exact_on_one_device(config, estimates):
  _, count = models.parameter_table(config)
  est = estimates["b2"]
  assert est.params == est.ema == 4 * count  # float32 parameters and their EMA
  # Adam: two float32 moments per parameter, plus its step counts.
  assert config.optimizer.name == "adam"
  assert 2 * est.params <= est.optimizer <= 2 * est.params + 64


def test_twice_the_batch_needs_more_activation_memory_and_the_same_state(estimates):
  b2, b4 = estimates["b2"], estimates["b4"]
  assert (b4.params, b4.optimizer, b4.ema) == (b2.params, b2.optimizer, b2.ema)
  assert b4.inputs == 2 * b2.inputs
  assert b4.temporaries > 1.3 * b2.temporaries
  assert b4.total > b2.total


def test_fsdp_over_8_devices_holds_about_an_eighth_of_the_parameters(estimates):
  one, eight = estimates["b2"], estimates["fsdp8"]
  # Kernels whose sharded dimension 8 does not divide stay replicated (a few small ones).
  assert one.params / 8 <= eight.params < one.params / 6
  assert one.ema / 8 <= eight.ema < one.ema / 6
  assert eight.inputs == one.inputs  # the same batch per device


def test_a_lora_stage_counts_its_frozen_base(config, estimates):
  del config
  one = memory.mesh_for(memory.parse_mesh("fsdp:1"))
  tuned = memory.train_step_memory(config_lib.load_config(TINY + ",finetune"), one, 2)
  full = estimates["b2"]
  assert tuned.frozen == full.params  # the whole base, float32, held beside the adapters
  assert 0 < tuned.params < 0.2 * full.params and tuned.ema == tuned.params
  # No optimizer state or EMA for the frozen base: less state than training every parameter.
  assert tuned.optimizer < 0.2 * full.optimizer
  assert tuned.params + tuned.ema + tuned.optimizer + tuned.frozen < (
      full.params + full.ema + full.optimizer)
  assert "frozen base parameters (LoRA)" in memory.format_report(tuned)


def test_the_estimate_compiles_what_accelerators_run(config):
  # "auto" would pick the CPU's chunked attention and matmul weight gradients on fake devices.
  planned = memory._for_planning(config, 16)  # pylint: disable=protected-access
  assert (planned.model.attention_impl, planned.model.conv_impl) == ("xla", "xla")
  assert planned.batch_size == 16 and planned.data.embed_cache
  assert config.model.attention_impl == "auto"  # the caller's config is left alone
  chosen = config_lib.load_config(TINY, {"model.attention_impl": "chunked"})
  assert memory._for_planning(chosen, 16).model.attention_impl == "chunked"  # pylint: disable=protected-access


def test_largest_batch_is_read_off_the_line_through_two_compiles(estimates):
  b2, b4 = estimates["b2"], estimates["b4"]
  per_example = (b4.total - b2.total) / 2
  capacity = b2.total + 10.5 * per_example  # room for 10 more examples
  assert memory.largest_batch(b2, b4, capacity) == 12
  assert memory.largest_batch(b2, b4, b2.total - 2 * per_example - 1) == 0  # below the fixed part


def test_sampler_memory_grows_with_the_batch(config):
  mesh = memory.mesh_for(memory.parse_mesh("data:1"))
  small, large = (memory.sampler_memory(config, mesh, b) for b in (1, 4))
  assert small.params == large.params > 0 and small.optimizer == 0
  assert large.temporaries > small.temporaries
  assert large.inputs == 4 * small.inputs


@pytest.mark.parametrize("spec,error", [("fsdp8", "AXIS:SIZE"), ("pipeline:2", "AXIS:SIZE"),
                                        ("fsdp:0", "AXIS:SIZE")])
def test_bad_mesh_specs_are_named(spec, error):
  with pytest.raises(ValueError, match=error):
    memory.parse_mesh(spec)


def test_a_mesh_larger_than_the_devices_is_a_clear_error():
  with pytest.raises(ValueError, match=f"needs {2 * jax.device_count()} devices"):
    memory.mesh_for({"data": 2 * jax.device_count(), "fsdp": 1, "model": 1})


@pytest.mark.slow
def test_inspect_memory_command_makes_its_own_fake_devices(tmp_path):
  # No fake devices from the environment: the command must create the 4 the mesh needs.
  out = run_cli("inspect", f"--config={TINY}", "--memory", "--mesh=data:2,fsdp:2",
                "--batch_size=2", "--device=h100", cwd=tmp_path, env={"XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.split("MEMORY_JSON ", 1)[1])
  assert report["mesh"] == {"data": 2, "fsdp": 2, "model": 1}
  assert report["per_device_batch"] == 2 and report["device"] == "h100"
  # The command's figures are the library's for the same config, mesh and batch.
  expected = memory.train_step_memory(config_lib.load_config(TINY), memory.mesh_for(
      {"data": 2, "fsdp": 2, "model": 1}), 2)
  for key in ("params", "ema", "optimizer", "frozen", "inputs"):
    assert report[key] == getattr(expected, key), key
  assert report["largest_per_device_batch"] > 2
  assert "estimate" in out.stdout and "h100" in out.stdout
