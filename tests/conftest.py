"""Test setup: 8 fake CPU devices for sharding tests (set before JAX is imported), and what the
test files share: the small shapes datasets, tiny stage configs, a trained cascade, the command
line in a subprocess, a GCS emulator, the README's commands."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

# Appended, not set by default: a user's own XLA_FLAGS must not silently drop the 8 fake devices
# (the sharding tests would then have fewer devices than they need and fail, not skip).
FAKE_DEVICES = 8
_xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                    os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count={FAKE_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests compile the same tiny programs (in this process and in the subprocesses they start,
# which inherit the environment): JAX's persistent compilation cache halves their run time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "imagen_jax_test_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_SHAPES = {"train": 512, "validation": 64, "heldout": 64}


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A small `shapes` dataset (64x64), built once per test session: its TFDS data_dir."""
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("shapes_data"))
  shapes.build(data_dir, 64, num_examples=SMALL_SHAPES, num_workers=1)
  return data_dir


# --- Tiny stage configs ------------------------------------------------------------------------

# A run of a few steps: no preview samples, a log line and a scalar every step.
SHORT_RUN = {"batch_size": 8, "total_steps": 4, "checkpoint_every": 2, "log_every": 1,
             "sample_every": 0, "optimizer.warmup_steps": 2}
# base64:tiny at 16x16 with a narrower U-Net: it compiles twice as fast; the loop is the same.
SMALL_BASE_NET = {"image_size": 16, "model.channel_mult": (1, 2), "model.model_dim": 16,
                  "model.emb_dim": 32, "model.pool_width": 32}


def tiny_config(stage: str = "base64", **settings: Any) -> ml_collections.ConfigDict:
  """`configs/<stage>.py:tiny` with `settings` ({"optimizer.lr": 3e-4, ...}) applied by the CLI's
  rules: one loader for every test, so a renamed config field is fixed in one place."""
  from imagen_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config(f"configs/{stage}.py:tiny", settings)


def short_run_settings(data_dir: str | None = None, *, small_net: bool = True,
                       **overrides: Any) -> dict[str, Any]:
  """Settings of base64:tiny for a short training run (SHORT_RUN, and SMALL_BASE_NET unless
  `small_net` is False) reading `data_dir`, then `overrides`: for tiny_config or config_flags."""
  settings = {**SHORT_RUN, **(SMALL_BASE_NET if small_net else {})}
  if data_dir is not None:
    settings["data.data_dir"] = data_dir
  return {**settings, **overrides}


def short_run_config(data_dir: str | None = None, *, small_net: bool = True,
                     **overrides: Any) -> ml_collections.ConfigDict:
  """The config of short_run_settings: a tiny base stage that trains a few steps in seconds."""
  return tiny_config("base64", **short_run_settings(data_dir, small_net=small_net, **overrides))


def config_flags(settings: Mapping[str, Any]) -> list[str]:
  """The `--config.KEY=VALUE` flags that apply `settings` on the command line."""
  return [f"--config.{key}={value}" for key, value in settings.items()]


# --- A trained cascade, for the sampling tests -------------------------------------------------

def train_tiny_stage(workdir: str | os.PathLike, stage: str, data_dir: str,
                     **overrides: Any) -> str:
  """Trains `configs/<stage>.py:tiny` a few steps into `workdir` (a stage for sampling tests)."""
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top
  settings = {"data.data_dir": data_dir, "batch_size": 8, "total_steps": 2, "log_every": 2,
              "checkpoint_every": 2, "sample_every": 0, **overrides}
  train.train_and_evaluate(tiny_config(stage, **settings), str(workdir))
  return str(workdir)


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory, shapes_data_dir):
  """Workdirs of a two-stage cascade, 16x16 base -> 32x32 SR, trained for 2 steps each.

  Shared by every test that samples: they only read it (checkpoints restore read-only). A test
  that writes into a stage's workdir must copy it first (shutil.copytree to its tmp_path).
  """
  root = tmp_path_factory.mktemp("cascade")
  base = train_tiny_stage(root / "base", "base64", shapes_data_dir, image_size=16)
  sr = train_tiny_stage(root / "sr", "sr256", shapes_data_dir)
  return [base, sr]


