"""Training checkpoints with orbax.

Each step directory holds four items, so a reader can take only what it needs:
  params       the model parameters (StandardSave: sharded arrays, restorable onto any mesh)
  train_state  {"opt_state", "step", "rng"}
  data         the data iterator's state as JSON, written once: it is the same in every process
               (see `jaxllm.data.pipeline`), so any number of processes can resume from it
orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never damages an earlier checkpoint; `keep` bounds how many are kept.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be restored into the requested structure; message says why."""


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores TrainState dicts (see `jaxllm.train.step`) under `directory`."""

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, read_only=False):
    # Readers only restore; orbax's own read_only mode logs three warnings per open.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=False)
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "train_state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: dict[str, Any], data_iterator=None) -> int:
    step = int(jax.device_get(state["step"]))
    items = {
        "params": ocp.args.StandardSave(state["params"]),
        # opt_state, step, rng (and the loss scale of a float16 run)
        "train_state": ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
    }
    if data_iterator is not None:
      items["data"] = ocp.args.JsonSave(json.loads(data_iterator.get_state()))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()
    return step

  def save_params(self, step: int, params) -> None:
    """Parameters alone (converted or exported models, which have no optimizer state)."""
    self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                       force=True)
    self._manager.wait_until_finished()

  def restore(self, abstract_state: dict[str, Any], data_iterator=None,
              step: int | None = None) -> dict[str, Any]:
    """Restores into the shapes/dtypes/shardings of `abstract_state` (arrays or ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    abstract_state = _abstract(abstract_state)
    items = {
        "params": ocp.args.StandardRestore(abstract_state["params"]),
        "train_state": ocp.args.StandardRestore({k: v for k, v in abstract_state.items()
                                                 if k != "params"}),
    }
    legacy_data = self._legacy_data_state(step)
    if data_iterator is not None and legacy_data is None:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this "
                            f"model/optimizer: {str(e).splitlines()[0][:300]}") from None
    if data_iterator is not None:
      data_iterator.set_state(legacy_data if legacy_data is not None
                              else json.dumps(restored["data"]).encode())
    return {"params": restored["params"], **restored["train_state"]}

  def _legacy_data_state(self, step: int) -> bytes | None:
    """Checkpoints written before 2026-11-22 kept grain's per-process files; read process 0's."""
    data_dir = os.path.join(self.directory, str(step), "data")
    legacy = [f for f in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
              if f.startswith("process_0-of-")]
    if not legacy:
      return None
    with open(os.path.join(data_dir, legacy[0]), "rb") as f:
      return f.read()

  def restore_params(self, abstract_params, step: int | None = None):
    """Only the parameters (for inference), into `abstract_params`' shapes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(abstract_params))))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this "
                            f"model: {str(e).splitlines()[0][:300]}") from None
    return restored["params"]

  def close(self) -> None:
    self._manager.close()
