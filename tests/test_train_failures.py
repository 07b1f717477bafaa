"""Paths and failures around the training loop: relative workdirs, a checkpoint save that fails
in the background, object-store writes that fail transiently or for good."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import short_run_config, tiny_config  # pylint: disable=g-bad-import-order
from imagen_jax.core import checkpoints
from imagen_jax.core import config_lib
from imagen_jax.core import fileio
from imagen_jax.train import metric_writers
from imagen_jax.train import train as train_lib


def test_paths_resolve_against_the_current_directory_and_home(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert fileio.resolve("run") == str(tmp_path / "run")
  assert fileio.resolve("~/run") == str(tmp_path / "home" / "run")
  assert fileio.resolve("gs://bucket/run") == "gs://bucket/run"
  assert fileio.resolve("") == ""
  assert fileio.resolve_spec("folder:imgs") == f"folder:{tmp_path}/imgs"
  assert fileio.resolve_spec("wds:shards/{0..9}.tar") == f"wds:{tmp_path}/shards/{{0..9}}.tar"
  assert fileio.resolve_spec("tfds:coco_captions") == "tfds:coco_captions"
  config = config_lib.load_config("configs/base64.py:tiny", {
      "data.data_dir": "data", "data.embed_cache": "~/cache", "data.source": "folder:imgs",
      "text.encoder": "t5"})
  assert config.data.data_dir == str(tmp_path / "data")
  assert config.data.embed_cache == str(tmp_path / "home" / "cache")
  assert config.data.source == f"folder:{tmp_path}/imgs"
  assert config.text.encoder == str(tmp_path / "t5")
  assert config_lib.load_config("configs/demo_base.py:quick").text.encoder == (
      "builtin:shapes-tiny-pretrained")  # a builtin name is not a path
  encode = config_lib.load_config("configs/encode.py:tiny", {"output": "cache"})
  assert encode.output == str(tmp_path / "cache")
  assert encode.source == f"text:{tmp_path}/captions.txt"


@pytest.mark.slow
def test_a_relative_workdir_trains_checkpoints_and_resumes(tmp_path, monkeypatch,
                                                           shapes_data_dir):
  monkeypatch.chdir(tmp_path)
  config = short_run_config(shapes_data_dir, total_steps=2)
  train_lib.train_and_evaluate(config, "run")  # Orbax alone would refuse this path
  assert checkpoints.Checkpointer(str(tmp_path / "run"), read_only=True).all_steps() == [2]
  config.total_steps = 4
  monkeypatch.chdir(tmp_path / "run")  # the same run from another directory
  state = train_lib.train_and_evaluate(config, "../run")
  assert int(state.step) == 4
  stored = json.loads((tmp_path / "run" / "config.json").read_text())
  assert stored["data"]["data_dir"] == shapes_data_dir


def test_small_and_large_replicated_arrays_restore_bitwise(tmp_path):
  # Above REPLICA_PARALLEL_MIN_BYTES per replica an array is written in slices by all 8
  # replicas, below it whole by one: both paths come back bitwise, onto another sharding too.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  slice_floats = checkpoints.REPLICA_PARALLEL_MIN_BYTES // 4
  rng = np.random.default_rng(0)
  host = {"large": rng.standard_normal((8, slice_floats), np.float32),
          "small": rng.standard_normal((3, 5), np.float32)}
  ckpt = checkpoints.Checkpointer(str(tmp_path / "w"))
  ckpt.save(1, jax.device_put(host, replicated), b"data", tiny_config())
  ckpt.wait()
  ckpt.close()
  abstract = {"large": jax.ShapeDtypeStruct(host["large"].shape, np.float32, sharding=rows),
              "small": jax.ShapeDtypeStruct((3, 5), np.float32, sharding=replicated)}
  state, data = checkpoints.Checkpointer(str(tmp_path / "w"), read_only=True).restore(1, abstract)
  assert data == b"data" and state["large"].sharding == rows
  for key in host:
    np.testing.assert_array_equal(np.asarray(state[key]), host[key])


class _FailingCommit:
  """A commit future that fails in Orbax's background thread, as a full disk would."""

  def result(self, timeout=None):
    raise OSError(28, "No space left on device (injected)")


def fail_state_saves_at(monkeypatch, step):
  original = ocp.PyTreeCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)
    if f"/{step}." in str(directory):
      return list(futures or []) + [_FailingCommit()]
    return futures

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", async_save)