# Fine-tuning the tiny cascade's 16x16 base: a few LoRA steps (tests/test_finetune.py).
FINETUNE_RUN = {"image_size": 16, "finetune.steps": 4, "finetune.batch_size": 8,
                "finetune.warmup_steps": 1, "finetune.lora_rank": 2, "checkpoint_every": 2}
FINETUNE_PRIOR = {"finetune.prior_class": "a triangle", "finetune.prior_images": 3,
                  "finetune.prior_weight": 0.5}


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_cascade):
  """A LoRA workdir made by `imagen-jax finetune` as a user types it (relative paths, class-prior
  preservation) from the tiny cascade's base: {"workdir", "root" (where it ran: subject/, data/),
  "settings" (its --config.* values, paths absolute)}. Read-only for the tests."""
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import shapes_grammar  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("finetune")
  shapes.write_subject_folder(str(root / "subject"), shapes_grammar.Obj("yellow", "triangle"),
                              "blicket", [(0, 0), (1, 1), (2, 1)])
  relative = {**FINETUNE_RUN, **FINETUNE_PRIOR, "data.source": "folder:subject",
              "data.data_dir": "data"}
  out = run_cli("finetune", "--config=configs/base64.py:tiny", "--workdir=lora",
                f"--base={os.path.relpath(tiny_cascade[0], root)}", *config_flags(relative),
                cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  settings = {**relative, "data.source": f"folder:{root / 'subject'}",
              "data.data_dir": str(root / "data"), "finetune.base": tiny_cascade[0]}
  return {"workdir": str(root / "lora"), "root": str(root), "settings": settings}


# --- The data tests' shapes set, configs and tokenizer -----------------------------------------

SHAPES_DIR_SIZES = {"train": 200, "validation": 60, "heldout": 60}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A `shapes` dataset (64x64) of SHAPES_DIR_SIZES, built once: its TFDS data_dir."""
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("shapes"))
  shapes.build(data_dir, 64, num_examples=SHAPES_DIR_SIZES)
  return data_dir


def stage_config(name: str = "base64", **overrides: Any) -> ml_collections.ConfigDict:
  """A tiny stage as the data tests read it: batches of 16, 2 prefetched (pinned here, so that a
  change to the tiny configs does not move what these tests count)."""
  return tiny_config(name, **{"batch_size": 16, "data.prefetch": 2, **overrides})


def data_config(source: str, data_dir: str, **fields: Any) -> ml_collections.ConfigDict:
  """The `data` part of stage_config() reading `source`, set as given (not resolved: the source
  tests pass malformed strings)."""
  config = stage_config()
  config.data.source, config.data.data_dir = source, data_dir
  for key, value in fields.items():
    config.data[key] = value
  return config.data


def fake_tokenize(captions: Sequence[str], length: int = 16):
  """A tokenizer without a vocabulary: the caption's UTF-8 bytes as ids, 0 for padding."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = np.zeros((len(captions), length), np.int32)
  for i, caption in enumerate(captions):
    codes = np.frombuffer(caption.encode()[:length], np.uint8)
    ids[i, :len(codes)] = codes
  return ids, ids > 0


# --- A free port; a GCS emulator on loopback, for gs:// workdirs and caches ----------------

def free_port() -> int:
  """A TCP port on loopback that nothing listens on (for a server or a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
  """A gcp-storage-emulator on loopback with one bucket; yields the env that points at it."""
  pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the test extra")
  launcher = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
  port = free_port()
  host = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, launcher, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                           "--default-bucket=imagen-test", "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      assert time.time() < deadline, "the GCS emulator did not start"
      time.sleep(0.1)
  env = {"STORAGE_EMULATOR_HOST": host, "TENSORSTORE_GCS_HTTP_URL": host}
  yield env
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=10)


# --- The command line in a subprocess ----------------------------------------------------------

def cli_argv(*args: str) -> list[str]:
  """The argv of `imagen-jax ARGS` on this interpreter (`-m`: no installed entry point needed)."""
  return [sys.executable, "-m", "imagen_jax", *args]


def _run(argv: list[str], cwd: str | os.PathLike, env: Mapping[str, str], timeout: float,
         check: bool = False) -> subprocess.CompletedProcess:
  """How the tests run a command: in `cwd`, output captured as text, within `timeout` seconds."""
  return subprocess.run(argv, cwd=str(cwd), env=dict(env), capture_output=True, text=True,
                        timeout=timeout, check=check)


def run_cli(*args: str, cwd: str | os.PathLike = REPO, env: Mapping[str, str] | None = None,
            timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
  """Runs `imagen-jax ARGS` in `cwd` and returns it, stdout and stderr captured as text.

  `env`: variables set over this process's environment (its 8 fake CPU devices included), which
  the command inherits.
  """
  return _run(cli_argv(*args), cwd, {**os.environ, **(env or {})}, timeout, check)


def run_cli_json(*args: str, **kwargs: Any) -> Any:
  """run_cli that must exit 0; its stdout parsed as JSON (what `imagen-jax eval` reports)."""
  out = run_cli(*args, **kwargs)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


# --- The README as written ---------------------------------------------------------------------

def readme_commands(section: str) -> list[str]:
  """The shell commands of the README section `## <section>`: its ```bash blocks, continuation
  lines joined, comments and blank lines dropped, in order."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in body.split("```bash")[1:]:
    code = block.split("```", 1)[0].replace("\\\n", " ")
    commands += [" ".join(line.split()) for line in code.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
  return commands


def run_as_typed(command: str, cwd, timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs a README command line in bash, in `cwd`, with this environment's `imagen-jax` first
  on PATH (as in an activated virtual environment) and the user's XLA_FLAGS without the tests'
  fake devices (as a newcomer types it: the demo then picks its own CPU devices)."""
  env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
             XLA_FLAGS=_xla_flags)
  return _run(["bash", "-c", command], cwd, env, timeout)


# --- A training run stopped right after one of its checkpoints, to be killed there -----------

# `python -c STOP_AFTER_CHECKPOINT <imagen-jax train flags>`: training whose process STOP_PROCESS
# (default 0), once its checkpoint at STOP_AT_STEP is complete, creates STOP_MARKER and sleeps
# until killed. A kill on a timer lands wherever the loop happens to be on a loaded machine; this
# one lands between that checkpoint and the next on every machine.
STOP_AFTER_CHECKPOINT = """
import os, sys, time
import jax
from imagen_jax.core import checkpoints
stop_at, marker = int(os.environ["STOP_AT_STEP"]), os.environ["STOP_MARKER"]
stop_process = int(os.environ.get("STOP_PROCESS", "0"))
original_save = checkpoints.Checkpointer.save
def save(self, step, *args, **kwargs):
  original_save(self, step, *args, **kwargs)
  if step == stop_at and jax.process_index() == stop_process:
    self.wait()
    open(marker, "w").close()
    time.sleep(600)
checkpoints.Checkpointer.save = save
from imagen_jax import cli
cli.main(["imagen-jax", "train"] + sys.argv[1:])
"""


def start_stopping_after_checkpoint(flag_lists, workdir, step, env, stop_process=0,
                                    timeout=400):
  """Starts one training process per list of `imagen-jax train` flags under STOP_AFTER_CHECKPOINT
  and returns them (stdout and stderr merged, as text) once process `stop_process` sleeps after
  its checkpoint at `step`, which is then complete on disk. Kills them all if that never comes.
  """
  marker = f"{workdir}.stopped"
  env = dict(env, STOP_AT_STEP=str(step), STOP_MARKER=marker, STOP_PROCESS=str(stop_process))
  procs = [subprocess.Popen([sys.executable, "-c", STOP_AFTER_CHECKPOINT, *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for flags in flag_lists]
  # With several processes the marker can precede the rename that completes the checkpoint.
  complete = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not (os.path.exists(marker) and os.path.isdir(complete)):
    ended = any(p.poll() is not None for p in procs)
    if ended or time.time() > deadline:
      for p in procs:
        p.kill()
      outs = [p.communicate()[0] for p in procs]
      raise AssertionError(("a process ended early" if ended else f"no checkpoint at step {step}") +
                           ":\n" + "\n\n".join(o[-3000:] for o in outs))
    time.sleep(0.2)
  return procs


def assert_trees_equal(a, b):
  """Two pytrees with the same structure and bitwise-equal leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
