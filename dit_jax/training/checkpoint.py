"""Orbax checkpoints of the whole train state together with the data pipeline's position.

A step is written into a temporary directory and renamed when complete (orbax's atomic finalize),
so a save interrupted by a crash or SIGKILL leaves no step directory and is never restored; stale
temporary directories are removed when the manager opens. Saves are asynchronous: the arrays are
copied to host memory before `save` returns, the file writes continue in the background, so the
next train step may donate the state's buffers.
"""
import pathlib
import shutil
from typing import Any, Optional

import jax
from absl import logging
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from dit_jax import errors


class Checkpointer:
  """Keep-N asynchronous checkpoints of {state, data} under `directory`."""

  def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    if not read_only:
      remove_partial_saves(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep if max_to_keep > 0 else None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    """The newest completely written step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Starts saving (async); `data_state` is JSON (e.g. the pipeline's next step and seed)."""
    if step in self._manager.all_steps():
      return False
    # Refused up front (one line naming the folder and its free space), not half-written by
    # orbax's background threads into a cascade of tracebacks; earlier checkpoints stay intact.
    errors.check_free_space(self.directory, state_bytes(state) * 1.05 + 2**20)
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: Optional[int], abstract_state: Any) -> tuple:
    """(state, data_state) of `step` (default latest), laid out as `abstract_state` says.

    abstract_state: a tree of jax.ShapeDtypeStruct with shardings; they may describe a different
    mesh than the one that saved, orbax reshards on load.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_newest_readable(self, abstract_state: Any) -> tuple:
    """(step, state, data_state) of the newest checkpoint that reads back. One that does not (a
    disk fault, a file truncated outside orbax's atomic save) is moved to `<directory>.corrupt/`,
    kept for inspection and out of the manager's way, and the one before it is restored. (A
    changed config never gets here: fingerprint.check_same_config refuses it first.)"""
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        if jax.process_count() > 1:  # the hosts would disagree on the step to fall back to
          raise
        aside = self.directory.with_name(self.directory.name + ".corrupt") / str(step)
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(aside))
        self._manager.reload()
        logging.warning("checkpoint %d in %s does not read back (%s: %s); moved to %s, "
                        "falling back to the one before", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", aside)
    raise ValueError(f"no checkpoint in {self.directory} reads back (tried steps {steps}; moved to "
                     f"{self.directory.name}.corrupt/); use a new workdir or delete them")

  def restore_data_state(self, step: Optional[int] = None) -> dict:
    """Only the JSON part of a checkpoint (no arrays are read)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

  def wait(self) -> None:
    """Blocks until the background writes are finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


TMP_MARKER = ".orbax-checkpoint-tmp"


def state_bytes(state) -> float:
  """The bytes this process writes for `state`: its arrays' global sizes over the processes."""
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) / jax.process_count()


def remove_partial_saves(directory) -> list:
  """Deletes step directories an interrupted save left behind (process 0; others wait)."""
  directory = pathlib.Path(directory)
  removed = []
  if jax.process_index() == 0 and directory.is_dir():
    for p in directory.iterdir():
      if TMP_MARKER in p.name:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dit_jax.training.checkpoint.remove_partial_saves")
  return removed


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
