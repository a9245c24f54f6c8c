"""Checkpoints: orbax CheckpointManager over the train state and data state.

A checkpoint holds two items: `state` (the train-state pytree: parameters,
optimizer state, EMA, step, RNG) and `data` (the grain iterator position, one
file per process). Saves are asynchronous for the arrays; orbax writes into a
temporary folder and renames it when complete, so an interrupted save is
never mistaken for a checkpoint. Only the newest `keep` are kept, and an
older one is deleted only after a newer one is committed. A save that fails
for lack of space therefore leaves every committed checkpoint as it was;
the loop removes the unfinished folder and says so.

Restoring sets a checkpoint aside only on evidence of damage (`checkpoint_damage.is_damage`);
any other failure stops the run naming the checkpoint and the cause, and in
a job of several processes all of them agree on the verdict first.
"""

import errno
import json
import logging
import os
import re
import shutil
import time
from typing import Any, List, Optional, Sequence, Tuple

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from maskgit_jax import checkpoint_damage

STATE, DATA = checkpoint_damage.STATE, checkpoint_damage.DATA
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


class CheckpointRestoreError(RuntimeError):
  """A checkpoint could not be restored for a reason other than damage
  (memory, an I/O timeout, an object-store error, a sharding or programming
  error). Nothing was moved: fix the cause and re-run."""


class UnrestorableCheckpointsError(RuntimeError):
  """Checkpoints exist but every one is damaged: never a silent restart from
  step 0. The message lists each checkpoint and why it failed."""


# Per-process restore verdicts, gathered so that all processes act alike.
OK, DAMAGED, INCOMPATIBLE, FAILED = 0, 1, 2, 3
_REASON_BYTES = 512


def agree(verdict: int, reason: str = "") -> List[Tuple[int, str]]:
  """Every process's (verdict, reason) for the same checkpoint, in process
  order: a collective, so each process must call it once per checkpoint
  tried. With one process it is that process's own."""
  encoded = reason.encode("utf-8")[:_REASON_BYTES]
  row = np.zeros((_REASON_BYTES + 2,), np.int32)
  row[0], row[1] = verdict, len(encoded)
  row[2:2 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(row)).reshape(
      -1, _REASON_BYTES + 2)
  return [(int(r[0]), bytes(r[2:2 + r[1]].astype(np.uint8)).decode(
      "utf-8", "replace")) for r in rows]


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


