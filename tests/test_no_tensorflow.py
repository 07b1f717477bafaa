"""The core package imports and runs without TensorFlow (GPU images and lean VMs lack it)."""

import os
import subprocess
import sys

from helpers import REPO

# Hides TensorFlow from every import finder: `import tensorflow` raises ModuleNotFoundError and
# importlib.util.find_spec("tensorflow") is None, exactly as on a machine without it.
HIDE_TF = """
import sys
class _Hide:
  def __init__(self, finder): self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return None
    find = getattr(self.finder, 'find_spec', None)
    return find(name, path, target) if find else None
  def invalidate_caches(self):
    getattr(self.finder, 'invalidate_caches', lambda: None)()
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""

IMPORT_ALL = """
import importlib, pkgutil
import imagen_jax
try:
  import tensorflow
  raise SystemExit('tensorflow was importable: the test does not hide it')
except ModuleNotFoundError:
  pass
names = [m.name for m in pkgutil.walk_packages(imagen_jax.__path__, 'imagen_jax.')]
for name in names:
  importlib.import_module(name)
assert 'tensorflow' not in sys.modules, 'tensorflow got imported'
print('imported', len(names), 'modules')
"""


def test_core_imports_without_tensorflow():
  out = subprocess.run([sys.executable, "-c", HIDE_TF + IMPORT_ALL], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.split()[1]) >= 10
