"""Commands as a user runs them: `imagen-jax` in a subprocess, the README's lines in bash."""

import json
import os
import re
import socket
import subprocess
import sys
from typing import Any, Mapping

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def without_fake_devices(xla_flags: str) -> str:
  """XLA_FLAGS without a --xla_force_host_platform_device_count flag."""
  return re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_flags).strip()


# The user's own XLA_FLAGS, without the tests' fake devices (conftest.py adds them).
USER_XLA_FLAGS = without_fake_devices(os.environ.get("XLA_FLAGS", ""))


def free_port() -> int:
  """A TCP port on loopback that nothing listens on (for a server or a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cli_argv(*args: str) -> list[str]:
  """The argv of `imagen-jax ARGS` on this interpreter (`-m`: no installed entry point needed)."""
  return [sys.executable, "-m", "imagen_jax", *args]


def _run(argv: list[str], cwd: str | os.PathLike, env: Mapping[str, str], timeout: float,
         check: bool = False) -> subprocess.CompletedProcess:
  """How the tests run a command: in `cwd`, output captured as text, within `timeout` seconds."""
  return subprocess.run(argv, cwd=str(cwd), env=dict(env), capture_output=True, text=True,
                        timeout=timeout, check=check)


def run_cli(*args: str, cwd: str | os.PathLike = REPO, env: Mapping[str, str] | None = None,
            timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
  """Runs `imagen-jax ARGS` in `cwd` and returns it, stdout and stderr captured as text.

  `env`: variables set over this process's environment (its 8 fake CPU devices included), which
  the command inherits.
  """
  return _run(cli_argv(*args), cwd, {**os.environ, **(env or {})}, timeout, check)


def run_cli_json(*args: str, **kwargs: Any) -> Any:
  """run_cli that must exit 0; its stdout parsed as JSON (what `imagen-jax eval` reports)."""
  out = run_cli(*args, **kwargs)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def readme_commands(section: str, page: str = "README.md") -> list[str]:
  """The shell commands of the section `## <section>` of `page` (the README or a docs/ page):
  its ```bash blocks, continuation lines joined, comments and blank lines dropped, in order."""
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    text = f.read()
  if f"\n## {section}" not in text:
    raise AssertionError(f"{page} has no section '## {section}'")
  body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in body.split("```bash")[1:]:
    code = block.split("```", 1)[0].replace("\\\n", " ")
    commands += [" ".join(line.split()) for line in code.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
  return commands


def run_as_typed(command: str, cwd, timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs a documented command line in bash, in `cwd`, with this environment's `imagen-jax`
  first on PATH (as in an activated virtual environment) and the user's XLA_FLAGS without the
  tests' fake devices (as a newcomer types it: the demo then picks its own CPU devices)."""
  env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
             XLA_FLAGS=USER_XLA_FLAGS)
  return _run(["bash", "-c", command], cwd, env, timeout)
