"""A toy `loop.Stage` (linear regression) for testing the training loop.

Params {"w": [in_dim, 1], "b": [1]}, Adam, an MSE step with a little
per-step noise drawn from the state's RNG (so a resume must restore the step
and the RNG), and a grain iterator over a small in-memory source (so a resume
must restore the data position). Hooks for fault tests live in
`config.toy`: poison the loss at one step, send SIGTERM while fetching a
given batch, or sleep per batch so a subprocess can be killed mid-run.

Run as a script it trains a workdir, for tests that need a separate process:

  python tests/toy_stage.py WORKDIR NUM_TRAIN_STEPS [STEP_SLEEP_SECONDS]

or is one of two processes of a job on localhost (`two_process_resume`):

  python tests/toy_stage.py --process=I --port=PORT WORKDIR DAMAGE
"""

import os
import signal
import sys
import time

if __name__ == "__main__":  # Before jax is imported: the tests' 8 devices
  # (2 per process in a job of two).
  _DEVICES = 2 if sys.argv[1].startswith("--process=") else 8
  if "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{_DEVICES}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maskgit_jax.data import input_pipeline
from maskgit_jax.train import loop
from maskgit_jax.train import state as state_lib


def make_config(**overrides) -> ml_collections.ConfigDict:
  """The keys the loop reads, plus `toy` (model size and fault hooks)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.batch_size = 16
  c.num_train_steps = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 1000
  c.keep_checkpoints = 3
  c.ema_decay = 0.9
  c.learning_rate = 0.05
  c.on_nonfinite = "error"
  c.start_fresh_if_unrestorable = False
  c.toy = ml_collections.ConfigDict(dict(
      in_dim=4,
      num_records=64,
      data_seed=1234,       # the records' values (not their order)
      nan_at_step=0,        # > 0: the loss (and gradients) of that step is NaN
      sigterm_at_batch=0,   # > 0: SIGTERM to this process while fetching it
      step_sleep=0.0,       # seconds per batch (to kill a subprocess mid-run)
  ))
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return c


class ToySource:
  """Random-access records {"x": float32 [in_dim], "y": float32 [1]}."""

  def __init__(self, num_records: int, in_dim: int, seed: int = 1234):
    rng = np.random.default_rng(seed)
    self.num_records, self.in_dim, self.seed = num_records, in_dim, seed
    self.x = rng.normal(size=(num_records, in_dim)).astype(np.float32)
    w = rng.normal(size=(in_dim, 1)).astype(np.float32)
    self.y = (self.x @ w + 0.5).astype(np.float32)

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    return {"x": self.x[index], "y": self.y[index]}

  def __repr__(self):  # grain compares it with the one in a checkpoint
    return (f"ToySource(num_records={self.num_records}, in_dim={self.in_dim},"
            f" seed={self.seed})")


class HookedIterator:
  """A grain iterator with the fault hooks; counts the batches it gives.

  Delegates get_state/set_state/start_prefetch, so it checkpoints like the
  grain iterator it wraps."""

  def __init__(self, inner, sigterm_at_batch: int = 0, sleep: float = 0.0):
    self._inner = inner
    self._sigterm_at = sigterm_at_batch
    self._sleep = sleep
    self.batches = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.batches += 1
    if self._sigterm_at and self.batches == self._sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    if self._sleep:
      time.sleep(self._sleep)
    return next(self._inner)

  def __getattr__(self, name):
    return getattr(self._inner, name)


def make_stage(config: ml_collections.ConfigDict, evaluate=None,
               iterators=None) -> loop.Stage:
  """The toy stage; every iterator made is appended to `iterators`."""
  toy = config.toy
  tx = optax.adam(config.learning_rate)

  def init_state(rng):
    init_rng, run_rng = jax.random.split(rng)
    params = {"w": 0.1 * jax.random.normal(init_rng, (toy.in_dim, 1)),
              "b": jnp.zeros((1,), jnp.float32)}
    return state_lib.TrainState.create(params, tx,
                                       jax.random.key_data(run_rng))

  def train_step(state, batch, constants):
    del constants
    rng = state_lib.step_rng(state.rng, state.step)
    target = batch["y"] + 0.01 * jax.random.normal(rng, batch["y"].shape)
    poison = jnp.where(state.step + 1 == toy.nan_at_step, jnp.nan, 1.0)

    def loss_fn(params):
      prediction = batch["x"] @ params["w"] + params["b"]
      return jnp.mean((prediction - target) ** 2) * poison

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = state.apply_gradients(grads, tx, config.ema_decay)
    skipped = jnp.zeros((), jnp.float32)
    if config.on_nonfinite == "skip":  # as the real stages do
      new_state, skipped = state_lib.keep_if_finite(loss, grads, new_state,
                                                    state)
    return new_state, {"loss": loss, "skipped_updates": skipped}

  def make_iterator():
    source = ToySource(toy.num_records, toy.in_dim, toy.data_seed)
    loader = input_pipeline.make_loader(
        source, [], global_batch_size=config.batch_size, seed=config.seed,
        shuffle=True, num_epochs=None, drop_remainder=True, read_threads=1,
        prefetch_buffer_size=4)
    iterator = HookedIterator(iter(loader), toy.sigterm_at_batch,
                              toy.step_sleep)
    if iterators is not None:
      iterators.append(iterator)
    return iterator

  return loop.Stage(init_state=init_state, train_step=train_step,
                    make_iterator=make_iterator, evaluate=evaluate)


def state_arrays(state) -> dict:
  """{leaf path: numpy array} of a train state, for exact comparisons and
  np.savez."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def train(workdir: str, **overrides):
  """Trains (or resumes) the toy stage in `workdir`; returns the state."""
  config = make_config(**overrides)
  return loop.train_and_evaluate(config, workdir, make_stage(config))


