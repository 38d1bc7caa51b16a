"""Training checkpoints with orbax.

Each step directory holds four items, so a reader can take only what it needs:
  params       the model parameters (StandardSave: sharded arrays, restorable onto any mesh)
  train_state  {"opt_state", "step", "rng"}
  data         the data iterator's state as JSON, written once: it is the same in every process
               (see `jaxllm.data.pipeline`), so any number of processes can resume from it
orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never damages an earlier checkpoint; `keep` bounds how many are kept. With
`async_save` the write goes on in the background after the arrays are copied to host memory
(the caller may then overwrite or donate them); the next save, `wait` and `close` wait for it.
A newest checkpoint that cannot be read (a truncated file, a disk that filled up) is moved
aside by `restore_newest`, which falls back to the one before, over one or more tiers (a
local directory saved often, the workdir less often).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxllm.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be restored into the requested structure; message says why."""


@contextlib.contextmanager
def _quiet_asyncio():
  """A restore that fails leaves orbax's other reads failing in futures nobody awaits: asyncio
  logs each (a page of tensorstore specs) when it is collected, and tensorstore's callbacks
  raise into the closed event loop as unraisable exceptions. The one-line warning says it
  instead."""
  logger = logging.getLogger("asyncio")
  level, hook = logger.level, sys.unraisablehook
  logger.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    logger.setLevel(level)
    sys.unraisablehook = hook


def _first_line(error: Exception, limit: int) -> str:
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores TrainState dicts (see `jaxllm.train.step`) under `directory`."""

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, read_only=False,
               async_save: bool = False):
    # Readers only restore; orbax's own read_only mode logs three warnings per open.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save)
    self.async_save = async_save
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
    if not self.async_save:
      self._manager.wait_until_finished()
    return step

  def wait(self) -> None:
    """Returns once every save started has been committed."""
    self._manager.wait_until_finished()

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
    try:
      return self._restore(abstract_state, data_iterator, step)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this "
                            f"model/optimizer: {str(e).splitlines()[0][:300]}") from None

  def _restore(self, abstract_state: dict[str, Any], data_iterator, step: int):
    abstract_state = _abstract(abstract_state)
    items = {
        "params": ocp.args.StandardRestore(abstract_state["params"]),
        "train_state": ocp.args.StandardRestore({k: v for k, v in abstract_state.items()
                                                 if k != "params"}),
    }
    legacy_data = self._legacy_data_state(step)
    if data_iterator is not None and legacy_data is None:
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(legacy_data if legacy_data is not None
                              else json.dumps(restored["data"]).encode())
    return {"params": restored["params"], **restored["train_state"]}

  def quarantine(self, step: int) -> str:
    """Moves step `step`'s directory out of the manager's sight (process 0 moves it)."""
    root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    target = os.path.join(root, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(root, f"{step}.{suffix}"), suffix + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxllm:quarantine:{step}")
    self._manager.reload()
    return target

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


def restore_newest(tiers: Sequence[Checkpointer], abstract_state: dict[str, Any],
                   data_iterator=None, warn: Callable[[str], None] = print
                   ) -> tuple[dict[str, Any] | None, int | None, int | None]:
  """(state, step, tier index) from the newest checkpoint of any tier that can be read (at
  the same step, the earlier tier: list the fastest first); (None, None, None) without any.

  A newer checkpoint that fails while an older one restores was damaged after its commit
  (every checkpoint has the same structure): it is moved to its tier's
  `corrupt_checkpoints/` (nothing is deleted) with a one-line warning. When none restores,
  the newest one's error is raised and nothing is moved: the config, not the files, is then
  at fault.
  """
  candidates = sorted(((step, -i) for i, tier in enumerate(tiers) for step in tier.all_steps()),
                      reverse=True)
  failed: list[tuple[int, int, Exception]] = []
  for step, minus_i in candidates:
    tier = tiers[-minus_i]
    try:
      with _quiet_asyncio():
        state = tier._restore(abstract_state, data_iterator, step)
    except Exception as e:  # noqa: BLE001 (a damaged checkpoint fails in many ways)
      failed.append((step, -minus_i, e))
      continue
    for bad, i, error in failed:
      moved = tiers[i].quarantine(bad)
      warn(f"warning: checkpoint step {bad} in {tiers[i].directory} cannot be read "
           f"({_first_line(error, 160)}); moved to {moved}; resuming from step {step}")
    return state, step, -minus_i
  if failed:
    step, i, error = failed[0]
    what = ("does not match this model/optimizer"
            if isinstance(error, (ValueError, KeyError, TypeError)) else "cannot be read")
    raise CheckpointError(f"checkpoint step {step} in {tiers[i].directory} {what}: "
                          f"{_first_line(error, 300)}") from None
  return None, None, None
