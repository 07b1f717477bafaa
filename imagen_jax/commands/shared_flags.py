"""Flags that several subcommands take, each defined once, here.

A command module declares the ones it uses with `use(...)`, which also makes them show in its
`imagen-jax <subcommand> --help`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags

from imagen_jax.core import config_lib
from imagen_jax.core import distributed

CONFIG = config_lib.config_flag()
WORKDIR = config_lib.DEFINE_path(
    "workdir", None, "Where checkpoints, logs and samples go (local or gs://).")
SEED = flags.DEFINE_integer("seed", 0, "Image i is sampled from (seed, i) alone; also picks "
                            "random subsets and rating-page order.")

# Multi-process jobs (see core/distributed.py for when they are multi-process).
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordination service (multi-process "
    "jobs; default: $IMAGEN_JAX_COORDINATOR_ADDRESS, $JAX_COORDINATOR_ADDRESS, or detected on "
    "TPU VMs, SLURM and Open MPI).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the job (default: $IMAGEN_JAX_NUM_PROCESSES, "
    "$JAX_NUM_PROCESSES, or detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes - 1 (default: "
    "$IMAGEN_JAX_PROCESS_ID, $JAX_PROCESS_ID, or detected).")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 100, "Seconds without a heartbeat after which a process "
    "counts as dead and the others stop with an error (multi-process jobs).")
INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300, "Seconds to wait for every process to join (multi-process "
    "jobs).")
DISTRIBUTED = ("coordinator_address", "num_processes", "process_id",
               "distributed_heartbeat_timeout", "distributed_init_timeout")

# Sampling a cascade (`imagen-jax sample`, `imagen-jax eval --metric=drawbench`).
STAGES = config_lib.DEFINE_path_list("stages", None,
                                     "Stage workdirs, base first: DIR[,DIR[,DIR]].")
OUTDIR = config_lib.DEFINE_path("outdir", None,
                                "Where the PNGs, grid.png and samples.jsonl go (local or gs://).")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Images per prompt.")
CKPT_STEPS = flags.DEFINE_list("ckpt_steps", None, "Checkpoint step per stage (default latest).")
GUIDANCE = flags.DEFINE_list("guidance", None, "Guidance weight per stage, e.g. 5,8,8.")
STEPS = flags.DEFINE_list("steps", None, "Sampling steps per stage (or one for all).")
SAMPLER = flags.DEFINE_list(
    "sampler", None, "Sampler per stage (or one): ddpm, ddim, edm_heun, dpmpp_2m, dpmpp_3m, "
    "dpmpp_2m_sde, unipc (also dpmpp_1m, unipc_3m, ...).")
SPACING = flags.DEFINE_list("spacing", None,
                            "Steps uniform in time or logsnr, per stage (or one).")
GUIDANCE_INTERVAL = flags.DEFINE_list(
    "guidance_interval", None, "Per stage (or one): LO:HI to guide only where LO < EDM sigma <= "
    "HI (sigma = exp(-log_snr / 2)), the conditional pass alone elsewhere; 'all' guides every "
    "step. E.g. 0.28:5.42,all, or 0.3:inf (guidance only at the high noise levels, where the "
    "layout is decided).")
AUG_LEVEL = flags.DEFINE_list("aug_level", None, "Noise-aug level per SR stage (or one).")
THRESHOLD = flags.DEFINE_list("threshold", None, "dynamic, static or none per stage (or one).")
LORA_SCALE = flags.DEFINE_float(
    "lora_scale", 1.0, "Weight of the adapters of LoRA stages (`imagen-jax finetune` workdirs "
    "given in --stages): 1 as trained, 0 the base stage alone.")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, "Images sampled together (inspect --memory: examples per device).")
# Prompts and outputs of the commands that write sampling outdirs (`sample`, `edit`).
PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable). '' is unconditional.")
PROMPTS_FILE = config_lib.DEFINE_path(
    "prompts_file", None, "One prompt per line, or .jsonl with a `prompt` field per line (other "
    "fields, e.g. `split`, are copied to samples.jsonl).")
SAVE_STAGES = flags.DEFINE_bool("save_stages", False, "Also save every stage's output.")
SAMPLING = ("stages", "outdir", "num_samples", "seed", "ckpt_steps", "guidance", "steps",
            "sampler", "spacing", "guidance_interval", "aug_level", "threshold", "batch_size",
            "lora_scale")


def use(*names: str) -> None:
  """Declares shared flags as the calling command's own (they then show in its --help)."""
  caller = sys._getframe(1).f_globals["__name__"]  # pylint: disable=protected-access
  for name in names:
    flags.FLAGS.register_key_flag_for_module(caller, flags.FLAGS[name])


def require(*names: str) -> None:
  """Stops with a usage error naming every missing flag."""
  missing = [f"--{name}" for name in names if not flags.FLAGS[name].value]
  if missing:
    raise flags.ValidationError(f"{', '.join(missing)} is required")


def initialize_distributed(force: bool = False) -> bool:
  """jax.distributed for a multi-process job, from the flags; before any device is touched."""
  return distributed.maybe_initialize(
      COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value, force=force,
      heartbeat_timeout_s=HEARTBEAT_TIMEOUT.value, init_timeout_s=INIT_TIMEOUT.value)


def sampling_options() -> dict[str, Any]:
  """The per-stage sampling flags as `sample.outdir.load_cascade` arguments."""
  return {"ckpt_steps": CKPT_STEPS.value, "guidance": GUIDANCE.value, "steps": STEPS.value,
          "sampler": SAMPLER.value, "spacing": SPACING.value,
          "guidance_interval": GUIDANCE_INTERVAL.value, "aug_level": AUG_LEVEL.value,
          "threshold": THRESHOLD.value, "lora_scale": LORA_SCALE.value}
