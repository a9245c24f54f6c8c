"""What `Checkpointer.restore` counts as damage (issue 14), on real files.

A toy checkpoint is damaged the ways a kill, a full disk or bit rot leave
one (truncated, emptied, removed or corrupted files), and each must be
recognised as damage by `checkpoint_damage.is_damage`, with a reason naming the
evidence; errors that say nothing about the stored bytes (memory, timeouts,
object-store or sharding errors) must not. The verdicts of several
processes are combined by `Checkpointer._act_on`, tested here with made-up
verdicts; tests/test_loop.py runs two real processes.
"""

import errno
import os
import re
import shutil

import jax
import numpy as np
import pytest

import toy_stage as toy
from maskgit_jax import checkpoint_damage
from maskgit_jax import checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy workdir with checkpoints 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  toy.train(workdir, num_train_steps=4, keep_checkpoints=10)
  return workdir


def restore(workdir, iterator=None, **kwargs):
  """Checkpointer.restore of the toy state and data position of `workdir`
  (into `iterator`, default a new one) onto one device; returns the
  restored step."""
  config = toy.make_config()
  stage = toy.make_stage(config)
  abstract = jax.eval_shape(stage.init_state, jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpoints.abstract_like(
      abstract, jax.tree.map(lambda _: device, abstract))
  ckpt = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), async_save=False,
      damaged_directory=os.path.join(workdir, "checkpoints_damaged"))
  try:
    return ckpt.restore(abstract, iterator or stage.make_iterator(),
                        **kwargs)[0]
  finally:
    ckpt.close()


def first_file(folder):
  return os.path.join(folder, sorted(os.listdir(folder))[0])


