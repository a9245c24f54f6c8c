"""Checkpoints: orbax CheckpointManager over the train state and data state.

A checkpoint holds two items: `state` (the train-state pytree: parameters,
optimizer state, EMA, step, RNG) and `data` (the grain iterator position, one
file per process). Saves are asynchronous for the arrays; orbax writes into a
temporary folder and renames it when complete, so an interrupted save is
never mistaken for a checkpoint. Only the newest `keep` are kept, and an
older one is deleted only after a newer one is committed. A save that fails
for lack of space therefore leaves every committed checkpoint as it was;
the loop removes the unfinished folder and says so.
"""

import errno
import logging
import os
import shutil
import time
from typing import Any, Optional, Tuple

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"
UNFINISHED_MARK = ".orbax-checkpoint-tmp"


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint that does not fit this run's config (another model
  size, codebook, class count or dataset): an error, never set aside."""


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def shape_mismatches(stored: Any, wanted: Any) -> list:
  """'name: stored shape vs wanted shape' for leaves both trees hold."""
  shapes = lambda tree: {
      _leaf_name(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
      if hasattr(leaf, "shape")}
  stored, wanted = shapes(stored), shapes(wanted)
  return [f"{name}: {stored[name]} in the checkpoint, {shape} now"
          for name, shape in wanted.items()
          if name in stored and stored[name] != shape]


def _is_data_mismatch(error: BaseException) -> bool:
  """grain refuses a saved position that belongs to another dataset."""
  return "DataSource in checkpoint does not match" in str(error)


class DiskFullError(RuntimeError):
  """The disk filled up while training wrote checkpoints or metrics."""


def disk_full_cause(error: BaseException) -> Optional[BaseException]:
  """The out-of-space error behind `error`, if any (else None).

  Orbax re-raises failures of its background save thread, so the cause is
  often several links down the chain; tensorstore reports it as a ValueError
  whose text carries the OS message rather than as an OSError.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error
    if os.strerror(errno.ENOSPC) in str(error):
      return error
    error = error.__cause__ or error.__context__
  return None


def remove_unfinished_saves(directory: str) -> list:
  """Deletes the temporary folders of saves that never completed.

  They are not checkpoints (orbax never restores them), and on a full disk
  they hold the space a re-run needs. Committed checkpoints are untouched.
  """
  removed = []
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return removed
  for name in sorted(os.listdir(directory)):
    if UNFINISHED_MARK in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      removed.append(name)
  return removed


def disk_full_error(directory: str, error: BaseException,
                    removed: list) -> DiskFullError:
  """A DiskFullError that says what is safe, what was `removed` (unfinished
  saves) and how to go on."""
  committed = sorted(int(name) for name in os.listdir(directory)
                     if name.isdigit()) if os.path.isdir(directory) else []
  where = getattr(disk_full_cause(error), "filename", None) or directory
  if committed:
    kept = (f"The newest complete checkpoint, step {committed[-1]} in "
            f"{directory}, is intact")
  else:
    kept = f"No checkpoint had been completed yet in {directory}"
  unfinished = (f"; the unfinished save ({', '.join(removed)}) was removed"
                if removed else "")
  return DiskFullError(
      f"No space left on the device while writing {where}. {kept}"
      f"{unfinished}. Free some space (or move the workdir) and re-run the "
      "same command to resume.")


_KEEP_ADVICE = ("The checkpoints are left as they are. Resume with the config "
                "(and tokenizer workdir) they were trained with, or start a "
                "new --workdir.")


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None,
           force: bool = False) -> bool:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: Optional[int] = None,
              set_aside_damaged: bool = False) -> Tuple[Optional[int], Any]:
    """Restores the newest readable checkpoint (or `step`).

    A checkpoint that fails to load (damaged or missing files) is reported by
    a warning naming it, and the next older one is tried. A readable one
    written for another config raises IncompatibleCheckpointError and
    nothing is moved. Returns (step, state), or (None, None) when there is
    nothing to restore.
    With `set_aside_damaged` (training), an unreadable checkpoint is moved to
    `<directory>_damaged/` so that its step can be written again.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    for candidate in steps:
      self._check_compatible(candidate, abstract_state)
      items = {STATE: ocp.args.StandardRestore(abstract_state)}
      # Imported weights (tools/import_official) carry no data position:
      # such a run starts its data from the beginning.
      if data_iterator is not None and self._has_data(candidate):
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(candidate,
                                        args=ocp.args.Composite(**items))
      except Exception as error:  # pylint: disable=broad-except
        if _is_data_mismatch(error):
          raise IncompatibleCheckpointError(
              f"Checkpoint {self.directory}/{candidate} holds a data position "
              f"in another dataset ({error}). {_KEEP_ADVICE}") from error
        logging.warning("Checkpoint %s/%d could not be restored (%s: %s); "
                        "trying an older one.", self.directory, candidate,
                        type(error).__name__, error)
        if set_aside_damaged:
          self._set_aside(candidate)
        continue
      return candidate, restored[STATE]
    return None, None

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    try:
      stored = self.manager.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except
      return  # Unreadable metadata: the restore reports it as damaged.
    mismatches = shape_mismatches(stored, abstract_state)
    if mismatches:
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} was written for another "
          f"config: {'; '.join(mismatches[:4])}. {_KEEP_ADVICE}")

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint out of the way (never deletes it), so
    training can write that step again."""
    source = os.path.join(self.directory, str(step))
    target_dir = self.directory.rstrip("/") + "_damaged"
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    if not os.path.isdir(source):
      return
    os.makedirs(target_dir, exist_ok=True)
    os.rename(source, target)
    self.manager.reload()
    logging.warning("Moved the unreadable checkpoint %s to %s.", source,
                    target)

  def _has_data(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), DATA))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, for restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)
