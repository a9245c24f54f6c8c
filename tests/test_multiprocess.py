"""Several processes train like one: 2 local processes x 2 CPU devices
against 1 process x 4 devices, same global batch, through the real entry
point; checkpoints move between the two layouts; only process 0 writes the
run's shared files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (REPO, TOKENIZER_CONFIG, TRANSFORMER_CONFIG, free_port,
                     one_device_env)

pytestmark = pytest.mark.slow  # whole training jobs in several processes


def run_job(args, processes, devices, timeout=420):
  """`python -m maskgit_jax.main ARGS` as `processes` processes with
  `devices` CPU devices each; fails the test when one fails."""
  env = one_device_env()
  env["XLA_FLAGS"] = (env["XLA_FLAGS"] +
                      f" --xla_force_host_platform_device_count={devices}")
  command = [sys.executable, "-m", "maskgit_jax.main", *args]
  port = free_port()
  children = [subprocess.Popen(
      command, cwd=REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=env if processes == 1 else dict(
          env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
      for i in range(processes)]
  try:
    outputs = [child.communicate(timeout=timeout) for child in children]
  finally:
    for child in children:
      child.kill()
  for child, (_, err) in zip(children, outputs):
    assert child.returncode == 0, err[-3000:]
  return outputs


def ema_params(workdir, stage, tokenizer_workdir):
  """The run's EMA parameters (what inference reads)."""
  from maskgit_jax import workdir as workdir_lib
  if stage == "tokenizer":
    return workdir_lib.Workdir(workdir).load_tokenizer()[2]
  tokenizer_run = workdir_lib.Workdir(tokenizer_workdir)
  config, model, _ = tokenizer_run.load_tokenizer()
  h, w = tokenizer_run.token_shape(config, model.downsample_factor)
  return workdir_lib.Workdir(workdir).load_transformer(
      model.codebook_size, h * w)[2]


def assert_trees_close(a, b):
  import jax
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5,
                               atol=2e-6)


def logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f
            if "loss" in json.loads(line)]


# Reconstruction and sample grids have nothing to do with processes (each
# process would compile their programs too).
NO_EVALUATION = "--config.eval_every_steps=0"


def tokenizer_args(data_dirs):
  """The tiny tokenizer run with L2 and the quantizer losses (as the demo
  trains): LPIPS's VGG16 and the GAN compile in every process and have
  nothing to do with processes."""
  return [f"--config={TOKENIZER_CONFIG}",
          f"--config.data.source_dir={data_dirs[0]}",
          f"--config.data.data_dir={data_dirs[1]}",
          "--config.losses.perceptual_weight=0.0",
          "--config.losses.generator_adversarial_weight=0.0",
          NO_EVALUATION]


def test_two_process_tokenizer_trains_like_one(tokenizer_run, data_dirs,
                                               tmp_path):
  one, two = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  args = tokenizer_args(data_dirs)
  run_job([*args, f"--workdir={one}", "--config.num_train_steps=2"], 1, 4)
  run_job([*args, f"--workdir={two}", "--config.num_train_steps=2"], 2, 2)
  assert_trees_close(ema_params(two, "tokenizer", None),
                     ema_params(one, "tokenizer", None))
  assert logged_steps(two) == [1, 2]  # only process 0 logged
  assert not os.path.exists(os.path.join(two, "images"))  # no evaluation


def test_two_process_transformer_trains_like_one_and_swaps_checkpoints(
    tokenizer_workdir, tmp_path):
  args = [f"--config={TRANSFORMER_CONFIG}",
          f"--config.tokenizer_workdir={tokenizer_workdir}", NO_EVALUATION]
  params = lambda workdir: ema_params(workdir, "transformer",
                                      tokenizer_workdir)
  one, two = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  run_job([*args, f"--workdir={one}", "--config.num_train_steps=2"], 1, 4)
  run_job([*args, f"--workdir={two}", "--config.num_train_steps=2"], 2, 2)
  assert_trees_close(params(two), params(one))
  # Only process 0 wrote the logs: one row per step, one event file.
  assert logged_steps(two) == [1, 2]
  assert len(os.listdir(os.path.join(two, "tensorboard"))) == 1
  # Each run resumes in the other layout (the data continues after the
  # checkpoint's global batches) and they stay together.
  run_job([*args, f"--workdir={one}", "--config.num_train_steps=4"], 2, 2)
  run_job([*args, f"--workdir={two}", "--config.num_train_steps=4"], 1, 4)
  assert_trees_close(params(two), params(one))
  assert logged_steps(one) == logged_steps(two) == [1, 2, 3, 4]