def truncate(path, size=None):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def flip_bytes(path):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def remove(path):
  (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


# (damage, path in checkpoint 4, the reason reported): what orbax,
# tensorstore and grain raise for each is in checkpoint_damage.is_damage.
DAMAGE = {
    "truncated-manifest": (truncate, "state/manifest.ocdbt",
                           "DATA_LOSS: .*Error decoding manifest"),
    "empty-manifest": (lambda p: truncate(p, 0), "state/manifest.ocdbt",
                       "state/manifest.ocdbt is empty"),
    "removed-manifest": (remove, "state/manifest.ocdbt",
                         "state/manifest.ocdbt is missing"),
    "truncated-metadata": (truncate, "state/_METADATA",
                           "unreadable JSON metadata"),
    "empty-metadata": (lambda p: truncate(p, 0), "state/_METADATA",
                       "state/_METADATA is empty"),
    "removed-metadata": (remove, "state/_METADATA",
                         "state/_METADATA is missing"),
    "removed-arrays": (remove, "state/d", "NOT_FOUND: "),
    "truncated-array-file": (lambda p: truncate(first_file(p)), "state/d",
                             "OUT_OF_RANGE: .*byte range"),
    "corrupt-array-file": (lambda p: flip_bytes(first_file(p)), "state/d",
                           "DATA_LOSS: .*checksum"),
    "removed-state": (remove, "state", "state/ is missing"),
    "removed-data-position": (remove, "data/process_0-of-1.json",
                              "data/process_0-of-1.json is missing"),
    "truncated-data-position": (truncate, "data/process_0-of-1.json",
                                "unreadable JSON metadata"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_recognised_and_falls_back(trained, tmp_path, caplog,
                                             kind):
  """Each damage of the newest checkpoint is reported with its evidence and
  the older one is restored; without set_aside_damaged nothing moves."""
  damage, path, reason = DAMAGE[kind]
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  damage(os.path.join(workdir, "checkpoints", "4", path))
  with caplog.at_level("WARNING"):
    assert restore(workdir) == 2
  assert "checkpoints/4 could not be restored (" in caplog.text
  assert re.search(reason, caplog.text), caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4"]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


@pytest.mark.parametrize("error", [
    MemoryError("Out of memory while restoring"),
    TimeoutError("read timed out"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    ConnectionResetError("reset by peer"),
    ValueError("UNAVAILABLE: Error reading gs://bucket/ckpt/4/state: 503"),
    ValueError("DEADLINE_EXCEEDED: Error reading local file"),
    ValueError("If the Array has no addressable shards, `dtype` must be "
               "provided via the `dtype` argument"),
    ValueError("OUT_OF_RANGE: Index 5 is outside valid range [0, 4)"),
    FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere/x.json"),
    TypeError("unsupported operand"),
], ids=["memory", "timeout", "etimedout", "connection", "unavailable",
        "deadline", "no-addressable-shards", "index-out-of-range",
        "file-outside-checkpoint", "programming"])
def test_other_errors_are_not_damage(trained, error):
  assert checkpoint_damage.is_damage(
      error, os.path.join(trained, "checkpoints", "4")) is None


def test_memory_error_is_not_damage_even_with_a_file_missing(trained,
                                                             tmp_path):
  """Evidence against damage wins: a MemoryError (wrapped or not) stops the
  run even where a file is also missing; a re-run with memory to spare
  will find the damage."""
  checkpoint = str(tmp_path / "4")
  shutil.copytree(os.path.join(trained, "checkpoints", "4"), checkpoint)
  os.remove(os.path.join(checkpoint, "state", "_METADATA"))
  assert checkpoint_damage.is_damage(ValueError("x"), checkpoint) == (
      "state/_METADATA is missing")
  wrapped = ValueError("DATA_LOSS: something")
  wrapped.__cause__ = MemoryError()
  assert checkpoint_damage.is_damage(wrapped, checkpoint) is None
  assert checkpoint_damage.is_damage(MemoryError(), checkpoint) is None


def test_a_missing_data_position_is_no_damage_when_not_read(trained,
                                                            tmp_path):
  """Restoring only the state (inference) ignores the data position."""
  checkpoint = str(tmp_path / "4")
  shutil.copytree(os.path.join(trained, "checkpoints", "4"), checkpoint)
  os.remove(os.path.join(checkpoint, "data", "process_0-of-1.json"))
  error = ValueError("a sharding error")
  assert checkpoint_damage.is_damage(error, checkpoint) == (
      "data/process_0-of-1.json is missing")
  assert checkpoint_damage.is_damage(error, checkpoint,
                               items=(checkpoints.STATE,)) is None


def _as_two_processes(workdir):
  """Rewrites the data positions as if 2 processes had written them."""
  for step in ("2", "4"):
    data = os.path.join(workdir, "checkpoints", step, "data")
    os.rename(os.path.join(data, "process_0-of-1.json"),
              os.path.join(data, "process_0-of-2.json"))
    shutil.copy(os.path.join(data, "process_0-of-2.json"),
                os.path.join(data, "process_1-of-2.json"))


def assert_continues_after(iterator, stage, num_batches):
  """`iterator`'s next batch is batch num_batches + 1 of a new stream."""
  uninterrupted = stage.make_iterator()
  for _ in range(num_batches):
    next(uninterrupted)
  np.testing.assert_array_equal(next(iterator)["x"],
                                next(uninterrupted)["x"])


def test_data_position_of_the_old_index_sampler_is_carried_over(trained,
                                                                 tmp_path):
  """Runs checkpointed before the global-batch sampler (grain's
  IndexSampler) resume: the stream continues after the step's batches."""
  import json
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  for step in ("2", "4"):
    path = os.path.join(workdir, "checkpoints", step, "data",
                        "process_0-of-1.json")
    with open(path) as f:
      state = json.load(f)
    state["sampler"] = ("IndexSampler(num_records=64, shard_options="
                        "ShardOptions(shard_index=0, shard_count=1, "
                        "drop_remainder=True), shuffle=True, "
                        "num_epochs=None, seed=0)")
    with open(path, "w") as f:
      json.dump(state, f)
  stage = toy.make_stage(toy.make_config())
  iterator = stage.make_iterator()
  assert restore(workdir, iterator) == 4
  assert_continues_after(iterator, stage, 4)


class _NoSeek:
  """An iterator that cannot be moved to a global batch."""

  def __init__(self, inner):
    self._inner = inner

  def __next__(self):
    return next(self._inner)

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def test_data_position_of_another_process_count_is_carried_over(trained,
                                                                tmp_path):
  """Positions saved by 2 processes, restored by 1: the training stream's
  position is a count of global batches, so it continues after step 4's
  batches exactly as an uninterrupted stream would."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  _as_two_processes(workdir)
  stage = toy.make_stage(toy.make_config())
  iterator = stage.make_iterator()
  assert restore(workdir, iterator) == 4
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match="data position of 2 processes; this run has 1"):
    restore(workdir, _NoSeek(stage.make_iterator()))
  assert_continues_after(iterator, stage, 4)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4"]



def test_a_requested_step_that_is_damaged_is_an_error(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  os.remove(os.path.join(workdir, "checkpoints", "4", "state", "_METADATA"))
  with pytest.raises(checkpoints.UnrestorableCheckpointsError,
                     match=r"checkpoints/4: state/_METADATA is missing"):
    restore(workdir, step=4)


# ----------------------------------------------- agreement of processes


def test_agree_gathers_this_process_verdict():
  """The collective every process reaches once per checkpoint tried; with
  one process it returns that process's verdict (reasons cut at 512
  bytes)."""
  assert checkpoints.agree(checkpoints.DAMAGED, "state/ is missing ü") == [
      (checkpoints.DAMAGED, "state/ is missing ü")]
  assert checkpoints.agree(checkpoints.OK) == [(checkpoints.OK, "")]
  [(verdict, reason)] = checkpoints.agree(checkpoints.FAILED, "x" * 2000)
  assert verdict == checkpoints.FAILED and reason == "x" * 512


@pytest.fixture
def checkpointer(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"),
                                  async_save=False)
  yield ckpt
  ckpt.close()


def test_verdicts_of_two_processes(checkpointer):
  """Damage seen by one process only (its own data position) is damage for
  the job; any other failure on any process stops every process naming
  that process; all OK restores."""
  ok, damaged = (checkpoints.OK, ""), (checkpoints.DAMAGED, "state/ gone")
  act = lambda *verdicts: checkpointer._act_on(8, list(verdicts), None)
  assert act(ok, ok) is None
  assert act(ok, damaged) == "state/ gone"
  assert act(damaged, damaged) == "state/ gone (on 2 processes)"
  with pytest.raises(checkpoints.CheckpointRestoreError,
                     match=r"checkpoints/8 could not be restored \(process "
                           r"1\): MemoryError: oom\. This is not damage"):
    act(damaged, (checkpoints.FAILED, "MemoryError: oom"))
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"\(process 0\): Sampler in checkpoint"):
    act((checkpoints.INCOMPATIBLE, "Sampler in checkpoint does not match"),
        ok)


def test_replicated_arrays_large_and_small_round_trip(tmp_path):
  """On 8 devices an array replicated with at least
  MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL per replica is written in slices by
  every replica, a smaller one whole by one replica: both read back equal,
  as does a sharded one."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh,
                                       jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  large_rows = 8 * checkpoints.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL // (4 * 64)
  state = {
      "large": jax.device_put(
          rng.standard_normal((large_rows, 64), np.float32), replicated),
      "small": jax.device_put(rng.standard_normal((3, 5), np.float32),
                              replicated),
      "sharded": jax.device_put(rng.standard_normal((16, 4), np.float32),
                                sharded),
      "step": jax.device_put(np.int32(7), replicated),
  }
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"),
                                  async_save=False)
  try:
    ckpt.save(1, state)
    ckpt.manager.wait_until_finished()
    abstract = checkpoints.abstract_like(
        jax.eval_shape(lambda: state),
        jax.tree.map(lambda x: x.sharding, state))
    step, restored = ckpt.restore(abstract)
  finally:
    ckpt.close()
  assert step == 1
  for key, value in state.items():
    np.testing.assert_array_equal(np.asarray(restored[key]),
                                  np.asarray(value), err_msg=key)
    assert restored[key].sharding == value.sharding, key
