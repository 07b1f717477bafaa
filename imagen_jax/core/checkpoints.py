"""Orbax checkpoints of a stage: `workdir/checkpoints/<step>/{state,data,config}`.

- `state`: the TrainState (params, EMA params, optimizer state, step), written by all processes
  cooperatively, restorable onto any mesh (the caller gives target shardings).
- `data`: the input iterator's state (JSON), so a resumed run sees exactly the next examples;
  in a multi-process job, every process's state (`{"per_process": [state_0, ...]}`), since each
  process reads its own shard and only process 0 writes JSON items.
- `config`: the stage's resolved config (JSON), so `sample` can rebuild the stage from its workdir.

Saves are asynchronous. Orbax writes into a temporary directory and renames it when complete,
so a job killed mid-save leaves no checkpoint that a restore would accept. A save that fails in
the background is reported by `check()` (the loop calls it every step) as a CheckpointError
naming the checkpoint and the cause, and old checkpoints are deleted only after a newer one is
complete: Orbax's own `max_to_keep` deletes them even when the newer save failed, and its
finalize thread logs the failure and carries on, so neither is used.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # no public path (orbax 0.12)

from imagen_jax.core import config_lib
from imagen_jax.core import distributed
from imagen_jax.core import fileio

ITEMS = ("state", "data", "config")
PER_PROCESS = "per_process"


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(fileio.resolve(str(workdir))) / "checkpoints"


# Orbax splits every replicated array into one slice per replica, each copied to the host by
# its own dispatched op, so that replicas write their parts in parallel. That pays for large
# arrays on many hosts, but a small net replicated over several devices has thousands of such
# slices per save, and their per-op overhead makes each checkpoint take seconds. Slices under
# 1 MiB are written whole by one replica instead; the paper-size kernels still split across
# replicas.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's standard type handlers, arrays with REPLICA_PARALLEL_MIN_BYTES."""
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
      array_metadata_store=array_metadata_store.Store())
  standard = (int, float, bytes, np.number, np.ndarray, str, type(ocp.PLACEHOLDER))
  return ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t)) for t in standard], (jax.Array, arrays))


class CheckpointError(RuntimeError):
  """A checkpoint that was not written: the message names it, the cause and what is intact."""


class _Manager(ocp.CheckpointManager):
  """Keeps the error of a failed background save for `Checkpointer.check`.

  Orbax's finalize thread calls `check_for_errors()`, which consumes the error, logs it and
  lets the job go on; this override records it first.
  """

  save_error: BaseException | None = None

  def check_for_errors(self):
    try:
      super().check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self.save_error = e
      raise


class Checkpointer:
  """A CheckpointManager for one stage's workdir."""

  def __init__(self, workdir: str, keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.keep = keep
    self._pending: int | None = None    # the step of the last save, until pruned after it
    self._confirmed: int | None = None  # the last step whose save is known to be complete
    self._failed = False                # a failed save was reported (Orbax keeps re-raising it)
    self.manager = _Manager(
        self.directory,
        # PyTree (not Standard) handler for the state: it can also restore a subtree (sampling
        # reads only the EMA params, never the optimizer state).
        item_handlers={"state": ocp.PyTreeCheckpointHandler(
                           type_handler_registry=_type_handlers()),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, config: ml_collections.ConfigDict) -> None:
    """Starts writing checkpoint `step` (in the background when async); `check` reports it."""
    self.check(wait=True)  # the previous save must have succeeded before this one starts
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(encode_data_state(data_state)),
        config=ocp.args.JsonSave(json.loads(config_lib.to_json(config)))), force=True)
    self._pending = step
    self.check()  # returns at once while the save runs; a synchronous save is checked now

  def check(self, wait: bool = False) -> None:
    """Raises CheckpointError if the last save failed; once it succeeded, prunes old ones.

    Cheap while a save is in flight (returns at once unless `wait`): the loop calls it at
    every step boundary, so a failed save stops the run at the next step.
    """
    if self._pending is None or (not wait and self.manager.is_saving_in_progress()):
      return
    step = self._pending
    if self._confirmed != step:
      self._verify(step)
      self._confirmed = step
    # Deleting synchronizes all processes, so a multi-process job prunes only where every
    # process stands at the same step (the next save, the end); one process prunes at once.
    if wait or jax.process_count() == 1:
      self._pending = None
      self._prune()

  def _verify(self, step: int) -> None:
    """Raises CheckpointError unless the save of `step` completed (waits for it)."""
    try:
      self.manager.wait_until_finished()  # re-raises what failed in Orbax's finalize thread
      error = self.manager.save_error     # what that thread caught and only logged
    except Exception as e:  # pylint: disable=broad-except
      error = e
    self.manager.save_error = None
    if error is None and not (self.directory / str(step)).exists():
      error = RuntimeError("the checkpoint directory is missing after the save finished")
    if error is not None:
      self._pending, self._failed = None, True
      self.manager.reload()  # forget the step Orbax listed before the save failed
      intact = self.manager.latest_step()
      raise CheckpointError(
          f"saving the checkpoint at step {step} to {self.directory / str(step)} failed: "
          f"{type(error).__name__}: {error}. "
          + (f"The last complete checkpoint is step {intact}; " if intact is not None else
             "There is no complete checkpoint; ")
          + "fix the cause and rerun the same command to resume from it.") from error

  def _prune(self) -> None:
    """Deletes all but the newest `keep` checkpoints (only ever after a save succeeded)."""
    if not self.keep:
      return
    for old in sorted(self.manager.all_steps())[:-self.keep]:
      logging.info("Deleting the checkpoint at step %d (keep=%d)", old, self.keep)
      self.manager.delete(old)

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

  def param_shapes(self, step: int, which: str = "ema_params") -> dict[str, tuple[int, ...]]:
    """{"module/.../kernel": shape} of `which` as stored at `step` (metadata only, no arrays)."""
    metadata = self.manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)[which]
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}

  def wait(self) -> None:
    """Waits for a save in flight; raises CheckpointError if it failed."""
    self.check(wait=True)

  def close(self) -> None:
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # else: the failure `check` already reported, raised again
        raise


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
  """ShapeDtypeStructs with shardings: the target a restore lays arrays out on. `shardings` is
  a tree like `tree`, or one sharding for every leaf."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
