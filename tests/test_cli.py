"""The `imagen-jax` command line: subcommands, config loading and override errors."""

import functools
import importlib

import pytest

import helpers  # pylint: disable=g-bad-import-order
from imagen_jax import cli
from imagen_jax.core import config_lib

run_cli = functools.partial(helpers.run_cli, env={"JAX_PLATFORMS": "cpu"}, timeout=300)


def test_help_lists_every_subcommand():
  out = run_cli("--help")
  assert out.returncode == 0
  for name in ("train", "encode", "sample", "demo", "eval", "inspect"):
    assert f"  {name} " in out.stdout
  assert run_cli().returncode == 2  # no subcommand is a usage error


def test_unknown_subcommand_fails():
  out = run_cli("trian")
  assert out.returncode == 2
  assert "'trian'" in out.stderr


@pytest.mark.parametrize("override,key", [
    ("--config.optimizer.lrr=3e-4", "optimizer.lrr"),
    ("--config.optimizr.lr=3e-4", "optimizr"),
    ("--config.batch_size=abc", "batch_size"),
    ("--config.optimizer.lr=fast", "optimizer.lr"),
])
def test_bad_override_exits_2_naming_the_key(override, key):
  out = run_cli("inspect", "--config=configs/base64.py:tiny", override)
  assert out.returncode == 2, out.stderr
  assert key in out.stderr
  assert "Traceback" not in out.stderr


def test_missing_config_file_exits_2(tmp_path):
  out = run_cli("inspect", f"--config={tmp_path}/nope.py")
  assert out.returncode == 2
  assert "nope.py" in out.stderr


def test_good_override_is_applied_and_configs_resolve_outside_the_repo(tmp_path):
  out = run_cli("inspect", "--config=configs/base64.py:tiny", "--config.optimizer.lr=0.00031",
                "--config.batch_size=24", cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert '"lr": 0.00031' in out.stdout
  assert '"batch_size": 24' in out.stdout
  # The parameter table counts real parameters (through the logical-axis boxes).
  from imagen_jax import models  # pylint: disable=g-import-not-at-top
  _, total = models.parameter_table(config_lib.load_config("configs/base64.py:tiny"))
  assert f"total_params: {total}\n" in out.stdout
  assert total > 1_000_000
  assert "conv_h,conv_w,embed,mlp" in out.stdout


def test_inspect_sizes_a_paper_model_without_building_it():
  out = run_cli("inspect", "--config=configs/sr256.py:paper")
  assert out.returncode == 0, out.stderr
  totals = [line for line in out.stdout.splitlines() if line.startswith("total_params: ")]
  assert len(totals) == 1
  assert 540e6 < int(totals[0].split()[1]) < 660e6  # the paper's 600M, within 10%


def test_load_config_matches_the_cli_rules():
  config = config_lib.load_config("configs/sr256.py:tiny", {"optimizer.lr": 2e-4})
  assert config.optimizer.lr == 2e-4
  assert config.stage == "sr"
  with pytest.raises(config_lib.ConfigError, match="optimizer.lrr"):
    config_lib.load_config("configs/sr256.py:tiny", {"optimizer.lrr": 2e-4})
  with pytest.raises(config_lib.ConfigError, match="batch_size"):
    config_lib.load_config("configs/sr256.py:tiny", {"batch_size": "many"})
  with pytest.raises(ValueError, match="huge"):
    config_lib.load_config("configs/sr256.py:huge")


def test_config_json_round_trip():
  config = config_lib.load_config("configs/base64.py:500m")
  again = config_lib.from_json(config_lib.to_json(config))
  assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_imports_and_has_a_main(name):
  # cli.main imports a subcommand's module only when that subcommand runs: a misspelt module
  # path or a missing main would otherwise surface only in front of a user.
  module_name, doc = cli.SUBCOMMANDS[name]
  module = importlib.import_module(module_name)
  assert callable(getattr(module, "main", None)), f"{module_name} has no callable main(argv)"
  assert doc and f"  {name} " in cli.usage()


def test_subcommand_help_exits_0_and_lists_its_flags():
  out = run_cli("train", "--help")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "--workdir" in out.stdout and "--config" in out.stdout
  assert "imagen-jax train" in out.stdout
  assert "--outdir" not in out.stdout  # the sample command's flags are not the train command's
