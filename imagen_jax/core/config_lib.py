"""Loading configs: `configs/<job>.py[:variant]` files, overrides, and their JSON form.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`; the part after ':' is
passed as `arg` and selects a variant (big_vision's convention). The same loader serves the
command line (through ml_collections' `config_flags`) and Python callers (tests, the demo).
"""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from imagen_jax.core import fileio


def config_flag(example: str = "configs/base64.py:tiny") -> flags.FlagHolder:
  """The `--config=FILE[:variant]` flag, with `--config.key=value` overrides."""
  return config_flags.DEFINE_config_file(
      "config", None, f"Config file[:variant], e.g. {example}; override fields with "
      "--config.key=value.")


class _PathParser(flags.ArgumentParser):
  """A flag value that is a path: resolved once, at parsing (see fileio.resolve)."""

  def __init__(self, resolve: Callable[[str], str] = fileio.resolve):
    self._resolve = resolve

  def parse(self, argument):
    return self._resolve(argument) if isinstance(argument, str) else argument

  def flag_type(self):
    return "path"


class _PathListParser(flags.ListParser):
  """A comma-separated list of paths, each resolved at parsing."""

  def parse(self, argument):
    return [fileio.resolve(p) for p in super().parse(argument)]

  def flag_type(self):
    return "comma separated list of paths"


def DEFINE_path(name: str, default: str | None, help: str,  # pylint: disable=invalid-name,redefined-builtin
                resolve: Callable[[str], str] = fileio.resolve) -> flags.FlagHolder:
  """A string flag holding a local path (relative to the current directory, `~`) or a URL.

  The value the program sees is already resolved: relative paths break Orbax and tensorstore,
  which reject them, and every thread or subprocess that changes directory. `resolve` is
  fileio.resolve_spec for `KIND:PATH` specs such as `folder:PATH`.
  """
  return flags.DEFINE(_PathParser(resolve), name, default, help,
                      serializer=flags.ArgumentSerializer())


def DEFINE_path_list(name: str, default: list[str] | None, help: str) -> flags.FlagHolder:  # pylint: disable=invalid-name,redefined-builtin
  """`--name=PATH[,PATH...]`, each resolved as DEFINE_path does."""
  return flags.DEFINE(_PathListParser(), name, default, help,
                      serializer=flags.CsvListSerializer(","))


# Config fields that hold paths (stage configs, configs/encode.py) and how each is resolved:
# plain paths, or "KIND:PATH" specs (folder:, wds:, text:) whose other kinds name no file.
# Resolved when a config is loaded, so the config stored in a workdir is valid from anywhere.
PATH_FIELDS = {
    "data.data_dir": fileio.resolve,
    "data.embed_cache": fileio.resolve,
    "data.source": fileio.resolve_spec,
    "text.encoder": lambda spec: spec if spec.startswith("builtin:") else fileio.resolve(spec),
    "finetune.base": fileio.resolve,
    "source": fileio.resolve_spec,
    "data_dir": fileio.resolve,
    "output": fileio.resolve,
}


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves the config's path fields in place (see PATH_FIELDS); returns the config."""
  for key, resolve in PATH_FIELDS.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and isinstance(node.get(leaf), str):
      with node.unlocked():
        node[leaf] = resolve(node[leaf])
  return config


class ConfigError(ValueError):
  """A config that cannot be loaded or does not fit: the message names the key or file."""


def stage_sizes(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(image_size, crop, lowres) in pixels of a stage's training example; lowres 0 for a base
  stage. SR 2 trains on `train_crop` crops of the image with the matching low-res crop."""
  image_size = int(config.image_size)
  crop = int(config.train_crop) or image_size
  if crop > image_size:
    raise ConfigError(f"config.train_crop={crop} exceeds config.image_size={image_size}")
  if config.stage != "sr":
    return image_size, crop, 0
  if config.lowres.size <= 0 or (config.lowres.size * crop) % image_size:
    raise ConfigError(f"config.lowres.size={config.lowres.size} must be > 0 and scale the crop "
                      f"{crop} of config.image_size={image_size} to whole pixels")
  return image_size, crop, config.lowres.size * crop // image_size


def packaged_configs_dir() -> str:
  """The directory of the configs shipped with the package (the repository's `configs/`)."""
  return str(importlib.resources.files("imagen_jax.configs"))


def resolve_config_path(spec: str) -> str:
  """Maps `configs/base64.py:tiny` to an existing file, trying the packaged configs last.

  A path that exists as given wins; otherwise a bare or `configs/`-prefixed name is looked up in
  the installed `imagen_jax.configs`, so the README's commands work outside the repository.
  """
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path):
    packaged = os.path.join(packaged_configs_dir(), os.path.basename(path))
    if os.path.exists(packaged):
      path = packaged
  return path + sep + arg


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies `{"optimizer.lr": 3e-4, ...}` with the CLI's rules."""
  path, _, arg = resolve_config_path(spec).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path!r} (from {spec!r})")
  module_spec = importlib.util.spec_from_file_location(
      "imagen_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    set_by_path(config, key, value)
  return resolve_paths(config)


def parse_value(text: str) -> Any:
  """A command-line value as config_flags reads it: a Python literal, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_by_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets `config.a.b = value` by the dotted key; unknown keys and wrong types raise ConfigError."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node:
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in override {key!r})")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"unknown config key {key!r}; {_did_you_mean(leaf, node)}")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"wrong type for config key {key!r}: {e}") from e


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises ConfigError naming the first dotted key that the config does not have."""
  for key in keys:
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        where = ".".join(parts[:i]) or "config"
        hint = _did_you_mean(part, node) if isinstance(node, (ml_collections.ConfigDict, dict)) else ""
        raise ConfigError(f"unknown config key {key!r}: {where!r} has no field {part!r}. {hint}")
      node = node[part]


def _did_you_mean(name: str, node: Mapping[str, Any]) -> str:
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f"did you mean {close[0]!r}?" if close else f"valid keys: {sorted(node.keys())}"


def copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A deep, unlocked copy of `config`: a caller changes fields of its own copy only."""
  copied = config.copy_and_resolve_references()
  copied.unlock()
  return copied


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what checkpoints and workdirs store)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a ConfigDict written by `to_json` (lists come back as tuples where configs use them)."""
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _json_default(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)
