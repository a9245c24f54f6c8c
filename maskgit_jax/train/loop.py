"""The training loop both stages share.

A stage supplies pure functions (init, train step) and host-side hooks
(data iterator, evaluation); this loop owns everything else: mesh and
shardings, the jitted step with the state donated, resuming from the newest
checkpoint, periodic checkpoints, metrics, the progress bar and evaluation.
Re-running the same command on the same workdir resumes where it stopped.
"""

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from maskgit_jax import checkpoints
from maskgit_jax import parallel
from maskgit_jax import sharding
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.train import metrics_writer


@dataclasses.dataclass
class Stage:
  """What a stage gives the loop.

  init_state: rng -> train state (pure; jitted with shardings by the loop).
  train_step: (state, global batch, constants) -> (state, metrics) (pure).
  make_iterator: () -> iterator of host-local numpy batches with
    get_state/set_state (grain), so checkpoints hold the data position.
  evaluate: (state, step) -> scalars; may write images into the workdir.
  summarize: host-side reduction of a window of per-step metrics (numpy)
    into scalars; by default the mean of every scalar metric.
  constants: frozen arrays every step needs (e.g. LPIPS weights), passed
    to train_step as its third argument, replicated, never checkpointed.
  """
  init_state: Callable[[jax.Array], Any]
  train_step: Callable[[Any, Dict[str, jax.Array], Any], Any]
  make_iterator: Callable[[], Iterator[Dict[str, np.ndarray]]]
  evaluate: Optional[Callable[[Any, int], Dict[str, float]]] = None
  summarize: Optional[Callable[[List[Dict[str, np.ndarray]]],
                               Dict[str, float]]] = None
  constants: Any = None


def mean_scalars(window: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  keys = [k for k, v in window[0].items() if np.ndim(v) == 0]
  return {k: float(np.mean([m[k] for m in window])) for k in keys}


class NonFiniteLossError(FloatingPointError):
  pass


def announce(message: str) -> None:
  """A line for the user on process 0 (logging is kept at WARNING)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class PreemptionFlag:
  """Records SIGTERM (a preemption notice) instead of dying at once, so the
  loop can checkpoint the current step first. Main thread only."""

  def __init__(self):
    self.signal = None
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._record)

  def _record(self, signum, frame):
    del frame
    self.signal = signum

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _skipped(metrics: Dict[str, Any]) -> bool:
  """Whether the step that reported `metrics` dropped its update."""
  return float(np.asarray(metrics.get("skipped_updates", 0.0))) >= 1.0


def check_finite(window: List[Dict[str, Any]], first_step: int,
                 skip: bool = False) -> None:
  """Raises NonFiniteLossError naming the first step of `window` (one entry
  per step, the first being `first_step`) with a non-finite scalar metric.

  With `skip` (on_nonfinite="skip"), steps that dropped their update are
  left out: their metrics are those of the update that never happened.
  """
  for offset, metrics in enumerate(window):
    if skip and _skipped(metrics):
      continue
    bad = {k: float(v) for k, v in metrics.items()
           if np.ndim(v) == 0 and not math.isfinite(float(v))}
    if bad:
      raise NonFiniteLossError(
          f"Non-finite metrics at step {first_step + offset}: {bad}. The last "
          "good checkpoint is kept; lower the learning rate or set "
          "--config.on_nonfinite=skip.")


def summarize_window(window: List[Dict[str, Any]], first_step: int,
                     summarize: Callable[[List[Dict[str, Any]]],
                                         Dict[str, float]],
                     skip: bool = False) -> Dict[str, float]:
  """The logged scalars of a window of per-step host metrics, after
  `check_finite`. With `skip`, dropped steps are left out of the averages
  and `skipped_updates` is how many of the window's steps were dropped."""
  check_finite(window, first_step, skip)
  kept = [m for m in window if not (skip and _skipped(m))]
  scalars = summarize(kept) if kept else {}
  if skip:
    scalars["skipped_updates"] = float(len(window) - len(kept))
  bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
  if bad:  # A stage's own summary of finite steps, e.g. a perplexity.
    raise NonFiniteLossError(
        f"Non-finite summary of steps {first_step}-"
        f"{first_step + len(window) - 1}: {bad}.")
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stage: Stage) -> Any:
  """Trains `stage` to config.num_train_steps; returns the final state.

  A full disk stops training with a DiskFullError that names what is safe:
  orbax commits a checkpoint by renaming its finished temporary folder, and
  deletes older ones only after that, so the newest committed one survives.
  """
  try:
    return _train(config, workdir, stage)
  except Exception as error:  # pylint: disable=broad-except
    if checkpoints.disk_full_cause(error) is None:
      raise
    directory = os.fspath(workdir_lib.Workdir(workdir).checkpoints)
    removed = checkpoints.remove_unfinished_saves(directory)
    raise checkpoints.disk_full_error(directory, error, removed) from error


