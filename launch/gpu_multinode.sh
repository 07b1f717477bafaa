#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per node (default) or one per GPU.
#
#   sbatch --nodes=4 launch/gpu_multinode.sh train --config=configs/base64.py:500m \
#       --workdir=/shared/runs/base64          # a directory every node sees (or gs://...)
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/gpu_multinode.sh train ...
#
# The arguments are those of `imagen-jax`. The script points every process at the coordinator
# on the first node (IMAGEN_JAX_COORDINATOR_ADDRESS, IMAGEN_JAX_NUM_PROCESSES and, per task,
# IMAGEN_JAX_PROCESS_ID, which imagen-jax passes to jax.distributed.initialize) and gives each
# process its GPUs (JAX_LOCAL_DEVICE_IDS: all of the node's with one task per node, else the
# task's own). `srun --kill-on-bad-exit` ends the whole step when one process dies; the others
# would also stop by themselves after --distributed_heartbeat_timeout. Submitting the same
# command again resumes from the last checkpoint in the workdir.
#
# Environment: IMAGEN_JAX_PORT (coordinator port; default derived from the job id),
# IMAGEN_JAX_SETUP (a command run first in every task, e.g. `source ~/venv/bin/activate`).
#
#SBATCH --job-name=imagen-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=imagen-jax-%j.out
set -euo pipefail

if (($# == 0)); then
  echo "usage: sbatch [--nodes=N] [--ntasks-per-node=G --gpus-per-task=1] $0 SUBCOMMAND [flags]" >&2
  exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "gpu_multinode.sh: not inside a SLURM job: submit it with sbatch (or run it in salloc)" >&2
  exit 2
fi

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port="${IMAGEN_JAX_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
num_nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
num_tasks="${SLURM_NTASKS:-$num_nodes}"
tasks_per_node=$((num_tasks / num_nodes))
export IMAGEN_JAX_COORDINATOR_ADDRESS="$head_node:$port"
export IMAGEN_JAX_NUM_PROCESSES="$num_tasks"
export IMAGEN_JAX_TASKS_PER_NODE="$tasks_per_node"
export IMAGEN_JAX_SETUP="${IMAGEN_JAX_SETUP:-}"
echo "gpu_multinode.sh: $num_tasks processes on $num_nodes nodes ($tasks_per_node per node)," \
     "coordinator $IMAGEN_JAX_COORDINATOR_ADDRESS" >&2

# Runs in every task: its process id, its GPUs, then imagen-jax.
task='
set -euo pipefail
if [[ -n "$IMAGEN_JAX_SETUP" ]]; then eval "$IMAGEN_JAX_SETUP"; fi
export IMAGEN_JAX_PROCESS_ID="$SLURM_PROCID"
if ((IMAGEN_JAX_TASKS_PER_NODE == 1)); then
  gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}"
  export JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"   # every GPU of the node
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != *,* ]]; then
  export JAX_LOCAL_DEVICE_IDS=0        # SLURM bound one GPU to the task (--gpus-per-task=1)
else
  export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"               # the task'"'"'s own GPU
fi
exec imagen-jax "$@"
'
exec srun --kill-on-bad-exit=1 --ntasks="$num_tasks" --ntasks-per-node="$tasks_per_node" \
  bash -c "$task" imagen-jax "$@"
