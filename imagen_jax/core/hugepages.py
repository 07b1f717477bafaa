"""Huge pages for the host memory XLA allocates: why `imagen-jax` re-executes itself once.

XLA:CPU allocates an execution's temporaries afresh each time it runs (tens of MB per train
step of the demo). glibc serves allocations that large with a new mmap and unmaps them on free,
so every step touches fresh 4 KiB pages, and a CPU-hosted run spends a good part of its time in
the kernel serving page faults. With the glibc tunable `glibc.malloc.hugetlb=1` (glibc 2.35+),
malloc asks for transparent huge pages on those mappings: 2 MiB pages, 512x fewer faults, and
the time goes back to training. Allocator tunables and XLA_FLAGS cannot do this; and glibc
reads its tunables only when a process starts, hence the re-execution.

Applied only where it can help: Linux with glibc 2.35 or newer and transparent huge pages in
"madvise" mode (the usual default; "always" already gives them, "never" forbids them). A
GLIBC_TUNABLES that already sets `glibc.malloc.hugetlb` is respected, and
IMAGEN_JAX_HUGE_PAGES=0 turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "IMAGEN_JAX_HUGE_PAGES"


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"; "" if unknown)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def glibc_supports_hugetlb(version: str) -> bool:
  """glibc.malloc.hugetlb exists from glibc 2.35 ("2.36" -> True, "2.31" -> False)."""
  try:
    major, minor = (int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def environment_with_huge_pages(env: Mapping[str, str], *, system: str, libc: tuple[str, str],
                                mode: str) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing would change.

  Args:
    env: the current environment.
    system: `platform.system()`.
    libc: `platform.libc_ver()`, e.g. ("glibc", "2.36").
    mode: `thp_mode()`.
  """
  tunables = env.get("GLIBC_TUNABLES", "")
  if (env.get(OPT_OUT, "1") == "0" or system != "Linux" or libc[0] != "glibc"
      or not glibc_supports_hugetlb(libc[1]) or mode != "madvise" or TUNABLE in tunables):
    return None
  new = dict(env)
  new["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  return new


def reexecute_with_huge_pages(orig_argv: Sequence[str] | None = None) -> None:
  """Replaces this process by the same command with huge pages on; returns where they are on
  already or cannot be (see the module docstring). Call before anything else has started: no
  threads, nothing printed or written."""
  env = environment_with_huge_pages(os.environ, system=platform.system(),
                                    libc=platform.libc_ver(), mode=thp_mode())
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  if env is None or not argv:
    return
  # sys.orig_argv keeps the interpreter's own options: `python -X dev -m imagen_jax ...` and the
  # console script (`python /venv/bin/imagen-jax ...`) come back as they were typed.
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
