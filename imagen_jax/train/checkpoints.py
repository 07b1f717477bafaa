"""Orbax checkpoints of a stage: `workdir/checkpoints/<step>/{state,data,config}`.

- `state`: the TrainState (params, EMA params, optimizer state, step), written by all processes
  cooperatively, restorable onto any mesh (the caller gives target shardings).
- `data`: the input iterator's state (JSON), so a resumed run sees exactly the next examples;
  in a multi-process job, every process's state (`{"per_process": [state_0, ...]}`), since each
  process reads its own shard and only process 0 writes JSON items.
- `config`: the stage's resolved config (JSON), so `sample` can rebuild the stage from its workdir.

Saves are asynchronous. Orbax writes into a temporary directory and renames it when complete,
so a job killed mid-save leaves no checkpoint that a restore would accept.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from imagen_jax import config_lib
from imagen_jax.train import distributed

ITEMS = ("state", "data", "config")
PER_PROCESS = "per_process"


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


class Checkpointer:
  """A CheckpointManager for one stage's workdir."""

  def __init__(self, workdir: str, keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # PyTree (not Standard) handler for the state: it can also restore a subtree (sampling
        # reads only the EMA params, never the optimizer state).
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, config: ml_collections.ConfigDict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(encode_data_state(data_state)),
        config=ocp.args.JsonSave(json.loads(config_lib.to_json(config)))), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state, data_state) at `step`; arrays land on the shardings in `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=ocp.args.JsonRestore()))
    return restored["state"], decode_data_state(restored["data"])

  def restore_as_stored(self, step: int) -> dict[str, Any]:
    """{state, data, config} as written (arrays on the default device): for inspection."""
    restored = self.manager.restore(step)
    return {"state": restored["state"], "data": decode_data_state(restored["data"]),
            "config": restored["config"]}

  def restore_params(self, step: int, abstract_params: Any, which: str = "ema_params") -> Any:
    """Only `which` (ema_params or params) of the state: what sampling needs, no optimizer state."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={which: abstract_params},
            restore_args={which: ocp.checkpoint_utils.construct_restore_args(abstract_params)},
            partial_restore=True)))
    return restored["state"][which]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The resolved config stored with a checkpoint (latest if step is None), and its step."""
  manager = Checkpointer(workdir, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {manager.directory}")
  restored = manager.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_lib.from_json(json.dumps(restored["config"])), step


def encode_data_state(data_state: Any) -> Any:
  """The JSON item `data` (all processes call it: with several, it gathers their states).

  Iterator states may be bytes (grain) or JSON-able; JSON needs bytes wrapped.
  """
  if isinstance(data_state, bytes):
    data_state = {"__bytes_b64__": base64.b64encode(data_state).decode("ascii")}
  data_state = data_state if data_state is not None else {}
  if jax.process_count() > 1:  # each process reads its own shard; only process 0 writes JSON
    return {PER_PROCESS: distributed.allgather_json(data_state)}
  return data_state


def decode_data_state(stored: Any) -> Any:
  """This process's iterator state from the JSON item `data`.

  From a job with another number of processes: process 0's state, which a sampling restore
  ignores and a resumed training run's input pipeline refuses, naming the difference.
  """
  if isinstance(stored, dict) and PER_PROCESS in stored:
    states = stored[PER_PROCESS]
    stored = states[jax.process_index() if len(states) == jax.process_count() else 0]
  if isinstance(stored, dict) and "__bytes_b64__" in stored:
    return base64.b64decode(stored["__bytes_b64__"])
  return stored


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings: the target a restore lays arrays out on."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
