"""core/hugepages.py: when `imagen-jax` re-executes itself with glibc's huge-page tunable."""

import os
import platform
import subprocess
import sys

import pytest

from imagen_jax.core import hugepages

LINUX_GLIBC = dict(system="Linux", libc=("glibc", "2.36"), mode="madvise")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(path)) == "always"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("version, supported", [("2.35", True), ("2.36", True), ("3.0", True),
                                                ("2.31", False), ("2.9", False), ("", False)])
def test_glibc_versions(version, supported):
  assert hugepages.glibc_supports_hugetlb(version) is supported


def test_the_tunable_is_added_to_those_already_set():
  env = hugepages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                               "PATH": "/bin"}, **LINUX_GLIBC)
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                 "PATH": "/bin"}
  assert hugepages.environment_with_huge_pages({}, **LINUX_GLIBC) == {
      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("env, where", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's own choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {}),  # already re-executed: no loop
    ({"IMAGEN_JAX_HUGE_PAGES": "0"}, {}),
    ({}, {"system": "Darwin"}),
    ({}, {"libc": ("", "")}),                            # musl, or not known
    ({}, {"libc": ("glibc", "2.31")}),                   # before the tunable existed
    ({}, {"mode": "always"}),                            # the kernel gives them already
    ({}, {"mode": "never"}),
])
def test_left_alone_where_it_cannot_help_or_the_user_decided(env, where):
  assert hugepages.environment_with_huge_pages(env, **{**LINUX_GLIBC, **where}) is None


@pytest.mark.skipif(hugepages.environment_with_huge_pages(
    {}, system=platform.system(), libc=platform.libc_ver(), mode=hugepages.thp_mode()) is None,
                    reason="this machine's glibc or kernel offers no huge pages to ask for")
def test_a_process_re_executes_once_with_the_tunable_and_its_arguments():
  code = ("import os, sys; from imagen_jax.core import hugepages; print('start', flush=True); "
          "hugepages.reexecute_with_huge_pages(); "
          "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
  out = subprocess.run([sys.executable, "-c", code, "a b", "--x=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  # The first run prints "start" and is replaced; the second keeps both tunables and the argv.
  assert out == ["start", "start",
                 "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['a b', '--x=1']"]
