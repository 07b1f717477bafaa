"""DeepFloyd IF's U-Nets in diffusers' format, read and written with numpy (no torch).

    unet = diffusers_format.read_unet("IF-I-XL-v1.0/unet")   # the float32 files, else fp16
    model = if_unet.IFUNet(unet.config, dtype=jnp.bfloat16)
    out = model.apply({"params": unet.params}, sample, timesteps, encoder_hidden_states)
    diffusers_format.write_unet("out/unet", unet.params, unet.diffusers_config, dtype="float16")
    schedule = diffusers_format.read_scheduler_config("IF-I-XL-v1.0/scheduler")

A diffusers U-Net directory holds config.json and its weights in one safetensors file,
`diffusion_pytorch_model[.fp16].safetensors`, or in shards that an index lists,
`diffusion_pytorch_model.safetensors.index[.fp16].json`. Each tensor has one place in the Flax
tree of models/if_unet.py (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`): torch's conv weights [out, in, kh, kw] become kernels
[kh, kw, in, out], linear weights [out, in] kernels [in, out], norm weights scales. Reading
checks that every tensor is used once and has the shape the config implies; writing then
reading gives back the same tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from imagen_jax.models import if_unet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}
# diffusers' module lists: their items are named `<list>.<i>` there and `<list>_<i>` here.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
          "to_out")
_LIST_ITEM = re.compile(r"({})_(\d+)".format("|".join(_LISTS)))


@dataclasses.dataclass
class DiffusersUNet:
  """A U-Net read from a diffusers directory."""
  diffusers_config: dict[str, Any]  # config.json as written
  config: if_unet.IFUNetConfig
  params: dict[str, Any]            # the IFUNet's parameter tree, float32 numpy arrays
  dtype: str                        # the tensors' dtype in the files ("float16", ...)


# --- Names and layouts --------------------------------------------------------------------------

def flax_path(name: str, leaves: Mapping[tuple[str, ...], Any]) -> tuple[str, ...]:
  """A diffusers tensor name -> its path in the Flax tree; `leaves` (the tree's paths) decides
  whether a `weight` is a kernel or a norm's scale."""
  *modules, leaf = name.split(".")
  path: list[str] = []
  for part in modules:
    if part.isdigit() and path and path[-1] in _LISTS:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if leaf == "weight":
    leaf = "scale" if (*path, "scale") in leaves else "kernel"
  return (*path, leaf)


def diffusers_name(path: tuple[str, ...]) -> str:
  """A path in the Flax tree -> the diffusers tensor name."""
  parts: list[str] = []
  for part in path[:-1]:
    item = _LIST_ITEM.fullmatch(part)
    parts += [item[1], item[2]] if item else [part]
  return ".".join(parts + [{"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])])


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if leaf == "kernel" and array.ndim == 2 else array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array.T if leaf == "kernel" and array.ndim == 2 else array


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  return _to_torch(np.empty(shape, np.bool_), leaf).shape


def expected_tensors(config: if_unet.IFUNetConfig) -> dict[str, tuple[int, ...]]:
  """{diffusers tensor name: torch shape} of the U-Net `config` describes (nothing allocated)."""
  leaves = traverse_util.flatten_dict(nn.unbox(if_unet.param_shapes(config)))
  return {diffusers_name(p): _torch_shape(tuple(s.shape), p[-1]) for p, s in leaves.items()}


def params_from_tensors(tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                        config: if_unet.IFUNetConfig) -> dict[str, Any]:
  """The IFUNet parameter tree (float32 numpy) from diffusers' tensors, one at a time.

  Raises ValueError naming the tensor that has no place in the network, has the wrong shape or
  dtype, or comes twice, and the tensors that are missing.
  """
  leaves = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(
      nn.unbox(if_unet.param_shapes(config))).items()}
  params: dict[tuple[str, ...], np.ndarray] = {}
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  for name, tensor in items:
    path = flax_path(name, leaves)
    if path not in leaves:
      raise ValueError(f"tensor {name!r} {tuple(tensor.shape)} has no place in the U-Net the "
                       f"config describes (no parameter {'/'.join(path)})")
    if path in params:
      raise ValueError(f"tensor {name!r} comes twice")
    if not np.issubdtype(np.dtype(tensor.dtype), np.floating) and tensor.dtype != jnp.bfloat16:
      raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, not a float type")
    wanted = _torch_shape(leaves[path], path[-1])
    if tuple(tensor.shape) != wanted:
      raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config needs "
                       f"{wanted}")
    params[path] = np.ascontiguousarray(_to_flax(np.asarray(tensor).astype(np.float32),
                                                 path[-1]))
  missing = sorted(diffusers_name(p) for p in leaves if p not in params)
  if missing:
    raise ValueError(f"{len(missing)} tensors that the config needs are missing: "
                     f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
  return traverse_util.unflatten_dict(params)


def tensors_from_params(params: Any, dtype: str = "float32") -> dict[str, np.ndarray]:
  """diffusers' state dict {name: array in torch layout and `dtype`} of an IFUNet's parameters
  (a tree of numpy or jax arrays, `nn.Partitioned` boxes allowed)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  flat = traverse_util.flatten_dict(jax.device_get(nn.unbox(params)))
  return {diffusers_name(path): np.ascontiguousarray(
              _to_torch(np.asarray(value), path[-1]).astype(DTYPES[dtype]))
          for path, value in flat.items()}


# --- Files --------------------------------------------------------------------------------------

def _variant_names(variant: str | None) -> tuple[str, str]:
  """(the single weights file, the shards' index) of a variant: diffusers puts the variant name
  before the last suffix. Shard names come from the index, whatever their spelling."""
  if not variant:
    return WEIGHTS_NAME, INDEX_NAME
  return (f"diffusion_pytorch_model.{variant}.safetensors",
          f"diffusion_pytorch_model.safetensors.index.{variant}.json")


def weight_files(directory: str, variant: str | None = None) -> tuple[str, dict[str, str] | None]:
  """(the weights file or the index found, the index's {tensor: shard file} or None).

  `variant` None: the plain files, else the "fp16" variant's; a variant name: only its files.
  """
  tried = []
  for candidate in ([None, "fp16"] if variant is None else [variant]):
    single, index = _variant_names(candidate)
    for name in (single, index):
      path = os.path.join(directory, name)
      tried.append(name)
      if os.path.exists(path):
        if name == single:
          return path, None
        with open(path, encoding="utf-8") as f:
          return path, json.load(f)["weight_map"]
  raise FileNotFoundError(f"no diffusers U-Net weights in {directory}: looked for {tried}")


def iter_tensors(directory: str, variant: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of every tensor of a U-Net directory in its stored dtype, one at a time."""
  path, weight_map = weight_files(directory, variant)
  if weight_map is None:
    shards = {os.path.basename(path): None}
  else:
    shards = {}
    for name, shard in weight_map.items():
      shards.setdefault(shard, set()).add(name)
  for shard, names in sorted(shards.items()):
    with safetensors.safe_open(os.path.join(directory, shard), framework="np") as f:
      stored = set(f.keys())
      if names is not None and stored != names:
        extra, absent = sorted(stored - names), sorted(names - stored)
        raise ValueError(f"shard {shard} does not hold what {os.path.basename(path)} lists: "
                         f"unlisted {extra[:4]}, absent {absent[:4]}")
      for name in sorted(stored):
        yield name, f.get_tensor(name)


def unet_directory(path: str) -> str:
  """A U-Net directory, or a pipeline directory's `unet/`."""
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "unet")):
    return os.path.join(path, "unet")
  return path


def read_unet(path: str, variant: str | None = None) -> DiffusersUNet:
  """A diffusers UNet2DConditionModel directory (config.json + safetensors) as IFUNet parameters.

  `variant`: None reads the float32 files where there are some, else the fp16 variant's; "fp16"
  reads only those. Tensors are converted to float32.
  """
  directory = unet_directory(path)
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    diffusers_config = json.load(f)
  config = if_unet.from_diffusers_config(diffusers_config)
  dtypes: set[str] = set()

  def tensors():
    for name, tensor in iter_tensors(directory, variant):
      dtypes.add(np.dtype(tensor.dtype).name)
      yield name, tensor

  params = params_from_tensors(tensors(), config)
  return DiffusersUNet(diffusers_config, config, params, "/".join(sorted(dtypes)))


def write_unet(path: str, params: Any, config: Mapping[str, Any] | if_unet.IFUNetConfig,
               dtype: str = "float32", variant: str | None = None) -> str:
  """Writes `params` as a diffusers U-Net directory: config.json and one safetensors file, which
  `UNet2DConditionModel.from_pretrained(path[, variant=...])` loads. Returns the weights path.

  `config`: diffusers' config dict (as read_unet returns it) or an IFUNetConfig; `dtype`:
  "float32", "float16" or "bfloat16" for the tensors.
  """
  if isinstance(config, if_unet.IFUNetConfig):
    model_config, diffusers_config = config, config.to_diffusers_config()
  else:
    model_config, diffusers_config = if_unet.from_diffusers_config(config), dict(config)
  tensors = tensors_from_params(params, dtype)
  expected = expected_tensors(model_config)
  shapes = {name: tuple(t.shape) for name, t in tensors.items()}
  if shapes != expected:
    wrong = sorted(set(shapes.items()) ^ set(expected.items()))
    raise ValueError(f"the parameters do not fit the config: {wrong[:6]}")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(diffusers_config, f, indent=2, sort_keys=True)
  weights = os.path.join(path, _variant_names(variant)[0])
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  return weights


# --- The scheduler ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DDPMSchedulerConfig:
  """diffusers' DDPMScheduler settings (its defaults where scheduler_config.json is silent).

  IF's pipelines: 1000 steps, beta_schedule "squaredcos_cap_v2", prediction_type "epsilon",
  variance_type "learned_range" (the U-Net's second 3 channels interpolate the log variance),
  thresholding with dynamic_thresholding_ratio and sample_max_value.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  variance_type: str = "fixed_small"
  clip_sample: bool = True
  prediction_type: str = "epsilon"
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  clip_sample_range: float = 1.0
  sample_max_value: float = 1.0
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  rescale_betas_zero_snr: bool = False


def read_scheduler_config(path: str) -> DDPMSchedulerConfig:
  """A DDPMScheduler's scheduler_config.json (the file, its directory, or a pipeline directory
  with `scheduler/`). Raises ValueError for another scheduler class or an unknown setting."""
  for candidate in (path, os.path.join(path, "scheduler_config.json"),
                    os.path.join(path, "scheduler", "scheduler_config.json")):
    if os.path.isfile(candidate):
      break
  else:
    raise FileNotFoundError(f"no scheduler_config.json at {path}")
  with open(candidate, encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
    raise ValueError(f"unsupported scheduler _class_name={cfg['_class_name']!r}: IF's pipelines "
                     "use DDPMScheduler")
  names = {field.name for field in dataclasses.fields(DDPMSchedulerConfig)}
  for key, value in cfg.items():
    if not key.startswith("_") and key not in names:
      raise ValueError(f"unknown DDPMScheduler setting {key}={value!r} in {candidate}")
  fields = {k: v for k, v in cfg.items() if k in names}
  if fields.get("trained_betas") is not None:
    fields["trained_betas"] = tuple(fields["trained_betas"])
  return DDPMSchedulerConfig(**fields)
