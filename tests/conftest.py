"""Test setup: 8 fake CPU devices for sharding tests (set before JAX is imported)."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

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

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL_SHAPES = {"train": 512, "validation": 64, "heldout": 64}


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A small `shapes` dataset (64x64), built once per test session: its TFDS data_dir."""
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("shapes_data"))
  shapes.build(data_dir, 64, num_examples=SMALL_SHAPES, num_workers=1)
  return data_dir


def train_tiny_stage(workdir, stage_config, data_dir, **overrides):
  """Trains `configs/<stage_config>` for a few steps into `workdir` (a stage for sampling tests)."""
  from imagen_jax import config_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import train  # pylint: disable=g-import-not-at-top
  settings = {"data.data_dir": data_dir, "batch_size": 8, "total_steps": 2, "log_every": 2,
              "checkpoint_every": 2, "sample_every": 0, **overrides}
  train.train_and_evaluate(config_lib.load_config(stage_config, settings), str(workdir))
  return str(workdir)


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory, shapes_data_dir):
  """Workdirs of a two-stage cascade, 16x16 base -> 32x32 SR, trained for 2 steps each."""
  root = tmp_path_factory.mktemp("cascade")
  base = train_tiny_stage(root / "base", "configs/base64.py:tiny", shapes_data_dir,
                          image_size=16)
  sr = train_tiny_stage(root / "sr", "configs/sr256.py:tiny", shapes_data_dir)
  return [base, sr]


# --- A GCS emulator on loopback, for gs:// workdirs and caches ------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
  """A gcp-storage-emulator on loopback with one bucket; yields the env that points at it."""
  pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the test extra")
  launcher = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
  port = _free_port()
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


# --- The README as written ---------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  on PATH (as in an activated virtual environment)."""
  env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  return subprocess.run(["bash", "-c", command], cwd=str(cwd), env=env, capture_output=True,
                        text=True, timeout=timeout)


# --- A training run stopped right after one of its checkpoints, to be killed there -----------

# `python -c STOP_AFTER_CHECKPOINT <imagen-jax train flags>`: training whose process STOP_PROCESS
# (default 0), once its checkpoint at STOP_AT_STEP is complete, creates STOP_MARKER and sleeps
# until killed. A kill on a timer lands wherever the loop happens to be on a loaded machine; this
# one lands between that checkpoint and the next on every machine.
STOP_AFTER_CHECKPOINT = """
import os, sys, time
import jax
from imagen_jax.train import checkpoints
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
