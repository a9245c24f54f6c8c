"""--mode=tokenize as a job of several processes (localhost, gloo) or
devices: each process encodes its share of the records and process 0 joins
the parts into the one cache, which must be the very files a single process
writes from the same workdir.

The job reads 47 of the tiny dataset's 48 training images: shares of 24 and
23 (an uneven split, which grain's own sharding would cut to 23 each), in
encoder calls of 3 images x 2 views, so the last call of each is short.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import helpers
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import token_cache
from maskgit_jax.train import tokenizer_stage

SPLIT, NUM_IMAGES = "train[:47]", 47


def test_record_ranges_cover_every_record_once_in_order():
  for total in range(1, 12):
    for count in range(1, min(total, 5) + 1):
      ranges = [token_cache.record_range(total, p, count)
                for p in range(count)]
      assert [r for part in ranges for r in part] == list(range(total))
      sizes = [len(part) for part in ranges]
      assert max(sizes) - min(sizes) <= 1, (total, count, sizes)
  assert token_cache.record_range(47, 1, 2) == range(24, 47)
  with pytest.raises(ValueError, match="3 records cannot be shared by 4"):
    token_cache.record_range(3, 0, 4)
  with pytest.raises(ValueError, match="process_index=2"):
    token_cache.record_range(10, 2, 2)


def copy_workdir(src, dst):
  """The trained tokenizer workdir without its token cache (nor what other
  tests may be writing there meanwhile: eval results, images)."""
  shutil.copytree(src, dst, ignore=lambda folder, names: (
      ["tokens", "eval", "images"] if os.path.samefile(folder, src) else []))
  return str(dst)


def tokenize_args(workdir, data_dirs, batch_size=6):
  return [f"--config={helpers.TOKENIZER_CONFIG}", f"--workdir={workdir}",
          "--mode=tokenize", f"--config.data.source_dir={data_dirs[0]}",
          f"--config.data.data_dir={data_dirs[1]}",
          f"--config.data.train_split={SPLIT}",
          f"--config.tokenize.batch_size={batch_size}"]


def run_job(args, num_processes=2, timeout=300):
  """`python -m maskgit_jax.main ARGS` as one job of `num_processes` on one
  CPU device each; returns each one's stderr (a failure fails the test)."""
  port = helpers.free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "maskgit_jax.main", *args], cwd=helpers.REPO,
      env=dict(helpers.one_device_env(), JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(num_processes)]
  try:
    errors = [process.communicate(timeout=timeout)[1]
              for process in processes]
  finally:
    for process in processes:
      process.kill()
  for i, (process, err) in enumerate(zip(processes, errors)):
    assert process.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return errors


def cache_dir(workdir):
  return os.fspath(workdir_lib.Workdir(workdir).token_cache)


@pytest.fixture(scope="module")
def single_process_cache(tokenizer_workdir, data_dirs, tmp_path_factory):
  """The cache one process writes for the job's settings."""
  workdir = copy_workdir(tokenizer_workdir,
                         tmp_path_factory.mktemp("tokenize") / "single")
  result = helpers.run_main(*tokenize_args(workdir, data_dirs))
  assert result.returncode == 0, result.stderr[-3000:]
  return cache_dir(workdir)


def assert_same_cache(got, want):
  """Byte for byte (tokens.npy, labels.npy, metadata.json), and as arrays."""
  assert sorted(os.listdir(got)) == sorted(os.listdir(want)) == sorted(
      [tokens_lib.TOKENS_FILE, tokens_lib.LABELS_FILE,
       tokens_lib.METADATA_FILE])
  got_source, want_source = (tokens_lib.TokenSource(got),
                             tokens_lib.TokenSource(want))
  assert len(want_source) == NUM_IMAGES and want_source.num_views == 2
  assert np.array_equal(got_source.tokens, want_source.tokens)
  assert np.array_equal(got_source.labels, want_source.labels)
  assert got_source.metadata == want_source.metadata
  assert helpers.file_bytes(got) == helpers.file_bytes(want)


@pytest.mark.slow  # two JAX processes, twice: ~30 s
def test_two_processes_write_the_cache_one_process_writes(
    single_process_cache, tokenizer_workdir, data_dirs, tmp_path):
  workdir = copy_workdir(tokenizer_workdir, tmp_path / "job")
  out = cache_dir(workdir)
  parts = token_cache.parts_dir(out)
  # Parts an interrupted run (of 4 processes) left behind are replaced.
  for stale in ("00000-of-00004", "00001-of-00002"):
    os.makedirs(os.path.join(parts, stale))
    with open(os.path.join(parts, stale, "junk"), "w") as f:
      f.write("x")
  errors = run_job(tokenize_args(workdir, data_dirs))
  assert_same_cache(out, single_process_cache)
  assert os.listdir(os.path.dirname(out)) == ["train"]  # No parts, no tmp.
  assert errors[0].count(f"Wrote {NUM_IMAGES} x 2 token grids") == 1
  assert "Wrote" not in errors[1]  # Process 0 alone reports.

  # Run again, every process finds the cache and leaves it as it is.
  before = helpers.file_bytes(out)
  errors = run_job(tokenize_args(workdir, data_dirs))
  assert "exists; nothing to do" in errors[0]
  assert helpers.file_bytes(out) == before
  assert os.listdir(os.path.dirname(out)) == ["train"]


@pytest.mark.slow  # restores the tokenizer, encodes 47 images
def test_encoder_batches_are_split_over_local_devices(
    single_process_cache, tokenizer_workdir, data_dirs, tmp_path,
    monkeypatch):
  """In this process (8 fake CPU devices) every encoder call is spread over
  all of them, and the cache is still the single-device one."""
  workdir = copy_workdir(tokenizer_workdir, tmp_path / "run")
  config = helpers.tokenizer_config(data_dirs)
  config.data.train_split = SPLIT
  config.tokenize.batch_size = 16  # 8 images x 2 views: 2 per device.
  devices_used = []
  write = token_cache.write_token_cache

  def watched_write(config, encode, out_dir, codebook_size):
    def watched_encode(images):
      indices = encode(images)
      devices_used.append(len(indices.sharding.device_set))
      return indices
    return write(config, watched_encode, out_dir, codebook_size)

  monkeypatch.setattr(token_cache, "write_token_cache", watched_write)
  out = tokenizer_stage.tokenize_mode(config, workdir)
  assert devices_used == [8] * 6  # ceil(47 / 8) calls
  assert_same_cache(out, single_process_cache)