# Orbax shares the writing of a replicated array between its replicas by
# slicing it, one eager slice per replica, each compiled once per shape and
# process: 160 compiles (6 s) at the tiny tokenizer's first save on 8 CPU
# devices. Worth it only for large arrays; below this many bytes per replica
# one replica writes the whole array, as for an unreplicated one.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _type_handler_registry() -> ocp.type_handlers.TypeHandlerRegistry:
  """The standard handlers, with jax.Array's replica-parallel writing kept
  for arrays of at least MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL per replica."""
  standard = ocp.type_handlers.get_type_handler(jax.Array)
  array_handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=(
          MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL),
      # The per-process array metadata the standard handler also writes.
      array_metadata_store=getattr(standard, "_array_metadata_store", None))
  others = (int, float, bytes, np.number, np.ndarray, str,
            type(ocp.PLACEHOLDER))
  return ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in others],
      (jax.Array, array_handler))


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               damaged_directory: Optional[str] = None):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = directory
    # Where unreadable checkpoints are moved (the workdir names it).
    self.damaged_directory = damaged_directory
    # The PyTree handler (what StandardCheckpointHandler wraps, same files)
    # can also restore a part of the state, e.g. only the EMA weights.
    self._handlers = {STATE: ocp.PyTreeCheckpointHandler(
                          type_handler_registry=_type_handler_registry()),
                      DATA: grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers=self._handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None,
           force: bool = False) -> bool:
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: Optional[int] = None,
              set_aside_damaged: bool = False,
              partial: bool = False,
              start_fresh_if_unrestorable: bool = False,
              ) -> Tuple[Optional[int], Any]:
    """Restores the newest readable checkpoint (or `step`).

    The data position is one grain state per process. When the checkpoint
    was written by another number of processes, an iterator with `seek`
    (input_pipeline.GlobalBatchIterator, whose position means the same for
    any process count) is moved to the checkpoint's step, one global batch
    per step; any other iterator makes that an IncompatibleCheckpointError.
    A seekable iterator is also moved for positions of the IndexSampler
    streams training used before (the run resumes in the new data order).

    A damaged checkpoint (`is_damage`: files missing or truncated, metadata
    unreadable, stored bytes failing their checksum) is reported by a warning
    naming it, and the next older one is tried. Any other failure raises
    CheckpointRestoreError naming the checkpoint and the cause. A readable
    checkpoint written for another config raises
    IncompatibleCheckpointError. With several processes, all of them agree
    on each verdict before acting on it. When checkpoints exist but every
    one is damaged, UnrestorableCheckpointsError lists them. In all these
    errors nothing is moved.
    Returns (step, state), or (None, None) when there is nothing to restore
    (or, with `start_fresh_if_unrestorable`, when nothing could be).
    With `set_aside_damaged` (training), once an older checkpoint restored,
    process 0 moves the damaged newer ones to `damaged_directory` so that
    their steps can be written again; with `start_fresh_if_unrestorable`
    too, all damaged ones are moved and training starts from step 0 (orbax
    refuses to save a step that exists). With `partial`, `abstract_state`
    may name a part of the stored tree (e.g. {"ema_params": ...}) and only
    that part is read.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    damaged = []  # (step, reason), newest first
    # A failed attempt may have moved the iterator already (items are read
    # in turn); a fresh start must begin where the iterator began.
    initial_position = (data_iterator.get_state()
                        if data_iterator is not None and steps else None)
    for candidate in steps:
      seek = self._carry_data_over(candidate, data_iterator)
      self._check_compatible(candidate, abstract_state,
                             with_data=data_iterator is not None and not seek)
      items = {STATE: ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=partial,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_state))}
      # Imported weights (tools/import_official) carry no data position:
      # such a run starts its data from the beginning.
      if (data_iterator is not None and self._has_data(candidate) and
          not seek):
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
      error, restored = None, None
      try:
        restored = self._restore_items(candidate, items)
      except Exception as caught:  # pylint: disable=broad-except
        error = caught
      verdict, reason = self._verdict(candidate, error, tuple(items))
      reason = self._act_on(candidate, agree(verdict, reason), error)
      if reason is None:
        if seek:
          data_iterator.seek(candidate)
          logging.warning("Checkpoint %s/%d was written by another number of "
                          "processes; the data continues after its %d "
                          "global batches.", self.directory, candidate,
                          candidate)
        if set_aside_damaged:
          self._set_aside([s for s, _ in damaged])
        return candidate, restored[STATE]
      logging.warning("Checkpoint %s/%d could not be restored (%s); trying "
                      "an older one.", self.directory, candidate, reason)
      damaged.append((candidate, reason))
    if not damaged:
      return None, None
    listing = "\n".join(f"  {self.directory}/{s}: {r}" for s, r in damaged)
    if start_fresh_if_unrestorable:
      logging.warning("No checkpoint in %s can be restored:\n%s\nStarting "
                      "from step 0 (start_fresh_if_unrestorable).",
                      self.directory, listing)
      if set_aside_damaged:
        self._set_aside([s for s, _ in damaged])
      if initial_position is not None:
        data_iterator.set_state(initial_position)
      return None, None
    raise UnrestorableCheckpointsError(
        f"None of the {len(damaged)} checkpoint(s) in {self.directory} can "
        f"be restored:\n{listing}\nNothing was moved. Restore them from a "
        "backup, start a new --workdir, or set "
        "--config.start_fresh_if_unrestorable=true to move them to "
        f"{self.damaged_directory or 'the damaged folder'} and train from "
        "step 0.")

  def _restore_items(self, step: int, items: dict) -> dict:
    """{item: restored} of `step`, read by the item handlers themselves.

    What manager.restore does, without its closing barrier of all
    processes: a process whose read raised would skip that barrier and leave
    the others in it (or in the next collective). `agree`, which every
    process reaches, takes its place.
    """
    step_dir = epath.Path(self.directory) / str(step)
    return {name: self._handlers[name].restore(step_dir / name,
                                               args=items[name])
            for name in sorted(items)}

  def _verdict(self, step: int, error: Optional[BaseException],
               items: Sequence[str]) -> Tuple[int, str]:
    """This process's (verdict, reason) for restoring `step`."""
    if error is None:
      return OK, ""
    mismatch = checkpoint_damage.data_mismatch(error)
    if mismatch:
      return INCOMPATIBLE, mismatch
    damage = checkpoint_damage.is_damage(
        error, os.path.join(self.directory, str(step)), items)
    if damage:
      return DAMAGED, damage
    cause = checkpoint_damage.short_message(str(error))
    return FAILED, f"{type(error).__name__}: {cause}"

  def _act_on(self, step: int, verdicts: List[Tuple[int, str]],
              error: Optional[BaseException]) -> Optional[str]:
    """None when every process restored `step`; the damage when the
    processes agree it is damaged (no other failure anywhere); otherwise
    raises on every process, naming the process that failed and why."""
    where = f"{self.directory}/{step}"
    worst = max(v for v, _ in verdicts)
    if worst == OK:
      return None
    culprit = next(i for i, (v, _) in enumerate(verdicts) if v == worst)
    reason = verdicts[culprit][1].rstrip(".")
    by = f" (process {culprit})" if len(verdicts) > 1 else ""
    if worst == INCOMPATIBLE:
      raise IncompatibleCheckpointError(
          f"Checkpoint {where} holds a data position in another dataset or "
          f"data order{by}: {reason}. {_KEEP_ADVICE}") from error
    if worst == FAILED:
      raise CheckpointRestoreError(
          f"Checkpoint {where} could not be restored{by}: {reason}. This is "
          "not damage (no missing, truncated or corrupt file was found), so "
          "nothing was moved; fix the cause and re-run the same command to "
          "resume.") from error
    damages = [r for v, r in verdicts if v == DAMAGED]
    return damages[0] + (f" (on {len(damages)} processes)"
                         if len(damages) > 1 else "")

  def _check_compatible(self, step: int, abstract_state: Any,
                        with_data: bool = False) -> None:
    if with_data:
      self._check_process_count(step)
    try:
      stored = self.manager.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except
      return  # Unreadable metadata: the restore reports it as damaged.
    mismatches = shape_mismatches(stored, abstract_state)
    if mismatches:
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} was written for another "
          f"config: {'; '.join(mismatches[:4])}. {_KEEP_ADVICE}")

  def _process_counts(self, step: int) -> set:
    """The process counts of the data positions `step` holds: grain keeps
    one file per process (process_<i>-of-<n>.json)."""
    data = epath.Path(self.directory) / str(step) / DATA
    return {match.group(1) for match in (
        re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name)
        for path in (data.glob("process_*.json") if data.exists() else []))
            if match}

  def _carry_data_over(self, step: int, data_iterator: Any) -> bool:
    """Whether to move a seekable iterator to `step` instead of restoring
    its saved position: saved by another process count, or by the
    IndexSampler training streams used before GlobalBatchSampler (whose
    positions mean nothing to it; such a run resumes in the new order)."""
    if data_iterator is None or not hasattr(data_iterator, "seek"):
      return False
    if not self._same_process_count(step):
      return True
    saved = (epath.Path(self.directory) / str(step) / DATA /
             f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    try:
      sampler = json.loads(saved.read_text()).get("sampler", "")
    except (OSError, ValueError):
      return False  # Missing or unreadable: the restore reports damage.
    return (sampler.startswith("IndexSampler(") and "shuffle=True" in sampler
            and "num_epochs=None" in sampler)

  def _same_process_count(self, step: int) -> bool:
    counts = self._process_counts(step)
    return not counts or str(jax.process_count()) in counts

  def _check_process_count(self, step: int) -> None:
    """A data position saved by another number of processes is not damage:
    without a way to carry it over it is an incompatible checkpoint."""
    counts = self._process_counts(step)
    if counts and str(jax.process_count()) not in counts:
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} holds the data position of "
          f"{'/'.join(sorted(counts))} processes; this run has "
          f"{jax.process_count()}. {_KEEP_ADVICE}")

  def _set_aside(self, steps: Sequence[int]) -> None:
    """Moves damaged checkpoints out of the way (never deletes them), so
    training can write those steps again: on process 0 only, while the
    others wait, then every process sees the new listing."""
    if not steps:
      return
    target_dir = self.damaged_directory
    if target_dir is None:
      raise ValueError("Checkpointer(damaged_directory=None) cannot set "
                       "checkpoints aside; use Workdir.checkpointer().")
    if jax.process_index() == 0:
      for step in steps:
        source = epath.Path(self.directory) / str(step)
        if not source.is_dir():
          continue
        target = epath.Path(target_dir) / f"{step}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        logging.warning("Moved the damaged checkpoint %s to %s.", source,
                        target)
    multihost_utils.sync_global_devices("maskgit_jax:set_aside_damaged")
    self.manager.reload()

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
