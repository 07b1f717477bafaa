"""The README as a newcomer types it: CI runs its Quick start line for line. (The docs/ pages'
CPU commands, which the README points to, run in tests/test_docs.py.)"""

import os

from helpers import REPO, readme_commands


def test_ci_runs_the_quick_start_exactly():
  install_and_demo, test = readme_commands("Quick start")
  assert install_and_demo.startswith("pip install -e . && imagen-jax demo --workdir=")
  assert test.startswith("pip install -e '.[test]' && python -m pytest")
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = [line.strip() for line in f]
  # CI types the same lines in a fresh, activated venv; the demo with --quick (the full one is
  # 14-42 minutes; tests/test_demo.py runs it the same way in a fresh directory).
  activate = ci.index("source .venv-ci/bin/activate")
  assert ci[activate - 1] == "fresh_venv .venv-ci"
  assert ci[activate + 1:activate + 3] == [install_and_demo + " --quick", test]
  # The slow tests, which the default run deselects (pytest.ini), run in a step of their own.
  assert test.split(" && ")[1] + " -m slow -p no:cacheprovider" in ci[activate + 3:]
