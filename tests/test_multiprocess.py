"""Multi-process training: two JAX processes on localhost, 4 fake CPU devices each (gloo).

The two processes form one mesh of 8 devices and must train exactly what one process with 8
devices trains; their checkpoint must restore in one process; when one of them dies, the other
must stop with an error within the heartbeat timeout, and running both again must resume from
the last checkpoint. Also: the runtime setup (flags, environment, cluster detection) and the
input pipeline's split of each global batch by process.
"""

import fcntl
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from helpers import (  # pylint: disable=g-bad-import-order
    REPO, cli_argv, config_flags, free_port, short_run_settings, start_stopping_after_checkpoint,
    tiny_config)
from imagen_jax.core import checkpoints
from imagen_jax.core import distributed
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.train import train as train_lib

STEPS, EVERY = 4, 2
HEARTBEAT_S = 10


def overrides(data_dir):
  # helpers' small net (16x16, two levels) with attention: it compiles fast. Adam's eps is
  # raised from 1e-8: some biases feed a normalization, so their true gradient is 0 and what
  # they get is rounding noise (~1e-11) that depends on the order of the cross-device sums
  # (XLA's in-process collectives vs gloo); eps=1e-8 would blow that noise up to 1e-6-sized
  # steps, eps=1e-3 keeps it ~1e-11 and leaves the real updates (gradients ~1e-3) of the same
  # order.
  return short_run_settings(data_dir, **{
      "total_steps": STEPS, "checkpoint_every": EVERY, "optimizer.eps": 1e-3,
      "model.attn_resolutions": (8,)})


