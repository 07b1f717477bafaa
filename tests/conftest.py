"""Test setup: 8 fake CPU devices for sharding tests (set before JAX is imported), JAX's
compilation cache, and the fixtures that build something once per session: the shapes dataset,
a trained tiny cascade, a LoRA workdir, a GCS emulator. Shared functions live in `helpers/`."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from helpers import commands  # imports no JAX: the environment below is set before JAX loads

# Appended, not set by default: a user's own XLA_FLAGS must not silently drop the 8 fake devices
# (the sharding tests would then have fewer devices than they need and fail, not skip).
FAKE_DEVICES = 8
os.environ["XLA_FLAGS"] = (f"{commands.USER_XLA_FLAGS} "
                           f"--xla_force_host_platform_device_count={FAKE_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests compile the same tiny programs (in this process and in the subprocesses they start,
# which inherit the environment): JAX's persistent compilation cache halves their run time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "imagen_jax_test_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from helpers import configs  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """The `shapes` dataset of the session (64x64, configs.SHAPES_SIZES), built once: its TFDS
  data_dir. Tests only read it."""
  from imagen_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("shapes_data"))
  shapes.build(data_dir, 64, num_examples=configs.SHAPES_SIZES, num_workers=1)
  return data_dir


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory, shapes_data_dir):
  """Workdirs of a two-stage cascade, 16x16 base -> 32x32 SR, trained for 2 steps each.

  Shared by every test that samples: they only read it (checkpoints restore read-only). A test
  that writes into a stage's workdir must copy it first (shutil.copytree to its tmp_path).
  """
  root = tmp_path_factory.mktemp("cascade")
  base = configs.train_tiny_stage(root / "base", "base64", shapes_data_dir, image_size=16)
  sr = configs.train_tiny_stage(root / "sr", "sr256", shapes_data_dir)
  return [base, sr]


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
  relative = {**configs.FINETUNE_RUN, **configs.FINETUNE_PRIOR, "data.source": "folder:subject",
              "data.data_dir": "data"}
  out = commands.run_cli("finetune", "--config=configs/base64.py:tiny,finetune", "--workdir=lora",
                         f"--base={os.path.relpath(tiny_cascade[0], root)}",
                         *configs.config_flags(relative), cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  settings = {**relative, "data.source": f"folder:{root / 'subject'}",
              "data.data_dir": str(root / "data"), "finetune.base": tiny_cascade[0]}
  return {"workdir": str(root / "lora"), "root": str(root), "settings": settings}


@pytest.fixture(scope="session")
def gcs_emulator():
  """A gcp-storage-emulator on loopback with one bucket; yields the env that points at it."""
  pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the test extra")
  launcher = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
  port = commands.free_port()
  host = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, launcher, "start", "--host=127.0.0.1", f"--port={port}",
                           "--in-memory", "--default-bucket=imagen-test", "-q"],
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