def _train(config: ml_collections.ConfigDict, workdir: str,
           stage: Stage) -> Any:
  mesh = parallel.create_mesh(dict(config.mesh))
  shards = parallel.num_batch_shards(mesh)
  if config.batch_size % shards:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"{shards} data-parallel devices of mesh {dict(mesh.shape)}.")

  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(stage.init_state, rng)
  state_shardings = sharding.state_shardings(
      abstract, mesh, config.get("sharding_rules", ()))
  constants = jax.device_put(stage.constants, parallel.replicated(mesh))

  iterator = stage.make_iterator()
  run = workdir_lib.Workdir(workdir)
  ckpt = run.checkpointer(keep=config.keep_checkpoints)
  restored_step, state = ckpt.restore(
      checkpoints.abstract_like(abstract, state_shardings), iterator,
      set_aside_damaged=True,
      start_fresh_if_unrestorable=bool(
          config.get("start_fresh_if_unrestorable", False)))
  if state is None:  # A fresh run: only now pay for initialisation.
    state = parallel.jit_init(stage.init_state, abstract,
                              out_shardings=state_shardings)(rng)
    start = 0
  else:
    start = int(restored_step)
    announce(f"Resumed {workdir} from step {start}.")

  step_fn = jax.jit(
      stage.train_step,
      in_shardings=(state_shardings, parallel.batch_sharding(mesh),
                    parallel.replicated(mesh)),
      out_shardings=(state_shardings, parallel.replicated(mesh)),
      donate_argnums=0)
  writer = metrics_writer.MetricsWriter(run)
  summarize = stage.summarize or mean_scalars
  skip = config.on_nonfinite == "skip"
  progress = tqdm.tqdm(total=config.num_train_steps, initial=start,
                       disable=jax.process_index() != 0, unit="step",
                       dynamic_ncols=True, desc=os.path.basename(workdir))
  window: List[Dict[str, Any]] = []
  window_start = time.perf_counter()
  step = start
  preempted = PreemptionFlag()
  finished = False
  try:
    while step < config.num_train_steps:
      batch = parallel.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch, constants)
      step += 1
      window.append(metrics)
      progress.update(1)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        scalars = summarize_window(jax.device_get(window),
                                   step - len(window) + 1, summarize, skip)
        elapsed = time.perf_counter() - window_start
        scalars["steps_per_second"] = len(window) / max(elapsed, 1e-9)
        writer.write_scalars(step, scalars)
        progress.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}")
        window, window_start = [], time.perf_counter()
      if (step % config.checkpoint_every_steps == 0 or
          step == config.num_train_steps or preempted.signal):
        if window:  # Never checkpoint a state that came from a bad step.
          check_finite(jax.device_get(window), step - len(window) + 1, skip)
        ckpt.save(step, state, iterator, force=True)
      if preempted.signal:
        ckpt.wait()
        announce(f"Stopped by signal {preempted.signal} at step {step}; the "
                 f"checkpoint is saved in {workdir}. Re-run the same command "
                 "to resume.")
        raise SystemExit(0)
      if stage.evaluate is not None and config.eval_every_steps and (
          step % config.eval_every_steps == 0 or
          step == config.num_train_steps):
        scalars = stage.evaluate(state, step)
        if scalars:
          writer.write_scalars(step, scalars)
    ckpt.wait()  # A failed background save raises here, not after return.
    finished = True
  finally:
    preempted.restore()
    progress.close()
    for close in (ckpt.close, writer.close):
      try:
        close()
      except Exception:  # pylint: disable=broad-except
        if finished:
          raise
        # Already stopping on an error: report that one, not this echo.
        logging.warning("While stopping: %s failed.", close.__qualname__,
                        exc_info=True)
  return state
