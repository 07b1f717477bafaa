"""T5 v1.1 encoder throughput: ours (Flax, jit) against transformers' T5EncoderModel (PyTorch).

    python -m benchmarks.encode                       # t5-small and t5-base shapes, batch 8
    python -m benchmarks.encode --sizes=small --batch_size=32 --max_length=64

Random weights at the released shapes; each (framework, size) runs in its own child process so
that its peak resident memory is its own. Captions are random ids with 10..40 real tokens padded
to max_length (both encoders compute over the padded length, as in the encode job). Also prints
the XXL encoder's parameter memory from `jax.eval_shape` (no memory is allocated), whole and per
device when FSDP-sharded by our logical axis rules.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

_SIZES = flags.DEFINE_list("sizes", ["small", "base"], "T5 v1.1 sizes to time.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Captions per forward pass.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 128, "Tokens per caption (padded).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes after a warm-up.")
_CHILD = flags.DEFINE_string("child", None, "Internal: 'jax:SIZE' or 'torch:SIZE'.")


def _inputs(batch: int, max_length: int, vocab: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  lengths = rng.randint(10, 41, batch).clip(max=max_length)
  ids = rng.randint(3, vocab, (batch, max_length)).astype(np.int32)
  mask = np.arange(max_length)[None] < lengths[:, None]
  ids[~mask] = 0
  return ids, mask


def _rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_jax(size: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5  # pylint: disable=g-import-not-at-top
  config = t5.SIZES[size]
  ids, mask = _inputs(_BATCH.value, _MAX_LENGTH.value, config.vocab_size)
  rss_imported = _rss()
  module = t5.T5Encoder(config)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), ids[:1], mask[:1])["params"]
  fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
  start = time.perf_counter()
  jax.block_until_ready(fn(params, ids, mask))
  first = time.perf_counter() - start
  times = harness.timeit(lambda: jax.block_until_ready(fn(params, ids, mask)),
                         repeats=_REPEATS.value)
  return {"times": times, "first_call_s": first, "rss_imported": rss_imported, "rss_peak": _rss()}


def child_torch(size: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5  # pylint: disable=g-import-not-at-top
  c = t5.SIZES[size]
  ids, mask = _inputs(_BATCH.value, _MAX_LENGTH.value, c.vocab_size)
  rss_imported = _rss()
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
      num_heads=c.num_heads, num_layers=c.num_layers, feed_forward_proj="gated-gelu",
      dropout_rate=0.0)).eval()
  ids_t, mask_t = torch.from_numpy(ids.astype("int64")), torch.from_numpy(mask.astype("int64"))

  def forward():
    with torch.inference_mode():
      model(input_ids=ids_t, attention_mask=mask_t)

  start = time.perf_counter()
  forward()
  first = time.perf_counter() - start
  times = harness.timeit(forward, repeats=_REPEATS.value)
  return {"times": times, "first_call_s": first, "rss_imported": rss_imported, "rss_peak": _rss(),
          "torch_threads": torch.get_num_threads()}


def run_child(framework: str, size: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.encode", f"--child={framework}:{size}",
         f"--batch_size={_BATCH.value}", f"--max_length={_MAX_LENGTH.value}",
         f"--repeats={_REPEATS.value}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one real CPU device, as a user would run it
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  line = next((l for l in out.stdout.splitlines() if l.startswith("CHILD_JSON ")), None)
  if line is None:
    raise RuntimeError(f"{framework}:{size} failed:\n{out.stderr[-3000:]}")
  return json.loads(line[len("CHILD_JSON "):])


def xxl_memory() -> list[dict]:
  """XXL parameter bytes from eval_shape, whole and per device under FSDP sharding."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5  # pylint: disable=g-import-not-at-top
  from imagen_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  boxed = encoder_lib.boxed_param_shapes(t5.SIZES["xxl"])
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  count = sum(int(np.prod(leaf.value.shape)) for leaf in leaves)
  rows = []
  for mesh_sizes in ({"data": 1, "fsdp": 1, "model": 1}, {"data": 1, "fsdp": 8, "model": 1},
                     {"data": 1, "fsdp": 4, "model": 2}, {"data": 1, "fsdp": 64, "model": 4}):
    # Only the mesh's shape matters for the arithmetic: an abstract mesh needs no devices.
    mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes.values()), partitioning.MESH_AXES)
    per_device = 0
    for leaf in leaves:
      spec = partitioning.logical_to_sharding(leaf.names, leaf.value.shape, mesh).spec
      shards = math.prod(mesh.shape[a] for axes in spec if axes
                         for a in ((axes,) if isinstance(axes, str) else axes))
      per_device += int(np.prod(leaf.value.shape)) // shards
    devices = math.prod(mesh_sizes.values())
    rows.append({"mesh": "x".join(f"{k}{v}" for k, v in mesh_sizes.items()), "devices": devices,
                 "params": count, "f32_GiB_per_device": round(per_device * 4 / 2 ** 30, 3),
                 "bf16_GiB_per_device": round(per_device * 2 / 2 ** 30, 3)})
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  if _CHILD.value:
    framework, size = _CHILD.value.split(":")
    result = child_jax(size) if framework == "jax" else child_torch(size)
    print("CHILD_JSON " + json.dumps(result))
    return
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  rows = []
  for size in _SIZES.value:
    results = {fw: run_child(fw, size) for fw in ("jax", "torch")}
    rate = {fw: _BATCH.value / min(r["times"]) for fw, r in results.items()}
    for fw, r in results.items():
      rows.append({"size": size, "framework": "ours (flax, jit)" if fw == "jax" else
                   "transformers (torch)", "batch": _BATCH.value, "max_length": _MAX_LENGTH.value,
                   "median_s": round(sorted(r["times"])[len(r["times"]) // 2], 4),
                   "captions_per_s": round(rate[fw], 2),
                   "ours_over_torch": round(rate["jax"] / rate["torch"], 3),
                   "first_call_s": round(r["first_call_s"], 2),
                   "peak_rss_MiB": round(r["rss_peak"] / 2 ** 20),
                   "rss_after_import_MiB": round(r["rss_imported"] / 2 ** 20)})
  xxl = xxl_memory()
  harness.report("encode", rows, extra={"xxl_param_memory": xxl})
  print(harness.format_table(xxl))


if __name__ == "__main__":
  app.run(main)