def two_process_resume(process_id: int, port: int, workdir: str,
                       damage: str) -> None:
  """One of two processes: trains `workdir` to step 4 (checkpoints 2, 4),
  then process 0 removes the file `damage` of checkpoint 4 (e.g. process
  1's data position, which only process 1 reads) and both re-run. Prints
  `RESULT {json}`: the step each restore returned and a digest of the final
  state, which the test compares across the processes."""
  import json  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils
  from maskgit_jax import checkpoints
  from maskgit_jax import workdir as workdir_lib
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  restored = []
  restore = checkpoints.Checkpointer.restore

  def recording_restore(self, *args, **kwargs):
    result = restore(self, *args, **kwargs)
    restored.append(result[0])
    return result

  checkpoints.Checkpointer.restore = recording_restore
  digest = lambda state: {
      jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)).tolist()
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  uninterrupted = digest(train(workdir, num_train_steps=4,
                               keep_checkpoints=10))
  multihost_utils.sync_global_devices("toy:trained")
  if process_id == 0:
    os.remove(os.path.join(workdir, "checkpoints", "4", damage))
  multihost_utils.sync_global_devices("toy:damaged")
  resumed = digest(train(workdir, num_train_steps=4, keep_checkpoints=10))
  # What inference reads (EMA weights onto a device of this process).
  abstract = jax.eval_shape(make_stage(make_config()).init_state,
                            jax.random.key(0)).ema_params
  ema_step, _ = workdir_lib.Workdir(workdir).restore_ema_params(
      abstract, "transformer")
  print("RESULT " + json.dumps({
      "process": process_id, "restored": restored, "ema_step": ema_step,
      "uninterrupted": uninterrupted, "resumed": resumed}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[1].startswith("--process="):
    two_process_resume(int(sys.argv[1].split("=")[1]),
                       int(sys.argv[2].split("=")[1]), sys.argv[3],
                       sys.argv[4])
    sys.exit(0)
  workdir, steps = sys.argv[1], int(sys.argv[2])
  sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  train(workdir, num_train_steps=steps, **{"toy.step_sleep": sleep})