def flags_of_two(workdir, data_dir):
  """The `imagen-jax train` flags of both processes of a run (a fresh coordinator port)."""
  port = free_port()
  args = [f"--workdir={workdir}", "--config=configs/base64.py:tiny",
          *config_flags(overrides(data_dir)),
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--distributed_heartbeat_timeout={HEARTBEAT_S}"]
  return [[*args, f"--process_id={i}"] for i in range(2)]


def env_of_two():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")


def start_two(workdir, data_dir):
  """Both processes of a run, started at once; stdout and stderr merged, as text."""
  return [subprocess.Popen(cli_argv("train", *flags), cwd=REPO, env=env_of_two(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for flags in flags_of_two(workdir, data_dir)]


def finish(procs, timeout=400):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
  return outs


def assert_states_close(a, b, atol=1e-6):
  flat_a, tree_a = jax.tree_util.tree_flatten(jax.device_get(a))
  flat_b, tree_b = jax.tree_util.tree_flatten(jax.device_get(b))
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, shapes_data_dir):
  """The reference: one process, 8 fake devices, checkpoints at steps 3 and 6.

  Trained once per session: under pytest-xdist the workers share it (a lock on a file in their
  common base directory), whichever worker runs a test that needs it first.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = root / "multiprocess_reference"
  config = tiny_config(**overrides(shapes_data_dir))
  with open(str(workdir) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "done").exists():
      train_lib.train_and_evaluate(config, str(workdir))
      (workdir / "done").write_text("ok")
  return config, str(workdir)


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_and_resume_after_a_kill(
    tmp_path, shapes_data_dir, one_process_run):
  # One test, not two: a straight 2-process run would repeat the first half of this one (and
  # cost CI four minutes); the kill lands after a complete checkpoint, so both halves are checked.
  config, reference = one_process_run
  workdir = str(tmp_path / "killed")
  # Process 1 stops once its checkpoint at step EVERY is complete, so the kill lands there.
  procs = start_stopping_after_checkpoint(flags_of_two(workdir, shapes_data_dir), workdir, EVERY,
                                          env_of_two(), stop_process=1)
  complete = os.path.join(workdir, "checkpoints", str(EVERY))

  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  out = procs[0].communicate(timeout=HEARTBEAT_S + 120)[0]  # a hang fails here
  waited = time.time() - killed_at
  procs[1].communicate()
  assert procs[0].returncode != 0
  assert waited < HEARTBEAT_S + 60, waited
  # XLA words the heartbeat failure differently depending on which RPC notices it first
  # ("... stopped sending heartbeats" or "Task 1 heartbeat timeout").
  assert "another task died" in out and "heartbeat" in out.lower(), out[-3000:]
  assert sorted(int(d) for d in os.listdir(os.path.dirname(complete)) if d.isdigit()) == [EVERY]

  outs = finish(start_two(workdir, shapes_data_dir))
  assert f"Resuming from the checkpoint at step {EVERY}" in outs[0]
  # The checkpoints of the 2-process run (before and after the kill) restore here, in one
  # process, and match the reference.
  for step in (EVERY, STEPS):
    assert_states_close(train_lib.restore_state(config, workdir, step),
                        train_lib.restore_state(config, reference, step))
  # Each process's input-pipeline position is in the checkpoint.
  with open(os.path.join(workdir, "checkpoints", str(STEPS), "data", "metadata")) as f:
    per_process = json.load(f)[checkpoints.PER_PROCESS]
  assert [s["process_index"] for s in per_process] == [0, 1]
  # Process 0 alone writes TensorBoard (one file per run: killed, resumed), the config and logs.
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 2
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert "Compiled the train step" in outs[0] and "loss=" in outs[0]
  assert "Compiled the train step" not in outs[1] and "loss=" not in outs[1]


def test_process_blocks_make_the_one_process_batch(shapes_data_dir):
  """Process p's batch is the p-th block of the one-process batch, random crops included."""
  config = tiny_config(**overrides(shapes_data_dir))
  config.data.random_crop = True
  one = pipeline_lib.make_pipeline(config)
  two = [pipeline_lib.make_pipeline(config, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(3):
    whole, parts = next(one), [next(p) for p in two]
    for key in ("index", "image"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_data_state_of_every_process_round_trips(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "allgather_json", lambda value: [value, {"other": 1}])
  stored = checkpoints.encode_data_state(b"\x00grain")
  assert stored[checkpoints.PER_PROCESS][1] == {"other": 1}
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert checkpoints.decode_data_state(stored) == b"\x00grain"
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert checkpoints.decode_data_state(stored) == {"other": 1}
  monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process reads process 0's
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert checkpoints.decode_data_state(stored) == b"\x00grain"


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}


@pytest.mark.parametrize("args,environ,want", [
    ((None, None, None), {}, None),                                        # a laptop
    (("h:1234", 2, 1), {}, {"coordinator_address": "h:1234", "num_processes": 2,
                            "process_id": 1}),                            # flags
    ((None, None, None), {"IMAGEN_JAX_COORDINATOR_ADDRESS": "h:1", "IMAGEN_JAX_NUM_PROCESSES": "4",
                          "IMAGEN_JAX_PROCESS_ID": "3"},
     {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}),  # our variables
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": "0"},
     {"coordinator_address": "h:2", "num_processes": 2, "process_id": 0}),  # JAX's variables
    ((None, 3, None), {"IMAGEN_JAX_COORDINATOR_ADDRESS": "h:1", "IMAGEN_JAX_NUM_PROCESSES": "4",
                       "IMAGEN_JAX_PROCESS_ID": "2"},
     {"coordinator_address": "h:1", "num_processes": 3, "process_id": 2}),  # flags win
    ((None, 1, 0), {"IMAGEN_JAX_COORDINATOR_ADDRESS": "h:1"}, None),       # one process
    ((None, None, None), SLURM, {}),                                       # SLURM: JAX detects
    ((None, None, None), dict(SLURM, SLURM_NTASKS="1"), None),             # a 1-task step
    ((None, None, None), {"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:5",
                          "OMPI_COMM_WORLD_SIZE": "8"}, {}),                # Open MPI
    (("h:1", None, None), SLURM, {"coordinator_address": "h:1"}),          # SLURM fills the rest
])
def test_resolve_decides_from_flags_environment_and_cluster(args, environ, want):
  assert distributed.resolve(*args, environ=environ) == want


@pytest.mark.parametrize("args,environ,match", [
    (("h:1", None, None), {}, "--num_processes, --process_id"),
    ((None, 2, 5), {"IMAGEN_JAX_COORDINATOR_ADDRESS": "h:1"}, r"\[0, 2\)"),
    ((None, None, None), {"IMAGEN_JAX_NUM_PROCESSES": "two"}, "not an integer"),
])
def test_resolve_names_what_is_missing_or_wrong(args, environ, match):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.resolve(*args, environ=environ)
