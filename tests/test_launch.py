"""The launchers, without launching: tpu_vm.sh --dry_run, xm_launch's job spec, the SLURM script."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, readme_commands  # pylint: disable=g-bad-import-order
from imagen_jax.core import config_lib

LAUNCH = os.path.join(REPO, "launch")


# --------------------------------------------------------------------------------- tpu_vm.sh

def tpu_vm(*args, **env):
  return subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), *args], capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, **env))


def commands(stdout):
  """The printed commands, each split back into its words as a shell would."""
  return [shlex.split(line) for line in stdout.splitlines()]


VM = ["--name=imagen-base", "--zone=us-central2-b", "--project=my-proj",
      "--accelerator_type=v4-32"]
TRAIN = ["train", "--config=configs/base64.py:500m", "--workdir=gs://bucket/base64",
         "--config.optimizer.lr=3e-4", "--config.sample.prompts=('a corgi', \"it's red\")"]
WHERE = ["--project=my-proj", "--zone=us-central2-b"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
WHEEL = os.path.join(REPO, "dist", "imagen_jax-0.1.0-py3-none-any.whl")
DESCRIBE = [*TPU, "describe", "imagen-base", *WHERE, "--format=value(state)"]
CREATE = [*TPU, "create", "imagen-base", *WHERE, "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base", "--spot"]
BUILD = ["python3", "-m", "pip", "wheel", "--no-deps", f"--wheel-dir={REPO}/dist", REPO]
COPY = [*TPU, "scp", WHEEL, "imagen-base:/tmp/imagen_jax-0.1.0-py3-none-any.whl", *WHERE,
        "--worker=all"]
INSTALL = [*TPU, "ssh", "imagen-base", *WHERE, "--worker=all",
           "--command=python3 -m pip install -q -U 'jax[tpu]>=0.10.2,<0.12' "
           "/tmp/imagen_jax-0.1.0-py3-none-any.whl"]
RUN = [*TPU, "ssh", "imagen-base", *WHERE, "--worker=all",
       "--command=PATH=$HOME/.local/bin:$PATH imagen-jax train --config=configs/base64.py:500m "
       "--workdir=gs://bucket/base64 --config.optimizer.lr=3e-4 "
       "'--config.sample.prompts=('\\''a corgi'\\'', \"it'\\''s red\")'"]


def test_tpu_vm_dry_run_creates_installs_and_starts_on_all_workers():
  out = tpu_vm("--dry_run", *VM, "--spot", "--", *TRAIN)
  assert out.returncode == 0, out.stderr
  assert commands(out.stdout) == [DESCRIBE, CREATE, BUILD, COPY, INSTALL, RUN, DESCRIBE]
  # The remote command, as the worker's shell splits it, is exactly the arguments given.
  remote = shlex.split(commands(out.stdout)[5][-1].split("=", 1)[1])
  assert remote == ["PATH=$HOME/.local/bin:$PATH", "imagen-jax", *TRAIN]
  assert "finished" in out.stderr


def test_tpu_vm_dry_run_recreates_a_preempted_vm_and_relaunches():
  out = tpu_vm("--dry_run", *VM, "--spot", "--dry_run_states=NOT_FOUND,PREEMPTED", "--", *TRAIN)
  assert out.returncode == 0, out.stderr
  delete = [*TPU, "delete", "imagen-base", *WHERE, "--quiet"]
  assert commands(out.stdout) == [DESCRIBE, CREATE, BUILD, COPY, INSTALL, RUN,
                                  DESCRIBE, delete, CREATE, COPY, INSTALL, RUN, DESCRIBE]
  assert "imagen-base is PREEMPTED: relaunching (1 of at most 100)" in out.stderr


def test_tpu_vm_existing_vm_package_spec_preemptible_and_restart_limit():
  out = tpu_vm("--dry_run", *VM, "--preemptible", "--package=imagen-jax==0.1.0",
               "--dry_run_states=CREATING,READY,TERMINATED,TERMINATED", "--max_restarts=1",
               "--", *TRAIN)
  assert out.returncode == 1, out.stderr
  create = [*CREATE[:-1], "--preemptible"]
  install = [*INSTALL[:-1], "--command=python3 -m pip install -q -U 'jax[tpu]>=0.10.2,<0.12' "
             "imagen-jax==0.1.0"]
  delete = [*TPU, "delete", "imagen-base", *WHERE, "--quiet"]
  # CREATING, then READY: install and run; TERMINATED: recreate and run again; TERMINATED
  # again: the one allowed relaunch is used up.
  assert commands(out.stdout) == [DESCRIBE, DESCRIBE, install, RUN, DESCRIBE, delete, create,
                                  install, RUN, DESCRIBE]
  assert "giving up" in out.stderr


@pytest.mark.parametrize("args,message", [
    ([*VM[1:], "--", *TRAIN], "--name is required"),
    ([*VM, "--", "train", "--workdir=/tmp/local"], "train needs --workdir=gs://"),
    ([*VM], "give the imagen-jax command after --"),
    ([*VM, "--bogus", "--", *TRAIN], "unknown argument: --bogus"),
])
def test_tpu_vm_refuses_bad_arguments(args, message):
  out = tpu_vm("--dry_run", *args)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert out.stdout == ""


# ------------------------------------------------------------------------------- xm_launch.py

@pytest.fixture(scope="module")
def xm_launch():
  spec = importlib.util.spec_from_file_location("xm_launch", os.path.join(LAUNCH, "xm_launch.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["xm_launch"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_xm_sweep_becomes_work_units_with_overrides_passed_through(xm_launch):
  spec = xm_launch.build_spec(
      platform="gke", subcommand="train", config="configs/base64.py:500m",
      workdir="gs://bucket/base64", accelerator="tpu_v4=2x2x4",
      passthrough=["--config.batch_size=2048", "--distributed_heartbeat_timeout=60"],
      sweeps=["optimizer.lr=1e-4,3e-4", "config.model.channel_mult=(1, 2),(1, 2, 3)"])
  assert spec.accelerator.requirements() == {"tpu_v4": "2x2x4"}
  assert spec.entrypoint == ["imagen-jax train"]
  assert "'jax[tpu]>=0.10.2,<0.12'" in spec.docker_instructions[-1]
  assert [unit.name for unit in spec.work_units] == [
      "0_optimizer.lr=1e-4,model.channel_mult=_1,_2_",
      "1_optimizer.lr=1e-4,model.channel_mult=_1,_2,_3_",
      "2_optimizer.lr=3e-4,model.channel_mult=_1,_2_",
      "3_optimizer.lr=3e-4,model.channel_mult=_1,_2,_3_"]
  assert spec.work_units[3].args == [
      "--config=configs/base64.py:500m", "--config.batch_size=2048",
      "--distributed_heartbeat_timeout=60", "--config.optimizer.lr=3e-4",
      "--config.model.channel_mult=(1, 2, 3)",
      "--workdir=gs://bucket/base64/3_optimizer.lr=3e-4,model.channel_mult=_1,_2,_3_"]
  # What the imagen-jax command line makes of one work unit's arguments.
  config = config_lib.load_config("configs/base64.py:500m", {
      "optimizer.lr": 3e-4, "model.channel_mult": (1, 2, 3), "batch_size": 2048})
  assert config.model.channel_mult == (1, 2, 3)


def test_xm_without_sweep_one_unit_in_the_workdir_itself(xm_launch):
  spec = xm_launch.build_spec(platform="vertex", subcommand="train",
                              config="configs/sr256.py:tiny", workdir="gs://b/sr256",
                              accelerator="a100=8", passthrough=[], sweeps=[])
  assert [u.args for u in spec.work_units] == [["--config=configs/sr256.py:tiny",
                                                "--workdir=gs://b/sr256"]]
  assert spec.accelerator.requirements() == {"a100": 8}
  assert "'jax[cuda12]>=0.10.2,<0.12'" in spec.docker_instructions[-1]


@pytest.mark.parametrize("kwargs,error", [
    ({"passthrough": ["--config.optimizer.lrr=1"]}, "optimizer.lrr"),
    ({"sweeps": ["optimizer.lr=1e-4,fast"]}, "optimizer.lr"),
    ({"sweeps": ["optimizer.lr"]}, "KEY=V1,V2"),
    ({"accelerator": "tpu_v4=2x2x4", "platform": "vertex"}, "use --platform=gke"),
    ({"workdir": "/tmp/w", "platform": "gke"}, "gs:// workdir"),
    ({"accelerator": "lots"}, "RESOURCE=COUNT"),
    ({"passthrough": ["stray"]}, "unexpected arguments"),
])
def test_xm_bad_requests_fail_before_anything_is_built(xm_launch, kwargs, error):
  request = dict(platform="local", subcommand="train", config="configs/base64.py:tiny",
                 workdir="gs://b/w", passthrough=[], sweeps=[])
  with pytest.raises((xm_launch.LaunchError, config_lib.ConfigError), match=error):
    xm_launch.build_spec(**{**request, **kwargs})


def test_xm_launch_script_dry_run_prints_the_spec():
  out = subprocess.run(
      [sys.executable, os.path.join(LAUNCH, "xm_launch.py"), "--dry_run", "--platform=gke",
       "--accelerator=h100=8", "--config=configs/base64.py:tiny", "--workdir=gs://b/w",
       "--config.optimizer.lr=3e-4", "--sweep=seed=0,1"],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 0, out.stderr
  spec = json.loads(out.stdout)
  assert [u["args"] for u in spec["work_units"]] == [
      ["--config=configs/base64.py:tiny", "--config.optimizer.lr=3e-4", "--config.seed=0",
       "--workdir=gs://b/w/0_seed=0"],
      ["--config=configs/base64.py:tiny", "--config.optimizer.lr=3e-4", "--config.seed=1",
       "--workdir=gs://b/w/1_seed=1"]]
  bad = subprocess.run([sys.executable, os.path.join(LAUNCH, "xm_launch.py"), "--dry_run",
                        "--config=configs/base64.py:tiny", "--workdir=/tmp/w",
                        "--config.optimizer.lrr=3"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert bad.returncode == 2 and "optimizer.lrr" in bad.stderr


@pytest.mark.launch  # .ci/run installs the launch extra and runs it
def test_xm_jobs_with_xmanager_when_installed(xm_launch):
  """The thin xmanager layer builds its executor and jobs (nothing is packaged or launched)."""
  xm = pytest.importorskip("xmanager.xm")
  spec = xm_launch.build_spec(platform="gke", subcommand="train", config="configs/base64.py:tiny",
                              workdir="gs://b/w", accelerator="tpu_v4=2x2x1", passthrough=[],
                              sweeps=["seed=0,1"])
  executor = xm_launch.make_executor(spec, tpu_runtime_version="tpu-ubuntu2204-base")
  assert executor.requirements.accelerator == xm.ResourceType.TPU_V4
  jobs = xm_launch.make_jobs(spec, executable=object(), executor=executor)
  assert [list(job.args.to_list(str)) for job in jobs] == [u.args for u in spec.work_units]


# -------------------------------------------------------------------------- gpu_multinode.sh

FAKE_SRUN = """#!/usr/bin/env bash
# Runs the step's command once per task, here, as SLURM would on each node.
echo "srun $*" >&2
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % TASKS_PER_NODE)) "$@"
done
"""
FAKE_IMAGEN_JAX = """#!/usr/bin/env bash
echo "$IMAGEN_JAX_COORDINATOR_ADDRESS $IMAGEN_JAX_NUM_PROCESSES $IMAGEN_JAX_PROCESS_ID \
$JAX_LOCAL_DEVICE_IDS $*"
"""


@pytest.mark.parametrize("tasks_per_node,want_devices", [(1, ["0,1,2,3"] * 2),
                                                         (4, ["0", "1", "2", "3"] * 2)])
def test_gpu_multinode_sets_up_every_process(tmp_path, tasks_per_node, want_devices):
  for name, text in {"srun": FAKE_SRUN, "imagen-jax": FAKE_IMAGEN_JAX,
                     "scontrol": "#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n"}.items():
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  ntasks = 2 * tasks_per_node
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="1234",
             SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS=str(ntasks),
             SLURM_GPUS_ON_NODE="4", TASKS_PER_NODE=str(tasks_per_node))
  env.pop("CUDA_VISIBLE_DEVICES", None)
  out = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_multinode.sh"), "train",
                        "--workdir=/shared/w", "--config=configs/base64.py:500m"],
                       capture_output=True, text=True, timeout=60, env=env)
  assert out.returncode == 0, out.stderr
  assert f"srun --kill-on-bad-exit=1 --ntasks={ntasks} --ntasks-per-node={tasks_per_node}" \
      in out.stderr
  lines = [line.split() for line in out.stdout.splitlines()]
  assert [line[:3] for line in lines] == [["gpu-a:21234", str(ntasks), str(i)]
                                          for i in range(ntasks)]
  assert [line[3] for line in lines] == want_devices
  assert all(line[4:] == ["train", "--workdir=/shared/w", "--config=configs/base64.py:500m"]
             for line in lines)


# ------------------------------------------------------- docs/pods.md "Training on a pod"

def pod_commands():
  """The shell commands of docs/pods.md's section "Training on a pod" (every ```bash block in it,
  continuation lines joined, comments dropped), each split into words with $VM expanded."""
  lines = readme_commands("Training on a pod", page=os.path.join("docs", "pods.md"))
  variables = dict(line.split("=", 1) for line in lines if re_assignment(line))
  return [shlex.split(line.replace("$VM", shlex.split(variables["VM"])[0]))
          for line in lines if not re_assignment(line)]


def re_assignment(line):
  return line.split("=", 1)[0].isidentifier() and "=" in line and " " not in line.split("=")[0]


def check_imagen_args(args, parse_value):
  """The config and overrides of `imagen-jax <subcommand> args` load (keys and types)."""
  config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  loaded = config_lib.load_config(config)
  for arg in args:
    if arg.startswith("--config."):
      key, value = arg[len("--config."):].split("=", 1)
      config_lib.set_by_path(loaded, key, parse_value(value))


def test_docs_pod_commands_run_as_written(xm_launch):
  seen = set()
  for words in pod_commands():
    if words[0] == "launch/tpu_vm.sh":
      out = tpu_vm("--dry_run", *words[1:])
      assert out.returncode == 0, (words, out.stderr)
      job = words[words.index("--") + 1:]
      [started] = {c[-1] for c in commands(out.stdout) if c[-1].startswith("--command=PATH=")}
      assert shlex.split(started.split("=", 1)[1])[2:] == job
      check_imagen_args(job[1:], config_lib.parse_value)
    elif words[0] == "sbatch":
      script = next(w for w in words if w.startswith("launch/"))
      assert os.path.exists(os.path.join(REPO, script))
      check_imagen_args(words[words.index(script) + 2:], config_lib.parse_value)
    elif words[:3] == ["xmanager", "launch", "launch/xm_launch.py"]:
      out = subprocess.run([sys.executable, os.path.join(LAUNCH, "xm_launch.py"), "--dry_run",
                            *words[4:]], capture_output=True, text=True, timeout=120, cwd=REPO)
      assert out.returncode == 0, (words, out.stderr)
      assert len(json.loads(out.stdout)["work_units"]) == 2
    elif words[:2] == ["imagen-jax", "inspect"]:  # compiling a 500M step takes minutes: args only
      check_imagen_args(words[2:], config_lib.parse_value)
      from imagen_jax.train import memory  # pylint: disable=g-import-not-at-top
      flags_given = dict(w[2:].split("=", 1) for w in words[2:] if "=" in w)
      memory.parse_mesh(flags_given["mesh"])
      assert "--memory" in words and flags_given["device"] in memory.DEVICE_MEMORY
    elif words[:2] == ["imagen-jax", "sample"]:
      assert len(next(w for w in words if w.startswith("--stages=")).split(",")) == 3
    else:
      raise AssertionError(f"a docs/pods.md command this test does not know: {words}")
    seen.add(" ".join(words[:2]) if words[0] == "imagen-jax" else words[0])
  assert seen == {"launch/tpu_vm.sh", "sbatch", "xmanager", "imagen-jax inspect",
                  "imagen-jax sample"}
