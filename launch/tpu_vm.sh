#!/usr/bin/env bash
# Runs an imagen-jax job on a Cloud TPU VM or pod slice, and keeps it running through preemption.
#
#   launch/tpu_vm.sh --name=imagen-base --zone=us-central2-b --project=my-project \
#       --accelerator_type=v4-128 --spot -- \
#       train --config=configs/base64.py:500m --workdir=gs://my-bucket/base64
#
# 1. creates the TPU VM (or pod slice) unless it exists;
# 2. builds a wheel of this repository and installs it, with jax[tpu], on every worker
#    (or installs --package=PIP_SPEC instead);
# 3. starts `imagen-jax <args after -->` on all workers at once (each worker is one JAX process;
#    imagen-jax detects the slice and calls jax.distributed.initialize()) and streams the logs;
# 4. if the job stops because the VM was preempted or deleted (spot / preemptible), deletes and
#    recreates it, reinstalls and starts the same command again: training resumes from the
#    checkpoints in its gs:// workdir. Any other failure stops the script with the job's status.
#
# --dry_run prints every command (gcloud, and the local wheel build) instead of running it, one
# per line, shell-quoted. In a dry run, each `describe` reports the next state of
# --dry_run_states (default NOT_FOUND), then READY: --dry_run_states=NOT_FOUND,PREEMPTED shows a
# creation, a run, a preemption and a relaunch.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --project=PROJECT --accelerator_type=TYPE
                        [--version=RUNTIME] [--spot | --preemptible] [--package=PIP_SPEC]
                        [--jax_spec=PIP_SPEC] [--max_restarts=N] [--poll_seconds=S]
                        [--delete_when_done] [--dry_run [--dry_run_states=S1,S2,...]]
                        -- SUBCOMMAND [imagen-jax flags...]
  e.g. ... --accelerator_type=v4-128 --spot -- train --config=configs/base64.py:500m \
           --workdir=gs://my-bucket/base64
EOF
  exit 2
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
log() { echo "tpu_vm.sh: $*" >&2; }

name="" zone="" project="" accelerator_type="" version="tpu-ubuntu2204-base"
capacity="" package="" jax_spec="jax[tpu]>=0.10.2,<0.12" max_restarts=100 poll_seconds=30
delete_when_done=0 dry_run=0 dry_run_states="NOT_FOUND"
job=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) capacity="--spot" ;;
    --preemptible) capacity="--preemptible" ;;
    --package=*) package="${1#*=}" ;;
    --jax_spec=*) jax_spec="${1#*=}" ;;
    --max_restarts=*) max_restarts="${1#*=}" ;;
    --poll_seconds=*) poll_seconds="${1#*=}" ;;
    --delete_when_done) delete_when_done=1 ;;
    --dry_run) dry_run=1 ;;
    --dry_run_states=*) dry_run_states="${1#*=}" ;;
    -h|--help) usage ;;
    --) shift; job=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument: $1" >&2; usage ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$project" ]] || die "--project is required"
[[ -n "$accelerator_type" ]] || die "--accelerator_type is required (e.g. v4-32, v5p-128)"
((${#job[@]})) || die "give the imagen-jax command after --, e.g. -- train --config=... --workdir=gs://..."
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number"
if [[ "${job[0]}" == "train" ]]; then
  # Workers share no disk: checkpoints must be where every worker, and the next VM, can see them.
  workdir=""
  for arg in "${job[@]}"; do [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"; done
  [[ "$workdir" == gs://* ]] || die "train needs --workdir=gs://... (got '${workdir}'): the \
workers share no disk, and a recreated VM resumes from the checkpoints there"
fi

# Shell-quotes one word so that the printed line can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it in a dry run (to the script's stdout, fd 3, even from inside $(...)).
exec 3>&1
run() {
  if ((dry_run)); then
    quote_all "$@" >&3; echo >&3
  else
    "$@"
  fi
}

where=(--project="$project" --zone="$zone")
tpu=(gcloud compute tpus tpu-vm)

# Sets `state` to the VM's state (READY, CREATING, PREEMPTED, ...), or NOT_FOUND. (Not a
# $(...) function: a dry run consumes --dry_run_states here, which a subshell would not keep.)
dry_states=()
IFS=',' read -r -a dry_states <<<"$dry_run_states"
state=""
check_state() {
  if ((dry_run)); then
    run "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    state=READY
    if ((${#dry_states[@]})); then
      state="${dry_states[0]}"; dry_states=("${dry_states[@]:1}")
    fi
  elif state=$("${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null); then
    state="${state:-UNKNOWN}"
  else
    state=NOT_FOUND
  fi
}

create_vm() {
  local flags=(--accelerator-type="$accelerator_type" --version="$version")
  [[ -n "$capacity" ]] && flags+=("$capacity")
  run "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
}

# Waits until the VM is READY, creating or recreating it as needed; says if it is new.
vm_is_new=0
ensure_ready() {
  vm_is_new=0
  while :; do
    case "$state" in
      READY) return ;;
      NOT_FOUND) log "creating $name ($accelerator_type${capacity:+, ${capacity#--}})"
                 create_vm; vm_is_new=1; state=READY ;;
      PREEMPTED|TERMINATED|STOPPED)
        log "$name is $state: deleting and recreating it"
        run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
        create_vm; vm_is_new=1; state=READY ;;
      *) log "$name is $state: waiting"
         ((dry_run)) || sleep "$poll_seconds"
         check_state ;;
    esac
  done
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel=""
install_on_workers() {
  local spec="$package" remote_wheel=""
  if [[ -z "$spec" ]]; then
    if [[ -z "$wheel" ]]; then  # built once, installed on every (re)created VM
      local dist="$repo/dist" version_
      version_=$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$repo/setup.py")
      run python3 -m pip wheel --no-deps --wheel-dir="$dist" "$repo"
      wheel="$dist/imagen_jax-${version_}-py3-none-any.whl"
    fi
    remote_wheel="/tmp/$(basename "$wheel")"
    run "${tpu[@]}" scp "$wheel" "$name:$remote_wheel" "${where[@]}" --worker=all
    spec="$remote_wheel"
  fi
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="python3 -m pip install -q -U $(quote_all "$jax_spec" "$spec")"
}

# Starts the job on all workers; gcloud streams every worker's output here.
run_job() {
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="PATH=\$HOME/.local/bin:\$PATH $(quote_all imagen-jax "${job[@]}")"
}

restarts=0
installed=0
check_state
while :; do
  ensure_ready
  if ((vm_is_new || !installed)); then
    install_on_workers
    installed=1
  fi
  log "starting imagen-jax ${job[0]} on all workers of $name (attempt $((restarts + 1)))"
  rc=0
  run_job || rc=$?
  # A preempted job may still exit 0 (it saves a checkpoint on SIGTERM and stops): the VM's
  # state, not the exit status, tells whether it ran to the end.
  check_state
  case "$state" in
    PREEMPTED|TERMINATED|STOPPED|NOT_FOUND)
      if ((restarts >= max_restarts)); then
        log "$name is $state after $restarts relaunches (--max_restarts): giving up"
        exit $((rc ? rc : 1))
      fi
      restarts=$((restarts + 1))
      log "$name is $state: relaunching ($restarts of at most $max_restarts); the run resumes" \
          "from its last checkpoint" ;;
    *)
      if ((rc == 0)); then
        log "imagen-jax ${job[0]} finished"
        break
      fi
      log "the job failed with exit status $rc while $name is $state: not a preemption," \
          "not relaunching (see the log above)"
      exit "$rc" ;;
  esac
done

if ((delete_when_done)); then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
