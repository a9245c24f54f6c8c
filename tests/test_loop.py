"""The training loop's fault handling, on a toy linear-regression stage.

Resume, kill -9, SIGTERM, damaged or unfinished checkpoints, restore errors
that are not damage, non-finite losses, a full disk and incompatible
checkpoints, each in seconds: the loop runs in-process (one test needs a
subprocess to kill, one two processes of a job) on `toy_stage`, whose state
depends on the step, the RNG and the data position, so any of them restored
wrongly changes the final bits.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
import toy_stage as toy
from helpers import file_bytes
from maskgit_jax import checkpoints
from maskgit_jax.train import loop

TOY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "toy_stage.py")
STEPS = 8  # every run here trains to this step unless it says otherwise


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def checkpoint_arrays(workdir, step=None):
  """(step, {leaf: array}) of a checkpoint (default the newest)."""
  abstract = jax.eval_shape(toy.make_stage(toy.make_config()).init_state,
                            jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpoints.abstract_like(
      abstract, jax.tree.map(lambda _: device, abstract))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  async_save=False)
  try:
    restored_step, state = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  assert state is not None, f"no readable checkpoint in {workdir}"
  return restored_step, toy.state_arrays(state)


def assert_same_arrays(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run to STEPS, every checkpoint (2, 4, 6, 8) kept."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  final = toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10)
  arrays = toy.state_arrays(final)
  assert int(arrays[".step"]) == STEPS
  assert committed_steps(workdir) == [2, 4, 6, 8]
  losses = {row["step"]: row["loss"] for row in read_metrics(workdir)}
  assert sorted(losses) == list(range(1, STEPS + 1))
  return types.SimpleNamespace(workdir=workdir, arrays=arrays, losses=losses)


def copy_of(reference, tmp_path):
  """The reference workdir without its metrics (so a re-run's rows show)."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference.workdir, workdir)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  return workdir


# ------------------------------------------------------------------ resume


def test_resume_is_bitwise_identical_to_one_run(reference, tmp_path, capsys):
  """4 steps, then the same workdir re-run to 8, equals 8 steps in one go:
  params, optimizer state, EMA, step and RNG; the re-run starts at step 5
  with the batches and noise the uninterrupted run drew there."""
  workdir = str(tmp_path / "run")
  toy.train(workdir, num_train_steps=4)
  assert committed_steps(workdir) == [2, 4]
  capsys.readouterr()
  final = toy.train(workdir, num_train_steps=STEPS)
  assert f"Resumed {workdir} from step 4." in capsys.readouterr().err
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
  for row in rows:
    assert row["loss"] == reference.losses[row["step"]], row["step"]
  assert_same_arrays(toy.state_arrays(final), reference.arrays)
  step, saved = checkpoint_arrays(workdir)
  assert step == STEPS
  assert_same_arrays(saved, reference.arrays)


# ------------------------------------------------------- kill -9, SIGTERM


def test_kill_9_then_rerun_is_bitwise_identical(reference, tmp_path, capsys):
  """A process SIGKILLed after its first committed checkpoint, re-run on the
  same workdir, ends with the uninterrupted run's state, bit for bit."""
  workdir = str(tmp_path / "killed")
  process = subprocess.Popen(
      [sys.executable, TOY_SCRIPT, workdir, str(STEPS), "0.25"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 60
  try:
    while time.time() < deadline and process.poll() is None:
      if os.path.isdir(directory) and any(
          n.isdigit() for n in os.listdir(directory)):
        break
      time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  assert process.returncode == -signal.SIGKILL, "it finished before the kill"
  saved = committed_steps(workdir)
  assert saved and saved[-1] < STEPS, saved
  assert len(read_metrics(workdir)) < STEPS, "the run was not cut short"

  capsys.readouterr()
  final = toy.train(workdir, num_train_steps=STEPS)
  assert f"from step {saved[-1]}." in capsys.readouterr().err
  assert_same_arrays(toy.state_arrays(final), reference.arrays)
  assert_same_arrays(checkpoint_arrays(workdir)[1], reference.arrays)


def test_sigterm_saves_the_current_step_and_exits_0(reference, tmp_path,
                                                    capsys):
  """SIGTERM while fetching batch 5: the loop finishes step 5, checkpoints
  it (though no checkpoint is due), exits with SystemExit(0) and restores
  the previous handler; re-running resumes from step 5 to the reference."""
  workdir = str(tmp_path / "preempted")
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    toy.train(workdir, num_train_steps=STEPS, checkpoint_every_steps=1000,
              **{"toy.sigterm_at_batch": 5})
  assert stopped.value.code == 0
  assert signal.getsignal(signal.SIGTERM) is before
  err = capsys.readouterr().err
  assert f"Stopped by signal {int(signal.SIGTERM)} at step 5" in err
  assert "Re-run the same command" in err
  assert committed_steps(workdir) == [5]
  assert [row["step"] for row in read_metrics(workdir)] == [1, 2, 3, 4, 5]
  step, saved = checkpoint_arrays(workdir)
  assert step == 5 and int(saved[".step"]) == 5

  final = toy.train(workdir, num_train_steps=STEPS,
                    checkpoint_every_steps=1000)
  assert f"Resumed {workdir} from step 5." in capsys.readouterr().err
  assert_same_arrays(toy.state_arrays(final), reference.arrays)


# ----------------------------------------------- damaged / unfinished saves


def _damage(checkpoint_dir, how, pattern):
  """Truncates or removes the files under checkpoint_dir matching pattern
  (a relative path; `*` as its last part means every file there)."""
  folder, name = os.path.split(pattern)
  names = (sorted(os.listdir(os.path.join(checkpoint_dir, folder)))
           if name == "*" else [name])
  assert names
  for name in names:
    path = os.path.join(checkpoint_dir, folder, name)
    assert os.path.isfile(path), path
    if how == "remove":
      os.remove(path)
    else:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("how,pattern", [
    ("truncate", "state/manifest.ocdbt"),
    ("truncate", "state/_METADATA"),
    ("remove", "state/d/*"),
    ("remove", "data/process_0-of-1.json"),
], ids=["truncated-manifest", "truncated-metadata", "removed-arrays",
        "removed-data-position"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(
    reference, tmp_path, caplog, how, pattern):
  """An unreadable newest checkpoint (8) is reported, moved (not deleted) to
  checkpoints_damaged/, and training resumes from the previous one (6) to
  the reference state, writing step 8 again."""
  workdir = copy_of(reference, tmp_path)
  newest = os.path.join(workdir, "checkpoints", str(STEPS))
  _damage(newest, how, pattern)
  damaged = file_bytes(newest)
  with caplog.at_level("WARNING"):
    final = toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10)
  assert f"checkpoints/{STEPS} could not be restored" in caplog.text
  assert [row["step"] for row in read_metrics(workdir)] == [7, 8]
  aside_dir = os.path.join(workdir, "checkpoints_damaged")
  aside = os.listdir(aside_dir)
  assert len(aside) == 1 and aside[0].startswith(f"{STEPS}-"), aside
  assert file_bytes(os.path.join(aside_dir, aside[0])) == damaged
  assert committed_steps(workdir) == [2, 4, 6, 8]
  assert_same_arrays(toy.state_arrays(final), reference.arrays)
  assert_same_arrays(checkpoint_arrays(workdir)[1], reference.arrays)


def test_unfinished_save_left_by_a_kill_is_ignored(reference, tmp_path):
  """A temporary folder of a save that never committed (what kill -9 during
  a save leaves) is not a checkpoint: the run resumes from the committed 6,
  writes 8 again and ends bitwise equal to the reference."""
  workdir = copy_of(reference, tmp_path)
  directory = os.path.join(workdir, "checkpoints")
  unfinished = os.path.join(directory,
                            f"{STEPS}{checkpoints.UNFINISHED_MARK}")
  os.rename(os.path.join(directory, str(STEPS)), unfinished)
  _damage(unfinished, "truncate", "state/manifest.ocdbt")
  final = toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10)
  assert [row["step"] for row in read_metrics(workdir)] == [7, 8]
  assert sorted(os.listdir(directory)) == ["2", "4", "6", "8"]
  assert_same_arrays(toy.state_arrays(final), reference.arrays)


# -------------------------------------------------------------- non-finite


@pytest.mark.parametrize("log_every", [1, 5],
                         ids=["logged-step", "checkpoint-guard"])
def test_nonfinite_loss_stops_before_checkpointing_it(reference, tmp_path,
                                                      log_every):
  """on_nonfinite="error", NaN loss at step 3: NonFiniteLossError naming
  step 3, and no checkpoint of a later state. log_every=1: raised when step
  3 is logged. log_every=5: raised by the guard before the step-4
  checkpoint (the window 1-4 holds the NaN), still naming step 3. The kept
  checkpoint 2 is the reference's."""
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteLossError, match="at step 3:"):
    toy.train(workdir, num_train_steps=STEPS, log_every_steps=log_every,
              **{"toy.nan_at_step": 3})
  assert committed_steps(workdir) == [2]
  logged = [row["step"] for row in read_metrics(workdir)]
  assert logged == ([1, 2] if log_every == 1 else [])
  step, saved = checkpoint_arrays(workdir)
  assert step == 2
  assert_same_arrays(saved, checkpoint_arrays(reference.workdir, 2)[1])


def test_nonfinite_update_is_skipped_when_configured(tmp_path):
  """on_nonfinite="skip", NaN loss at step 3: training completes, the step-3
  update is dropped (the state after step 3 equals the one after step 2
  except for the step), params stay finite and one skipped update is
  logged. The NaN loss that step reports is left out of the check."""
  workdir = str(tmp_path / "skip")
  final = toy.train(workdir, num_train_steps=STEPS, on_nonfinite="skip",
                    checkpoint_every_steps=1, keep_checkpoints=10,
                    **{"toy.nan_at_step": 3})
  arrays = toy.state_arrays(final)
  assert int(arrays[".step"]) == STEPS
  assert all(np.all(np.isfinite(a)) for a in arrays.values())
  rows = {row["step"]: row for row in read_metrics(workdir)}
  assert sorted(rows) == list(range(1, STEPS + 1))
  assert [rows[s]["skipped_updates"] for s in sorted(rows)] == [
      1.0 if s == 3 else 0.0 for s in sorted(rows)]
  _, after_2 = checkpoint_arrays(workdir, 2)
  _, after_3 = checkpoint_arrays(workdir, 3)
  assert int(after_3[".step"]) == 3
  del after_2[".step"], after_3[".step"]
  assert_same_arrays(after_3, after_2)


def test_window_leaves_out_skipped_steps():
  """A logging window of steps 11-13 whose step 12 dropped its update: in
  skip mode it is left out of the check and the means, and counted; in
  error mode the NaN stops training naming step 12, not the window's end."""
  window = [{"loss": np.float32(1.0), "skipped_updates": np.float32(0.0)},
            {"loss": np.float32(np.nan), "skipped_updates": np.float32(1.0)},
            {"loss": np.float32(3.0), "skipped_updates": np.float32(0.0)}]
  scalars = loop.summarize_window(window, 11, loop.mean_scalars, skip=True)
  assert scalars == {"loss": 2.0, "skipped_updates": 1.0}
  only_skipped = loop.summarize_window(window[1:2], 12, loop.mean_scalars,
                                       skip=True)
  assert only_skipped == {"skipped_updates": 1.0}
  with pytest.raises(loop.NonFiniteLossError, match="at step 12:"):
    loop.summarize_window(window, 11, loop.mean_scalars, skip=False)
  kept_nan = [dict(window[0], loss=np.float32(np.inf))]
  with pytest.raises(loop.NonFiniteLossError, match="at step 11:"):
    loop.summarize_window(kept_nan, 11, loop.mean_scalars, skip=True)


# --------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (needs root); unmounted after."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                            str(mount_point)], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_names_the_intact_checkpoint_and_resumes(small_disk):
  """The disk fills after checkpoint 2: DiskFullError names step 2 as
  intact, checkpoint 2 is byte-identical, the unfinished save of step 4 is
  removed; after freeing space the re-run resumes from 2 and finishes."""
  workdir = str(small_disk / "run")
  options = {"log_every_steps": 1000, "toy.in_dim": 1024}  # ~100 KB saves
  toy.train(workdir, num_train_steps=2, **options)
  directory = os.path.join(workdir, "checkpoints")
  saved = file_bytes(os.path.join(directory, "2"))
  filler = small_disk / "filler"
  free = shutil.disk_usage(small_disk).free - 16 * 1024
  with open(filler, "wb") as f:
    f.write(b"\0" * free)

  with pytest.raises(checkpoints.DiskFullError) as error:
    toy.train(workdir, num_train_steps=6, **options)
  message = str(error.value)
  assert f"step 2 in {directory}, is intact" in message
  assert f"(4{checkpoints.UNFINISHED_MARK}) was removed" in message
  assert "re-run the same command" in message
  assert sorted(os.listdir(directory)) == ["2"]
  assert file_bytes(os.path.join(directory, "2")) == saved

  os.remove(filler)
  final = toy.train(workdir, num_train_steps=6, **options)
  assert int(np.asarray(final.step)) == 6
  assert committed_steps(workdir) == [2, 4, 6]
  assert [row["step"] for row in read_metrics(workdir)][-1] == 6


# ------------------------------------------------------------ incompatible


@pytest.mark.parametrize("change,match", [
    ({"toy.in_dim": 3},
     r"checkpoints/2 was written for another config: params/w: \(4, 1\) in "
     r"the checkpoint, \(3, 1\) now"),
    # Other records, as many: grain's data-source check.
    ({"toy.data_seed": 99},
     r"checkpoints/2 holds a data position in another dataset"),
    # grain's sampler check: another record count, another shuffle seed.
    ({"toy.num_records": 48},
     r"checkpoints/2 .*data position.*Sampler in checkpoint does not match.*"
     r"num_records=64"),
    ({"seed": 1},
     r"checkpoints/2 .*data position.*Sampler in checkpoint does not match.*"
     r"seed=0"),
], ids=["param-shape", "data-source", "record-count", "shuffle-seed"])
def test_incompatible_checkpoint_is_an_error_and_kept(tmp_path, change,
                                                      match):
  """A readable checkpoint of another model shape, dataset or data order
  raises IncompatibleCheckpointError naming the leaf (or the data position),
  and nothing is moved or changed."""
  workdir = str(tmp_path / "run")
  toy.train(workdir, num_train_steps=2)
  before = file_bytes(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match=match):
    toy.train(workdir, num_train_steps=4, **change)
  assert file_bytes(os.path.join(workdir, "checkpoints")) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


# ------------------------------------------- restore errors that are not damage


@pytest.mark.parametrize("error", [
    MemoryError("RESOURCE_EXHAUSTED: out of memory allocating 12 GiB"),
    TimeoutError("read timed out"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/8: "
               "503 Service Unavailable"),
    ValueError("If the Array has no addressable shards, `dtype` must be "
               "provided via the `dtype` argument"),
], ids=["memory", "timeout", "etimedout", "object-store", "sharding"])
def test_restore_error_that_is_not_damage_stops_and_moves_nothing(
    reference, tmp_path, monkeypatch, error):
  """The restore of the newest checkpoint raises something that says nothing
  about its files: CheckpointRestoreError naming checkpoint 8 and the cause,
  no fallback to 6, nothing moved or written."""
  workdir = copy_of(reference, tmp_path)
  before = file_bytes(os.path.join(workdir, "checkpoints"))
  restore = ocp.PyTreeCheckpointHandler.restore

  def failing_restore(self, directory, *args, **kwargs):
    if os.path.basename(os.path.dirname(os.fspath(directory))) == "8":
      raise error
    return restore(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", failing_restore)
  with pytest.raises(checkpoints.CheckpointRestoreError) as raised:
    toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10)
  message = str(raised.value)
  assert f"checkpoints/{STEPS} could not be restored: " in message
  assert f"{type(error).__name__}: " in message
  assert "nothing was moved" in message
  assert raised.value.__cause__ is error
  assert file_bytes(os.path.join(workdir, "checkpoints")) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_main_exits_nonzero_naming_the_checkpoint(reference, tmp_path,
                                                  monkeypatch):
  """Through the entry point: exit status 1 and one line `Error: ...` that
  names the checkpoint and the MemoryError."""
  from maskgit_jax.train import jobs
  workdir = copy_of(reference, tmp_path)
  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore",
                      lambda *args, **kwargs: (_ for _ in ()).throw(
                          MemoryError("out of memory")))
  monkeypatch.setattr(jobs, "run", lambda mode, config, path: toy.train(
      path, num_train_steps=STEPS))
  code = helpers.main_exit("--config=configs/vqgan_fashion_mnist.py:tiny",
                           f"--workdir={workdir}")
  assert str(code).startswith(
      f"Error: Checkpoint {workdir}/checkpoints/{STEPS} could not be "
      "restored: MemoryError: out of memory.")
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


# ------------------------------------------------ every checkpoint damaged


def _damage_every_checkpoint(workdir):
  for step, (how, pattern) in zip((2, 4, 6, 8), [
      ("truncate", "state/manifest.ocdbt"), ("remove", "state/_METADATA"),
      ("remove", "state/d/*"), ("remove", "data/process_0-of-1.json")]):
    _damage(os.path.join(workdir, "checkpoints", str(step)), how, pattern)


def test_every_checkpoint_damaged_is_an_error_listing_each(reference,
                                                           tmp_path):
  """Never a silent restart from step 0: the error lists each checkpoint and
  its damage, and nothing is moved (a re-run says the same)."""
  workdir = copy_of(reference, tmp_path)
  _damage_every_checkpoint(workdir)
  before = file_bytes(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpoints.UnrestorableCheckpointsError) as raised:
    toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10)
  message = str(raised.value)
  assert "checkpoints/8: data/process_0-of-1.json is missing" in message
  assert "checkpoints/6: NOT_FOUND: " in message
  assert "checkpoints/4: state/_METADATA is missing" in message
  assert "checkpoints/2: DATA_LOSS: " in message
  assert "Nothing was moved" in message
  assert "start_fresh_if_unrestorable" in message
  assert file_bytes(os.path.join(workdir, "checkpoints")) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_every_checkpoint_damaged_starts_fresh_when_configured(reference,
                                                               tmp_path):
  """With start_fresh_if_unrestorable the run trains from step 0 to the
  reference state; the damaged checkpoints are kept, byte for byte, in
  checkpoints_damaged/ (orbax cannot write a step that exists)."""
  workdir = copy_of(reference, tmp_path)
  _damage_every_checkpoint(workdir)
  damaged = {step: file_bytes(os.path.join(workdir, "checkpoints", str(step)))
             for step in (2, 4, 6, 8)}
  final = toy.train(workdir, num_train_steps=STEPS, keep_checkpoints=10,
                    start_fresh_if_unrestorable=True)
  assert [row["step"] for row in read_metrics(workdir)] == list(
      range(1, STEPS + 1))
  assert_same_arrays(toy.state_arrays(final), reference.arrays)
  aside_dir = os.path.join(workdir, "checkpoints_damaged")
  aside = {int(name.split("-")[0]): name for name in os.listdir(aside_dir)}
  assert sorted(aside) == [2, 4, 6, 8]
  for step, name in aside.items():
    assert file_bytes(os.path.join(aside_dir, name)) == damaged[step]
  assert committed_steps(workdir) == [2, 4, 6, 8]


