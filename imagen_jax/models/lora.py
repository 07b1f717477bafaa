"""LoRA: low-rank adapters on a trained U-Net's layers (Hu et al. 2021), without touching it.

    spec = LoraSpec(rank=8, alpha=8.0, layers=("attention", "dense"))
    adapters = init_adapters(key, model, config, spec)     # boxed {module path: {"a", "b"}}
    out = apply(model, base_params, unbox(adapters), spec, scale, x, log_snr, ...)  # W x + s B A x
    merged = merge(base_params, unbox(adapters), spec, scale)  # W + s A B: sample at base speed

A layer with kernel W [in, out] (a 3x3 convolution's [3, 3, in, out] is flattened to
[9 in, out]) gets a [in, rank] and b [rank, out]; its output becomes x W + s (x a) b with
s = alpha / rank * scale. `b` starts at zero, so a fresh adapter is exactly the base model.
Layers by group (`LoraSpec.layers`; a config's `finetune.lora_layers`, comma-separated):
- "attention": the query, key, value (image and text) and output projections of every attention
  block: the text cross-attention is where a new word reaches the image;
- "dense": every other dense layer (noise-level and text-pooling MLPs, the residual blocks'
  scale-shift projections, the text projection);
- "conv": the convolutions (3x3 as LoCon does: a [3, 3, in, rank] convolution, then rank -> out).

The base model's modules are used as they are: `apply` intercepts their calls
(`flax.linen.intercept_methods`) and adds the low-rank branch to the layers it adapts, so
training never forms the product a b nor a gradient of a frozen kernel. Adapters mirror the
parameter tree (adapters["mid_attn"]["query"] = {"a", "b"}) and carry logical axis names taken
from the kernel they adapt, so they shard by the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import models
from imagen_jax.models import layers

GROUPS = ("attention", "dense", "conv")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Rank, weight (alpha / rank) and the layer groups the adapters go on."""
  rank: int = 8
  alpha: float = 8.0
  layers: tuple[str, ...] = ("attention", "dense")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora_rank must be >= 1, got {self.rank}")
    unknown = [g for g in self.layers if g not in GROUPS]
    if unknown or not self.layers:
      raise ValueError(f"lora_layers={','.join(self.layers)!r}: choose one or more of "
                       f"{', '.join(GROUPS)} (comma-separated)")

  def factor(self, scale: float = 1.0) -> float:
    """s = alpha / rank * scale: the adapters' weight in the output."""
    return self.alpha / self.rank * scale


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted layer: its module path, kind ("dense" or "conv"), group and kernel shape."""
  path: tuple[str, ...]
  kind: str
  group: str
  kernel_shape: tuple[int, ...]


def _group(module: nn.Module) -> str | None:
  if isinstance(module, nn.Conv):
    return "conv"
  if isinstance(module, nn.Dense):
    return "attention" if isinstance(module.parent, layers.AttentionBlock) else "dense"
  return None


def targets(model: nn.Module, config: ml_collections.ConfigDict,
            spec: LoraSpec) -> list[Target]:
  """The layers `spec` adapts, found by tracing the model once (shapes only, no compute)."""
  found: dict[tuple[str, ...], Target] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    group = _group(module) if context.method_name == "__call__" else None
    out = next_fun(*args, **kwargs)
    if group in spec.layers:
      kernel = nn.unbox(module.variables["params"]["kernel"])
      found.setdefault(tuple(module.path), Target(
          tuple(module.path), "conv" if group == "conv" else "dense", group, tuple(kernel.shape)))
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), **models.init_inputs(config))
  jax.eval_shape(init)
  if not found:
    raise ValueError(f"lora_layers={','.join(spec.layers)!r} matches no layer of this "
                     f"{config.model.name}")
  return list(found.values())


def init_adapters(key: jax.Array, model: nn.Module, config: ml_collections.ConfigDict,
                  spec: LoraSpec) -> dict[str, Any]:
  """Fresh adapters, boxed with logical axis names: a ~ N(0, 1 / fan_in), b = 0."""
  boxed_params = models.param_shapes(config)
  adapters: dict[str, Any] = {}
  for i, target in enumerate(targets(model, config, spec)):
    kernel = _get(boxed_params, target.path)["kernel"]
    names = kernel.names if isinstance(kernel, nn.Partitioned) else (None,) * len(
        target.kernel_shape)
    fan_in = math.prod(target.kernel_shape[:-1])
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, spec.rank), jnp.float32)
    node = _setdefault_path(adapters, target.path)
    node["a"] = nn.LogicallyPartitioned(a / math.sqrt(fan_in), names=(names[-2], None))
    node["b"] = nn.LogicallyPartitioned(jnp.zeros((spec.rank, target.kernel_shape[-1]), jnp.float32),
                               names=(None, names[-1]))
  return adapters


def adapter_shapes(model: nn.Module, config: ml_collections.ConfigDict, spec: LoraSpec) -> Any:
  """The boxed adapters as ShapeDtypeStructs (nothing allocated): restore targets, shardings."""
  return jax.eval_shape(lambda k: init_adapters(k, model, config, spec), jax.random.PRNGKey(0))


def adapter_paths(adapters: Any) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
  """(module path, {"a", "b"}) of every adapter in the tree."""
  def walk(node, path):
    if isinstance(node, dict) and "a" in node and "b" in node:
      yield path, node
    elif isinstance(node, dict):
      for name in sorted(node):
        yield from walk(node[name], path + (name,))
  yield from walk(adapters, ())


def merge(base_params: Any, adapters: Any, spec: LoraSpec, scale: float = 1.0) -> Any:
  """The base parameters with each adapted kernel replaced by W + s a b (computed once)."""
  merged = jax.tree_util.tree_map(lambda x: x, base_params)  # new containers, same leaves
  factor = spec.factor(scale)
  for path, adapter in adapter_paths(adapters):
    module = _get(merged, path)
    kernel = module["kernel"]
    delta = (adapter["a"] @ adapter["b"]).reshape(kernel.shape)
    module["kernel"] = (kernel + factor * delta).astype(kernel.dtype)
  return merged


def apply(model: nn.Module, base_params: Any, adapters: Any, spec: LoraSpec, scale: float,
          *args, **kwargs) -> jax.Array:
  """`model.apply({"params": base_params}, *args, **kwargs)` with the adapters added, unmerged."""
  factor = spec.factor(scale)
  by_path = {path: adapter for path, adapter in adapter_paths(adapters)}

  def add_low_rank(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    adapter = by_path.get(tuple(module.path)) if context.method_name == "__call__" else None
    if adapter is None:
      return out
    return out + (factor * _low_rank(module, call_args[0], adapter)).astype(out.dtype)

  with nn.intercept_methods(add_low_rank):
    return model.apply({"params": base_params}, *args, **kwargs)


def network(model: nn.Module, spec: LoraSpec | None, scale: float = 1.0
            ) -> Callable[..., jax.Array]:
  """apply_fn(params, base_params, *inputs, **kw): the model's own apply (spec None: `params`
  are its parameters, `base_params` unused) or the base model with adapters `params`."""
  if spec is None:
    return lambda params, base_params, *a, **kw: model.apply({"params": params}, *a, **kw)
  return lambda params, base_params, *a, **kw: apply(model, base_params, params, spec, scale,
                                                     *a, **kw)


def _low_rank(module: nn.Module, x: jax.Array, adapter: dict[str, jax.Array]) -> jax.Array:
  """(x a) b in the layer's compute dtype, for a Dense or a Conv as `layers` builds them."""
  dtype = module.dtype or x.dtype
  a, b = adapter["a"].astype(dtype), adapter["b"].astype(dtype)
  x = x.astype(dtype)
  if isinstance(module, nn.Conv):
    kernel_size = tuple(module.kernel_size)
    a = a.reshape(kernel_size + (x.shape[-1], a.shape[-1]))
    h = jax.lax.conv_general_dilated(x, a, tuple(module.strides or (1,) * len(kernel_size)),
                                     module.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  else:
    h = x @ a
  return h @ b


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _setdefault_path(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
  for name in path:
    tree = tree.setdefault(name, {})
  return tree


def count(adapters: Any) -> int:
  """Adapter parameters (boxed or not)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(adapters)))
