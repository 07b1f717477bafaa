"""A training run stopped right after one of its checkpoints, to be killed there.

`python tests/helpers/stop_after_checkpoint.py <imagen-jax train flags>` trains; its process
STOP_PROCESS (default 0), once its checkpoint at STOP_AT_STEP is complete, creates STOP_MARKER
and sleeps until killed. A kill on a timer lands wherever the loop happens to be on a loaded
machine; this one lands between that checkpoint and the next on every machine.
"""

import os
import subprocess
import sys
import time

# Run as a script, this file sees no `helpers` package: it names the repository itself.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top  # after the environment is set
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
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
  cli.main(["imagen-jax", "train"] + argv)


def start_stopping_after_checkpoint(flag_lists, workdir, step, env, stop_process=0,
                                    timeout=400):
  """Starts one training process per list of `imagen-jax train` flags under this program and
  returns them (stdout and stderr merged, as text) once process `stop_process` sleeps after its
  checkpoint at `step`, which is then complete on disk. Kills them all if that never comes."""
  marker = f"{workdir}.stopped"
  env = dict(env, STOP_AT_STEP=str(step), STOP_MARKER=marker, STOP_PROCESS=str(stop_process))
  procs = [subprocess.Popen([sys.executable, __file__, *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


if __name__ == "__main__":
  main(sys.argv[1:])