@pytest.mark.slow
def test_a_failed_checkpoint_stops_the_run_and_keeps_the_last_complete_one(
    tmp_path, monkeypatch, shapes_data_dir):
  fail_state_saves_at(monkeypatch, 4)
  workdir = str(tmp_path / "run")
  config = short_run_config(shapes_data_dir, total_steps=12, keep_checkpoints=1)
  steps_run = []
  original_check = checkpoints.Checkpointer.check

  def check(self, wait=False):
    steps_run.append(wait)
    original_check(self, wait)

  monkeypatch.setattr(checkpoints.Checkpointer, "check", check)
  with pytest.raises(checkpoints.CheckpointError) as failure:
    train_lib.train_and_evaluate(config, workdir)
  message = str(failure.value)
  assert f"step 4 to {workdir}/checkpoints/4" in message
  assert "No space left on device (injected)" in message
  assert "last complete checkpoint is step 2" in message
  # It stopped at a step boundary soon after the save, not at the end of the run.
  assert steps_run.count(False) < 12
  # keep_checkpoints=1 did not delete step 2 for a step 4 that never completed.
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2]
  assert int(ckpt.restore_as_stored(2)["state"]["step"]) == 2
  # The next run resumes from it once the cause is gone.
  monkeypatch.undo()
  state = train_lib.train_and_evaluate(short_run_config(shapes_data_dir, total_steps=6,
                                                        keep_checkpoints=1), workdir)
  assert int(state.step) == 6
  assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == [6]


def flaky(monkeypatch, failures, only=""):
  """fileio.atomic_writer that raises ConnectionError `failures` times for paths containing
  `only`, then works."""
  original = fileio.atomic_writer
  calls = []

  def atomic_writer(path):
    if only not in path:
      return original(path)
    calls.append(path)
    if len(calls) <= failures:
      raise ConnectionError("connection reset by peer (injected)")
    return original(path)

  monkeypatch.setattr(fileio, "atomic_writer", atomic_writer)
  monkeypatch.setattr(fileio, "RETRY_DELAY_S", 0.0)
  return calls


def test_object_store_writes_retry_transient_errors_a_bounded_number_of_times(
    gcs_emulator, monkeypatch, tmp_path):
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  path = "gs://imagen-test/retry/blob.bin"
  calls = flaky(monkeypatch, fileio.REMOTE_ATTEMPTS - 1)
  fileio.write_bytes(path, b"payload")
  assert len(calls) == fileio.REMOTE_ATTEMPTS and fileio.read_bytes(path) == b"payload"
  calls = flaky(monkeypatch, fileio.REMOTE_ATTEMPTS)
  with pytest.raises(fileio.StorageError, match=f"writing {path} failed after "
                     f"{fileio.REMOTE_ATTEMPTS} attempts: ConnectionError"):
    fileio.write_bytes(path, b"other")
  assert fileio.read_bytes(path) == b"payload"  # nothing half-written replaced it
  # Local paths: one attempt (a full disk does not empty itself).
  calls = flaky(monkeypatch, 1)
  with pytest.raises(fileio.StorageError, match="blob.bin failed: ConnectionError"):
    fileio.write_bytes(str(tmp_path / "blob.bin"), b"x")
  assert len(calls) == 1


@pytest.mark.slow
def test_a_tensorboard_upload_that_keeps_failing_stops_the_run_naming_the_file(
    gcs_emulator, monkeypatch, shapes_data_dir):
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  # Transient: the upload is retried and the log arrives whole.
  writer = metric_writers.TensorBoardWriter("gs://imagen-test/tb-flaky")
  writer.write_scalars(1, {"loss": 0.5})
  flaky(monkeypatch, 2)
  writer.flush()
  [name] = fileio.listdir("gs://imagen-test/tb-flaky")
  assert name.startswith("events.out.tfevents")
  monkeypatch.undo()
  for key, value in gcs_emulator.items():
    monkeypatch.setenv(key, value)
  # For good: the training run stops at its next flush and says which file and why.
  flaky(monkeypatch, 10 ** 6, only="/tb/")
  workdir = "gs://imagen-test/tb-fails"
  with pytest.raises(fileio.StorageError, match=f"writing {workdir}/tb/events.out.tfevents.* "
                     "failed after 4 attempts: ConnectionError"):
    train_lib.train_and_evaluate(short_run_config(shapes_data_dir, total_steps=2), workdir)
