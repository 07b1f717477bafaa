"""The FID Inception-v3 in Flax (NHWC): pytorch-fid's network, loading its weight file.

    variables = load_weights("pt_inception-2015-12-05-6726825d.pth")   # or the .npz export
    extractor = FeatureExtractor(variables)
    features = extractor(images)          # uint8 [N, H, W, 3] -> float32 [N, 2048]

FID is only comparable across papers when it is computed with one particular network: the
TensorFlow Inception graph of 2015-12-05, which pytorch-fid ported to `FIDInceptionV3` with
weights `pt_inception-2015-12-05-6726825d.pth`. This module is that network, block for block
(`FIDInceptionA/C/E_1/E_2` differ from torchvision's Inception-v3: TF-style average pooling
that ignores padding, and a max pool in the last block), with pytorch-fid's input handling
(bilinear resize to 299x299 without antialiasing, [0, 1] -> [-1, 1]) and its 2048-d output (the
final average pool). Nothing downloads: the weight file is given by path. Reading the .pth needs
torch; convert it once to an .npz to drop that need:

    python -c "from imagen_jax.eval import inception; \
        inception.pth_to_npz('pt_inception-2015-12-05-6726825d.pth', 'fid_inception.npz')"

Parameters keep the torch names (`Mixed_6b/branch7x7_2/conv/kernel` is the tensor
`Mixed_6b.branch7x7_2.conv.weight`, OIHW -> HWIO), and BatchNorm runs in eval mode from the
file's running statistics (`batch_stats`), so the mapping is one rule for every layer.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.core import fileio

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURES = 2048
# The FID network's classifier has 1008 classes (torchvision's ImageNet Inception has 1000):
# the quickest way to tell the two weight files apart, since their layer names are the same.
FID_CLASSES = 1008
_BN_EPSILON = 1e-3


class WeightsError(ValueError):
  """A weight file that is not the FID Inception's layout; the message lists every mismatch."""


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eval mode, eps 1e-3) + ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides, use_bias=False,
                padding=((pad_h, pad_h), (pad_w, pad_w)), precision="highest", name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool leaves the zero padding out of the mean (pytorch-fid's patch).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_down(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: [N, 35, 35, C] -> [N, 35, 35, 224 + pool_features]."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch1x1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    branch5x5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's, unpatched): [N, 35, 35, 288] -> [N, 17, 17, 768]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_down(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e: [N, 17, 17, 768] -> [N, 17, 17, 768]."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    branch7x7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = BasicConv2d(c7, **row, name="branch7x7_2")(branch7x7)
    branch7x7 = BasicConv2d(192, **col, name="branch7x7_3")(branch7x7)
    branch7x7dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, **row, name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, **col, name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(192, **row, name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's, unpatched): [N, 17, 17, 768] -> [N, 8, 8, 1280]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_down(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (E_1, average pool) and Mixed_7c (E_2, max pool): [N, 8, 8, C] -> [N, 8, 8, 2048].

  The max pool of E_2 is the 2015 TF graph's (likely a bug there, kept for comparable FIDs).
  """
  pool: str  # "avg" (FIDInceptionE_1) or "max" (FIDInceptionE_2)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    branch3x3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(branch3x3),
                                 BasicConv2d(384, **col, name="branch3x3_2b")(branch3x3)], -1)
    branch3x3dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        BasicConv2d(384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
        BasicConv2d(384, **col, name="branch3x3dbl_3b")(branch3x3dbl)], -1)
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool_same(x)
    branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """float [N, H, W, C] -> [N, size, size, C] like torch's F.interpolate(bilinear,
  align_corners=False): half-pixel centres, edge clamping, and no antialiasing when shrinking
  (pytorch-fid's resize; jax.image.resize's default would antialias)."""
  n, height, width, channels = images.shape
  if (height, width) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, channels), "bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """Images in [0, 1], float [N, H, W, 3] (any size) -> pool features float32 [N, 2048]."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize_bilinear(images.astype(jnp.float32), INPUT_SIZE) * 2.0 - 1.0
    x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)           # 149 x 149
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)                      # 147 x 147
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_down(x)                                                      # 73 x 73
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)                     # 71 x 71
    x = _max_pool_down(x)                                                      # 35 x 35
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)                                         # 17 x 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = FIDInceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)                                         # 8 x 8
    x = FIDInceptionE("avg", name="Mixed_7b")(x)
    x = FIDInceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state_dict <-> our variables.

def variable_shapes() -> dict[str, Any]:
  """The network's variables as ShapeDtypeStructs: {"params": ..., "batch_stats": ...}."""
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), dummy)


def _mapping() -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """{torch name: (torch shape, our variable path)} for every tensor the network uses."""
  mapping = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variable_shapes()["params"])[0]:
    names = tuple(p.key for p in path)
    if names[-2:] != ("conv", "kernel"):
      continue
    layer, prefix = names[:-2], ".".join(names[:-2])
    kh, kw, cin, cout = leaf.shape
    mapping[f"{prefix}.conv.weight"] = ((cout, cin, kh, kw), ("params",) + names)
    for suffix, (collection, *leaf_path) in (("bn.weight", ("params", "bn", "scale")),
                                             ("bn.bias", ("params", "bn", "bias")),
                                             ("bn.running_mean", ("batch_stats", "bn", "mean")),
                                             ("bn.running_var", ("batch_stats", "bn", "var"))):
      mapping[f"{prefix}.{suffix}"] = ((cout,), (collection,) + layer + tuple(leaf_path))
  return mapping


