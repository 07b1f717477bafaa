"""The training step with and without huge pages for XLA's host buffers (core/hugepages.py).

    python -m benchmarks.huge_pages --config=configs/demo_base.py --devices=2 --rounds=3

glibc reads `GLIBC_TUNABLES` only when a process starts, so each row is a fresh process of
`benchmarks/train_step.py` (the demo's step with its text encoder, a random batch), alternating
off / on `--rounds` times: this VM's speed drifts between hours, and only rows of one sitting,
interleaved, compare. Per row: step time, minor page faults and kernel seconds per step.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from imagen_jax.core import hugepages

CONFIG = flags.DEFINE_string("config", "configs/demo_base.py", "Stage config of the step.")
DEVICES = flags.DEFINE_integer("devices", 2, "CPU devices (the demo: one per core).")
ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternations of off / on.")
STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round of each process.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per process.")


def child_environment(huge_pages: bool) -> dict[str, str]:
  """This environment without the glibc tunable (other tunables kept), and huge pages left to
  train_step's own start-up (`hugepages.reexecute_with_huge_pages`, as `imagen-jax` does) or
  turned off."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES.value}"
  env["GLIBC_TUNABLES"] = ":".join(t for t in env.get("GLIBC_TUNABLES", "").split(":")
                                   if t and not t.startswith(hugepages.TUNABLE))
  env[hugepages.OPT_OUT] = "1" if huge_pages else "0"
  return env


def run_step_benchmark(huge_pages: bool) -> dict[str, Any]:
  """One `benchmarks.train_step` process; its RESULT_JSON row."""
  command = [sys.executable, "-m", "benchmarks.train_step", f"--config={CONFIG.value}",
             "--text=encoder", f"--steps={STEPS.value}", f"--repeats={REPEATS.value}"]
  out = subprocess.run(command, env=child_environment(huge_pages), capture_output=True,
                       text=True, check=True).stdout
  line = next(l for l in out.splitlines() if l.startswith("RESULT_JSON "))
  return json.loads(line[len("RESULT_JSON "):])["rows"][0]


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  print(f"transparent huge pages: {hugepages.thp_mode() or 'unknown'}; glibc "
        f"{' '.join(platform.libc_ver())}")
  rows = []
  for _ in range(ROUNDS.value):
    for huge in (False, True):
      row = run_step_benchmark(huge)
      rows.append({"huge_pages": huge, "step_s": row["step_s"], "step_min_s": row["step_min_s"],
                   "images_per_s": row["images_per_s"],
                   "minor_faults_per_step": row["minor_faults_per_step"],
                   "system_s_per_step": row["system_s_per_step"],
                   "host_max_rss_gib": row["host_max_rss_gib"]})
  harness.report("huge_pages", rows, extra={"config": CONFIG.value, "devices": DEVICES.value,
                                            "steps": STEPS.value, "repeats": REPEATS.value})


if __name__ == "__main__":
  app.run(main)