# ------------------------------------------------------------ two processes


def test_two_processes_agree_and_set_aside_once(tmp_path):
  """Two processes of one job on localhost (gloo): after training to step
  4, process 1's data position in checkpoint 4 is removed, which only
  process 1 reads. Both agree checkpoint 4 is damaged, process 0 alone
  moves it (once), both resume from 2 and end with the state of the
  uninterrupted run; both then restore the EMA weights (onto a device of
  their own) for inference."""
  workdir = str(tmp_path / "job")
  port = helpers.free_port()
  results = helpers.run_two_processes(lambda i: [
      sys.executable, TOY_SCRIPT, f"--process={i}", f"--port={port}",
      workdir, "data/process_1-of-2.json"])
  for i in (0, 1):
    assert results[i]["restored"] == [None, 2, 4], i
    assert results[i]["ema_step"] == 4
    assert results[i]["resumed"] == results[i]["uninterrupted"], i
    assert ("checkpoints/4 could not be restored "
            "(data/process_1-of-2.json is missing)") in results[i]["err"]
  assert results[0]["resumed"] == results[1]["resumed"]
  assert results[0]["err"].count("Moved the damaged checkpoint") == 1
  assert "Moved the damaged checkpoint" not in results[1]["err"]
  aside = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  assert len(aside) == 1 and aside[0].startswith("4-"), aside
  assert committed_steps(workdir) == [2, 4]


@pytest.mark.parametrize("eval_every, evaluated", [(2, [2, 4, 5]), (0, [])])
def test_evaluations_every_n_steps_and_at_the_end_or_never(
    tmp_path, eval_every, evaluated):
  """Every `eval_every_steps` and at the last step; 0 turns them off."""
  config = toy.make_config(num_train_steps=5, eval_every_steps=eval_every)
  steps = []
  stage = toy.make_stage(config,
                         evaluate=lambda state, step: steps.append(step))
  loop.train_and_evaluate(config, str(tmp_path), stage)
  assert steps == evaluated


def test_negative_eval_interval_is_refused():
  from maskgit_jax.train import jobs
  config = toy.make_config(eval_every_steps=-1)
  config.stage = "transformer"
  with pytest.raises(ValueError, match=r"eval_every_steps must be >= 0 "
                                       r"\(0: no evaluation while training\), "
                                       r"got -1"):
    jobs.validate(config)