def torch_layout() -> dict[str, tuple[int, ...]]:
  """{torch tensor name: torch shape} that the FID weight file must hold (the classifier `fc.*`
  and BatchNorm's `num_batches_tracked` may also be there, and are not used)."""
  return {name: shape for name, (shape, _) in _mapping().items()}


def _is_ignored(name: str) -> bool:
  return name.endswith(".num_batches_tracked") or name in ("fc.weight", "fc.bias")


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """pytorch-fid's state_dict (name -> array, torch layout) -> our float32 variables.

  Conv weights go OIHW -> HWIO; BatchNorm weight, bias, running_mean, running_var go to
  params bn/scale, bn/bias and batch_stats bn/mean, bn/var. Raises WeightsError listing every
  missing, unexpected and mis-shaped tensor at once.
  """
  state = {name: np.asarray(value) for name, value in state_dict.items()}
  mapping = _mapping()
  missing = [f"{n} {list(s)}" for n, (s, _) in mapping.items() if n not in state]
  unexpected = [n for n in state if n not in mapping and not _is_ignored(n)]
  misshaped = [f"{n}: got {list(state[n].shape)}, expected {list(s)}"
               for n, (s, _) in mapping.items() if n in state and tuple(state[n].shape) != s]
  fc = state.get("fc.weight")
  if fc is not None and fc.ndim == 2 and fc.shape[0] != FID_CLASSES:
    misshaped.append(f"fc.weight: got {list(fc.shape)}, expected [{FID_CLASSES}, {FEATURES}]"
                     " (a classifier with other classes: not the FID Inception's weights)")
  if missing or unexpected or misshaped:
    lines = [f"not the FID Inception-v3 weight layout (pytorch-fid's {FID_WEIGHTS_FILE}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
    if any(n.startswith("AuxLogits.") for n in unexpected):
      lines.append("  (AuxLogits.* is torchvision's ImageNet Inception, whose features differ)")
    if any(n.startswith("blocks.") for n in unexpected):
      lines.append("  (blocks.* is pytorch-fid's InceptionV3 wrapper: save the inner network's "
                   "state_dict, as the released file does)")
    raise WeightsError("\n".join(lines))
  variables: dict[str, Any] = {}
  for name, (_, path) in mapping.items():
    value = state[name].astype(np.float32)
    if name.endswith(".conv.weight"):
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return variables


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .pth (torch pickle; needs torch) or .npz file, as numpy arrays."""
  data = fileio.read_bytes(path)
  if str(path).endswith(".npz"):
    with np.load(io.BytesIO(data)) as npz:
      return {name: npz[name] for name in npz.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: torch, only to read the .pth file
  except ImportError as e:
    raise ImportError(
        f"reading {path} (a torch pickle) needs torch. Convert it once where torch is installed: "
        "python -c \"from imagen_jax.eval import inception; "
        f"inception.pth_to_npz('{path}', 'fid_inception.npz')\", then pass the .npz") from e
  state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
  return {name: value.detach().float().numpy() if value.is_floating_point()
          else value.detach().numpy() for name, value in state.items()}


def pth_to_npz(pth_path: str, npz_path: str) -> None:
  """Converts the .pth weight file to an .npz (same tensor names), after checking its layout."""
  state = read_state_dict(pth_path)
  variables_from_state_dict(state)
  buffer = io.BytesIO()
  np.savez(buffer, **state)
  fileio.write_bytes(npz_path, buffer.getvalue())


def load_weights(path: str) -> dict[str, Any]:
  """The FID Inception's variables from the .pth weight file or its .npz export."""
  if not fileio.exists(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} not found. FID needs pytorch-fid's {FID_WEIGHTS_FILE} "
        "(released with pytorch-fid; nothing downloads here), as .pth or converted to .npz")
  return variables_from_state_dict(read_state_dict(path))


class FeatureExtractor:
  """Batched, jitted pool features of uint8 images, split over the local devices."""

  def __init__(self, variables: Mapping[str, Any], batch_size: int = 50,
               devices: Sequence[jax.Device] | None = None):
    devices = list(devices or jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    # The batch is padded to a fixed multiple of the devices: one compile for every call.
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self.variables = jax.device_put(dict(variables), replicated)
    model = FIDInceptionV3()
    self._apply: Callable[..., jax.Array] = jax.jit(
        lambda v, x: model.apply(v, x.astype(jnp.float32) / 255.0))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] (one size) -> float32 [N, 2048]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      features = self._apply(self.variables, jax.device_put(padded, self._batch_sharding))
      out.append(np.asarray(features)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)

  def features_of(self, images: Iterable[np.ndarray]) -> np.ndarray:
    """Pool features of a stream of uint8 [H, W, 3] images (same size), batch by batch, so a
    30k-image set is never all in memory: float32 [N, 2048]."""
    out, batch = [], []
    for image in images:
      batch.append(image)
      if len(batch) == self.batch_size:
        out.append(self(np.stack(batch)))
        batch = []
    if batch:
      out.append(self(np.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)
