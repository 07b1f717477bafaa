"""Test setup: 8 fake CPU devices for sharding tests (set before JAX is imported)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
