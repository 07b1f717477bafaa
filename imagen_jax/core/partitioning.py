"""The device mesh and the one place where logical axis names map to mesh axes.

Modules name the axes of every parameter (`nn.with_logical_partitioning`) and of large
activations (`nn.with_logical_constraint`) in the vocabulary below; `LOGICAL_AXIS_RULES` maps
each name to mesh axes ('data', 'fsdp', 'model'). Change sharding here, never in the models.

Vocabulary
  parameters:  embed (model width, FSDP-sharded), mlp (hidden width / conv output channels),
               heads, kv (head dim), joined_kv (heads * head dim), vocab, relpos_buckets,
               conv_h / conv_w (kernel window), norm (norm scale/bias), text_length (a
               U-Net's learned text positions)
  activations: batch, height, width, length (text tokens), act_embed, act_mlp, act_heads
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("relpos_buckets", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("text_length", None),
)


def cpu_cores() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def user_set_cpu_devices() -> bool:
  """Whether the CPU device count was chosen outside the program (XLA_FLAGS or
  JAX_NUM_CPU_DEVICES / jax.config), which `use_cpu_devices` then leaves alone."""
  return ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
          or jax.config.jax_num_cpu_devices != -1)


def use_cpu_devices(count: int) -> bool:
  """Asks for `count` CPU devices; takes effect only before JAX's backends start. Returns False
  when they had already started (the devices are then what they are)."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    return False
  return True


def cpu_devices_per_core(batch_sizes: Sequence[int], cores: int | None = None) -> int:
  """One CPU device per core, at most as many as divide every batch size evenly.

  XLA:CPU runs one program's small convolutions on fewer threads than the machine has, leaving
  cores partly idle; one device per core, each with its share of the batch, keeps every core
  busy, while more devices than cores only add overhead. `cores`: how many to count (default:
  this process's, `cpu_cores`).
  """
  cores = cores or cpu_cores()
  return max(n for n in range(1, cores + 1) if all(b % n == 0 for b in batch_sizes))


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """Sizes for ('data', 'fsdp', 'model'); one -1 takes the devices the others leave."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'model') over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  (fake CPU devices have no topology)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_spec: Any, shape: Sequence[int], mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
  """A NamedSharding for an array of `shape` with logical axes `logical_spec`.

  A mesh axis that does not divide its array dimension is dropped (that dimension is then
  replicated): a 3-channel RGB kernel cannot be split 4 ways, and should not stop the job.
  """
  spec = nn.logical_to_mesh_axes(logical_spec, rules) if logical_spec is not None else P()
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
  return NamedSharding(mesh, P(*fitted))


def tree_shardings(boxed_shapes: Any, mesh: Mesh) -> Any:
  """Shardings for a tree of (possibly `nn.Partitioned`-boxed) arrays or ShapeDtypeStructs.

  Returns the tree unboxed: a NamedSharding per leaf. Unannotated leaves are replicated.
  """
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return logical_to_sharding(leaf.names, leaf.value.shape, mesh)
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(one, boxed_shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch arrays [B, ...] are split over ('data', 'fsdp') and replicated elsewhere."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def axis_rules_context():
  """Context in which `nn.with_logical_constraint` inside modules resolves with our rules."""
  return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
  """Where sharded code is traced and run: `mesh` set (jax.set_mesh, which replaces the
  deprecated `with mesh:`) and the logical axis rules in force."""
  with jax.set_mesh(mesh), axis_rules_context():
    yield
