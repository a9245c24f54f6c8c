"""Both stages through the real entry points, on tiny configs and data.

The tokenizer is trained once per module (fixture) on a synthetic
Fashion-MNIST-shaped idx dataset; later tests tokenize with it, train the
transformer on its tokens and sample through the Pipeline.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import config_base
from maskgit_jax import parallel
from maskgit_jax import Pipeline
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import jobs
from maskgit_jax.train import restore
from maskgit_jax.train import transformer_stage
from maskgit_jax.train import tokenizer_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 48, 16


def load_config(name, arg="tiny"):
  return config_base.from_file(os.path.join(REPO, "configs", f"{name}.py"),
                               arg)


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def garments(n, seed):
  """Class-dependent stripes plus noise: learnable, like a toy Fashion-MNIST."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 10
  rows = np.arange(28)[None, :, None]
  stripes = ((rows // (labels[:, None, None] % 4 + 2)) % 2) * 200
  images = stripes + rng.integers(0, 40, (n, 28, 28))
  return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("idx"))
  for prefix, (n, seed) in {"train": (NUM_TRAIN, 0),
                            "t10k": (NUM_TEST, 1)}.items():
    images, labels = garments(n, seed)
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return root, str(tmp_path_factory.mktemp("tfds"))


def tokenizer_config(data_dirs):
  config = load_config("vqgan_fashion_mnist")
  config.data.source_dir, config.data.data_dir = data_dirs
  return config


@pytest.fixture(scope="module")
def tokenizer_workdir(data_dirs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vqgan"))
  config = tokenizer_config(data_dirs)
  jobs.run("train", config, workdir)
  jobs.run("tokenize", config, workdir)
  return workdir


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tokenizer_run_writes_metrics_checkpoints_and_images(tokenizer_workdir):
  steps = sorted(int(s) for s in os.listdir(
      os.path.join(tokenizer_workdir, "checkpoints")) if s.isdigit())
  assert steps == [2, 4]
  train_rows = [r for r in read_metrics(tokenizer_workdir) if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for key in ("reconstruction_loss", "perceptual_loss", "codebook_loss",
              "commitment_loss", "entropy_loss", "generator_adversarial_loss",
              "discriminator_loss", "r1_penalty", "psnr", "codebook_usage",
              "codebook_perplexity"):
    assert np.isfinite(train_rows[-1][key]), key
  assert 0 < train_rows[-1]["codebook_usage"] <= 1
  images = os.listdir(os.path.join(tokenizer_workdir, "images"))
  assert "reconstructions_00000004.png" in images
  saved = restore.load_config(tokenizer_workdir)
  assert saved.vqgan.codebook_size == 16 and saved.stage == "tokenizer"
  assert os.listdir(os.path.join(tokenizer_workdir, "tensorboard"))


def test_tokenize_encodes_both_flips(tokenizer_workdir):
  source = tokens_lib.TokenSource(restore.token_dir(tokenizer_workdir))
  assert len(source) == 2 * NUM_TRAIN
  assert source.token_shape == (8, 8)
  assert source.metadata["codebook_size"] == 16
  assert int(np.max(source.tokens)) < 16
  # The second view of each batch is the mirror image: same labels.
  labels = np.asarray(source.labels)
  assert sorted(labels.tolist()) == sorted(
      2 * garments(NUM_TRAIN, 0)[1].tolist())


@pytest.fixture(scope="module")
def transformer_workdir(tokenizer_workdir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("maskgit"))
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  jobs.run("train", config, workdir)
  return workdir


def test_transformer_trains_and_pipeline_generates(tokenizer_workdir,
                                                   transformer_workdir):
  rows = [r for r in read_metrics(transformer_workdir) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(0 <= r["masked_accuracy"] <= 1 for r in rows)
  assert "samples_00000004.png" in os.listdir(
      os.path.join(transformer_workdir, "images"))

  pipe = Pipeline.from_workdirs(tokenizer_workdir, transformer_workdir)
  images = pipe.generate([0, 3, 9], seed=5, num_iter=4)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, pipe.generate([0, 3, 9], seed=5,
                                                      num_iter=4))
  guided = pipe.generate([0, 3, 9], seed=5, num_iter=4, guidance_scale=2.0)
  assert guided.shape == images.shape

  photos = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  indices = pipe.tokenize(photos)
  assert indices.shape == (2, 8, 8) and indices.dtype == np.int32
  back = pipe.detokenize(indices)
  assert back.shape == (2, 32, 32, 3)
  assert back.min() >= 0 and back.max() <= 1
  tokens = np.full((2, 64), -1, np.int32)
  tokens[:, :10] = indices.reshape(2, -1)[:, :10]
  logits = pipe.logits(tokens, [1, 2])
  assert logits.shape == (2, 64, 16) and logits.dtype == np.float32
  with pytest.raises(ValueError, match="class ids"):
    pipe.generate([10])


def test_sample_mode_writes_a_grid(tokenizer_workdir, transformer_workdir):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  path = jobs.run("sample", config, transformer_workdir)
  from PIL import Image
  grid = np.asarray(Image.open(path))
  assert grid.shape[0] > 10 * 32  # one row per class


def final_params(workdir, config, tokenizer_workdir):
  meta = tokens_lib.read_metadata(restore.token_dir(tokenizer_workdir))
  source = tokens_lib.TokenSource(restore.token_dir(tokenizer_workdir))
  model = transformer_stage.build_model(config, meta["codebook_size"],
                                        int(np.prod(source.token_shape)))
  step, state = restore.restore_state(
      workdir, lambda rng: transformer_stage.init_state(
          model, transformer_stage.build_optimizer(config), rng))
  return step, state


def test_resume_continues_exactly(tokenizer_workdir, transformer_workdir,
                                  tmp_path):
  """Drop the last checkpoint and re-run: same final state, bit for bit."""
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  step, reference = final_params(transformer_workdir, config,
                                 tokenizer_workdir)
  assert step == 4
  resumed = str(tmp_path / "resumed")
  shutil.copytree(transformer_workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  jobs.run("train", config, resumed)
  rows = [r for r in read_metrics(resumed) if "loss" in r]
  assert [r["step"] for r in rows] == [3, 4]   # resumed from step 2
  original = {r["step"]: r for r in read_metrics(transformer_workdir)
              if "loss" in r}
  for row in rows:  # the same batches and random masks as the first run
    assert row["loss"] == original[row["step"]]["loss"]
  step, state = final_params(resumed, config, tokenizer_workdir)
  assert step == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def tiny_transformer_setup():
  config = load_config("maskgit_fashion_mnist")
  model = transformer_stage.build_model(config, 16, 16)
  tx = transformer_stage.build_optimizer(config)
  labels = np.arange(8, dtype=np.int32)
  # Each class has its own token pattern: learnable from the class token.
  tokens = (labels[:, None] * 3 + np.arange(16)[None, :] ** 2) % 16
  batch = {"tokens": tokens.astype(np.int32), "label": labels}
  return config, model, tx, batch


def test_transformer_loss_falls_on_a_fixed_batch():
  config, model, tx, batch = tiny_transformer_setup()
  config.transformer.update(hidden_size=64, num_layers=2, num_heads=4,
                            mlp_dim=128, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
  config.label_smoothing = 0.0
  model = transformer_stage.build_model(config, 16, 16)
  tx = transformer_stage.build_optimizer(config)
  state = transformer_stage.init_state(model, tx, jax.random.key(0))
  step = jax.jit(lambda s, b: transformer_stage.train_step(config, model, tx,
                                                           s, b))
  losses = []
  for _ in range(50):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_tokenizer_loss_falls_on_a_fixed_batch(data_dirs):
  config = tokenizer_config(data_dirs)
  config.num_train_steps = 50
  config.optimizer.learning_rate = 3e-3
  model = tokenizer_stage.build_tokenizer(config)
  disc = tokenizer_stage.build_discriminator(config)
  txs = tokenizer_stage.build_optimizers(config)
  state = tokenizer_stage.init_state(config, model, disc, txs,
                                     jax.random.key(0))
  images = garments(8, 3)[0][..., None].repeat(3, -1) / 255.0
  batch = {"image": np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))
                           ).astype(np.float32)}
  step = jax.jit(lambda s, b: tokenizer_stage.train_step(
      config, model, disc, txs, None, s, b))
  losses = []
  for _ in range(50):
    state, metrics = step(state, batch)
    losses.append(float(metrics["reconstruction_loss"]))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_one_and_eight_devices_take_the_same_step():
  config, model, tx, batch = tiny_transformer_setup()
  state = transformer_stage.init_state(model, tx, jax.random.key(0))
  step = lambda s, b: transformer_stage.train_step(config, model, tx, s, b)
  single, single_metrics = jax.jit(step)(state, batch)

  mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
  shardings = parallel.fsdp_sharding(state, mesh, min_size=1)
  assert any(s.spec != jax.sharding.PartitionSpec()
             for s in jax.tree.leaves(shardings))
  sharded_step = jax.jit(
      step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
      out_shardings=(shardings, parallel.replicated(mesh)))
  with jax.set_mesh(mesh):
    sharded, sharded_metrics = sharded_step(
        jax.device_put(state, shardings), parallel.global_batch(batch, mesh))
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params),
                  jax.tree.leaves(single.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_and_eight_devices_take_the_same_tokenizer_step(data_dirs):
  config = tokenizer_config(data_dirs)
  config.losses.perceptual_weight = 0.0
  model = tokenizer_stage.build_tokenizer(config)
  disc = tokenizer_stage.build_discriminator(config)
  txs = tokenizer_stage.build_optimizers(config)
  state = tokenizer_stage.init_state(config, model, disc, txs,
                                     jax.random.key(0))
  state["generator"] = state["generator"].replace(step=jnp.int32(5))  # GAN on
  images = garments(8, 3)[0][..., None].repeat(3, -1) / 255.0
  batch = {"image": np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))
                           ).astype(np.float32)}
  step = lambda s, b: tokenizer_stage.train_step(config, model, disc, txs,
                                                 None, s, b)
  single, single_metrics = jax.jit(step)(state, batch)
  mesh = parallel.create_mesh({"data": 8})
  replicated = parallel.fsdp_sharding(state, mesh)
  sharded, sharded_metrics = jax.jit(
      step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=(replicated, parallel.replicated(mesh)))(
          jax.device_put(state, replicated), parallel.global_batch(batch, mesh))
  for key in ("loss", "discriminator_loss", "r1_penalty"):
    np.testing.assert_allclose(sharded_metrics[key], single_metrics[key],
                               rtol=1e-4, atol=1e-6)
  # Adam's moments hold the gradients. (Its first update is about
  # lr * sign(g), which float noise can flip where g ~ 0, so parameters are
  # compared at the scale of one step.)
  for part in ("generator", "discriminator"):
    for a, b in zip(jax.tree.leaves(sharded[part].opt_state),
                    jax.tree.leaves(single[part].opt_state)):
      # Summation order differs across devices: compare leaf norms.
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-12
    lr = config.optimizer.learning_rate
    for a, b in zip(jax.tree.leaves(sharded[part].params),
                    jax.tree.leaves(single[part].params)):
      np.testing.assert_allclose(a, b, atol=2 * lr)


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "maskgit_jax.main", *args],
                        capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, XLA_FLAGS=""))


def test_cli_missing_token_cache_names_the_command(tmp_path):
  result = run_main("--config=configs/maskgit_fashion_mnist.py:tiny",
                    f"--workdir={tmp_path / 'run'}",
                    f"--config.tokenizer_workdir={tmp_path / 'nothing'}")
  assert result.returncode != 0
  assert "--mode=tokenize" in result.stderr
  assert str(tmp_path / "nothing") in result.stderr


def test_cli_rejects_unknown_override(tmp_path):
  result = run_main("--config=configs/maskgit_fashion_mnist.py:tiny",
                    f"--workdir={tmp_path / 'run'}", "--config.bach_size=3")
  assert result.returncode != 0 and "bach_size" in result.stderr


def test_bad_configs_fail_before_compiling(data_dirs, tmp_path):
  config = tokenizer_config(data_dirs)
  config.data.image_size = 30
  with pytest.raises(ValueError, match="image_size=30"):
    jobs.run("train", config, str(tmp_path / "a"))
  config = load_config("maskgit_fashion_mnist")
  config.mask_schedule = "cosinus"
  with pytest.raises(ValueError, match="cosinus"):
    jobs.run("train", config, str(tmp_path / "b"))


def test_nonfinite_update_is_skipped_when_configured():
  config, model, tx, batch = tiny_transformer_setup()
  config.on_nonfinite = "skip"
  state = transformer_stage.init_state(model, tx, jax.random.key(0))
  poisoned = state.replace(params=jax.tree.map(
      lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
  step = jax.jit(lambda s, b: transformer_stage.train_step(config, model, tx,
                                                           s, b))
  after, metrics = step(poisoned, batch)
  assert float(metrics["skipped_updates"]) == 1.0
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves(after.opt_state),
                  jax.tree.leaves(poisoned.opt_state)):
    np.testing.assert_array_equal(a, b)
  healthy, metrics = step(state, batch)
  assert float(metrics["skipped_updates"]) == 0.0


def test_nonfinite_loss_stops_with_the_step_named(tokenizer_workdir,
                                                  tmp_path):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.optimizer.learning_rate = float("nan")
  from maskgit_jax.train import loop
  with pytest.raises(loop.NonFiniteLossError, match="step 2"):
    jobs.run("train", config, str(tmp_path / "nan"))
  assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "2")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenizer_workdir,
                                                      tmp_path):
  import signal
  import time
  workdir = tmp_path / "preempted"
  process = subprocess.Popen(
      [sys.executable, "-m", "maskgit_jax.main",
       "--config=configs/maskgit_fashion_mnist.py:tiny",
       f"--workdir={workdir}", f"--config.tokenizer_workdir={tokenizer_workdir}",
       "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
       "--config.eval_every_steps=100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, XLA_FLAGS=""))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  assert "Re-run the same command" in stderr
  saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(
    damage, tokenizer_workdir, transformer_workdir, tmp_path, caplog):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  _, reference = final_params(transformer_workdir, config, tokenizer_workdir)
  workdir = str(tmp_path / "damaged")
  shutil.copytree(transformer_workdir, workdir)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  damaged = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name.startswith(("manifest", "_METADATA")):
        if damage == "remove":
          os.remove(os.path.join(root, name))
        else:
          with open(os.path.join(root, name), "r+b") as f:
            f.truncate(7)
        damaged += 1
  assert damaged
  with caplog.at_level("WARNING"):
    jobs.run("train", config, workdir)
  assert "checkpoints/4 could not be restored" in caplog.text
  rows = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert rows == [3, 4]  # resumed from step 2
  aside = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  assert len(aside) == 1 and aside[0].startswith("4-")
  _, state = final_params(workdir, config, tokenizer_workdir)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def run_to_completion(args, workdir):
  result = subprocess.run(
      [sys.executable, "-m", "maskgit_jax.main", *args,
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]


def kill_after_step(args, workdir, step):
  """Starts a run and SIGKILLs it once `step` is logged."""
  import signal
  import time
  process = subprocess.Popen(
      [sys.executable, "-m", "maskgit_jax.main", *args,
       f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, env=dict(os.environ, XLA_FLAGS=""))
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= step:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()


def restored_leaves(workdir, init_state):
  step, state = restore.restore_state(workdir, init_state)
  return step, jax.tree.leaves(state)


@pytest.mark.parametrize("stage", ["tokenizer", "transformer"])
def test_kill_9_then_rerun_is_bitwise_identical(stage, data_dirs,
                                                tokenizer_workdir, tmp_path):
  if stage == "tokenizer":
    config = tokenizer_config(data_dirs)
    config.losses.perceptual_weight = 0.0  # saves compiling VGG three times
    args = ["--config=configs/vqgan_fashion_mnist.py:tiny",
            f"--config.data.source_dir={data_dirs[0]}",
            f"--config.data.data_dir={data_dirs[1]}",
            "--config.losses.perceptual_weight=0"]
  else:
    config = load_config("maskgit_fashion_mnist")
    config.tokenizer_workdir = tokenizer_workdir
    args = ["--config=configs/maskgit_fashion_mnist.py:tiny",
            f"--config.tokenizer_workdir={tokenizer_workdir}"]
  args += ["--config.num_train_steps=40", "--config.checkpoint_every_steps=4",
           "--config.eval_every_steps=40"]
  config.num_train_steps = 40
  reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
  run_to_completion(args, reference)
  kill_after_step(args, interrupted, step=5)
  logged = len(open(interrupted / "metrics.jsonl").readlines())
  assert 5 <= logged < 40, "the run was not interrupted part-way"
  run_to_completion(args, interrupted)

  if stage == "tokenizer":
    model = tokenizer_stage.build_tokenizer(config)
    disc = tokenizer_stage.build_discriminator(config)
    init = lambda rng: tokenizer_stage.init_state(
        config, model, disc, tokenizer_stage.build_optimizers(config), rng)
  else:
    source = tokens_lib.TokenSource(restore.token_dir(tokenizer_workdir))
    model = transformer_stage.build_model(
        config, source.metadata["codebook_size"],
        int(np.prod(source.token_shape)))
    init = lambda rng: transformer_stage.init_state(
        model, transformer_stage.build_optimizer(config), rng)
  step_a, want = restored_leaves(str(reference), init)
  step_b, got = restored_leaves(str(interrupted), init)
  assert step_a == step_b == 40
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def kill_during_a_save(args, workdir):
  """Starts a run and SIGKILLs it while a checkpoint is being written.
  Returns whether it caught a save in progress."""
  import signal
  import time
  from maskgit_jax import checkpoints
  process = subprocess.Popen(
      [sys.executable, "-m", "maskgit_jax.main", *args,
       f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, env=dict(os.environ, XLA_FLAGS=""))
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  caught = False
  while time.time() < deadline and process.poll() is None and not caught:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    caught = any(checkpoints.UNFINISHED_MARK in name for name in names)
    if caught:
      process.send_signal(signal.SIGKILL)
    else:
      time.sleep(0.001)
  process.kill()
  process.wait()
  return caught


def test_kill_9_during_a_save_then_rerun_is_bitwise_identical(
    tokenizer_workdir, tmp_path):
  args = ["--config=configs/maskgit_fashion_mnist.py:tiny",
          f"--config.tokenizer_workdir={tokenizer_workdir}",
          "--config.num_train_steps=12", "--config.checkpoint_every_steps=1",
          "--config.eval_every_steps=12"]
  run_to_completion(args, tmp_path / "reference")
  for attempt in range(3):  # a save lasts tens of milliseconds
    interrupted = tmp_path / f"interrupted{attempt}"
    if kill_during_a_save(args, interrupted):
      break
  else:
    pytest.fail("never caught a checkpoint save in progress")
  run_to_completion(args, interrupted)

  config = load_config("maskgit_fashion_mnist")
  source = tokens_lib.TokenSource(restore.token_dir(tokenizer_workdir))
  model = transformer_stage.build_model(
      config, source.metadata["codebook_size"],
      int(np.prod(source.token_shape)))
  init = lambda rng: transformer_stage.init_state(
      model, transformer_stage.build_optimizer(config), rng)
  step_a, want = restored_leaves(str(tmp_path / "reference"), init)
  step_b, got = restored_leaves(str(interrupted), init)
  assert step_a == step_b == 12
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_codebook_is_an_error_and_kept(
    tokenizer_workdir, transformer_workdir, tmp_path):
  from maskgit_jax import checkpoints
  other_tokenizer = tmp_path / "tokenizer_with_32_codes"
  shutil.copytree(tokenizer_workdir, other_tokenizer)
  meta_path = other_tokenizer / "tokens" / "train" / "metadata.json"
  meta = json.loads(meta_path.read_text())
  meta["metadata"]["codebook_size"] = 32
  meta_path.write_text(json.dumps(meta))
  workdir = tmp_path / "run"
  shutil.copytree(transformer_workdir, workdir)
  before = file_bytes(workdir / "checkpoints")

  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = str(other_tokenizer)
  config.num_train_steps = 6
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"params/token_embedding: \(27, 16\) in the "
                           r"checkpoint, \(43, 16\) now"):
    jobs.run("train", config, str(workdir))
  assert file_bytes(workdir / "checkpoints") == before
  assert not os.path.exists(workdir / "checkpoints_damaged")


def test_more_bad_configs_fail_before_compiling(data_dirs, tokenizer_workdir,
                                                tmp_path):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.batch_size = 12   # 8 fake devices
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8"):
    jobs.run("train", config, str(tmp_path / "a"))
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.num_classes = 5
  with pytest.raises(ValueError, match="10 classes but config.num_classes=5"):
    jobs.run("train", config, str(tmp_path / "b"))
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.optimizer.name = "sgdx"
  with pytest.raises(ValueError, match="'sgdx'.*adamw"):
    jobs.run("train", config, str(tmp_path / "c"))
  config = tokenizer_config(data_dirs)
  config.data.name = "no_such_dataset"
  with pytest.raises(ValueError, match="no_such_dataset"):
    jobs.run("train", config, str(tmp_path / "d"))
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = str(tmp_path / "empty")
  os.makedirs(config.tokenizer_workdir)
  with pytest.raises(FileNotFoundError, match="--mode=tokenize"):
    jobs.run("train", config, str(tmp_path / "e"))


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (needs root, as on the CI machines); unmounted after."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                            str(mount_point)], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(path, leave_bytes):
  """Fills the filesystem of `path` with one file, leaving `leave_bytes`."""
  filler = os.path.join(path, "filler")
  free = shutil.disk_usage(path).free - leave_bytes
  with open(filler, "wb") as f:
    f.write(b"\0" * max(free, 0))
  return filler


def file_bytes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


def test_full_disk_fails_clearly_and_keeps_the_last_checkpoint(
    tokenizer_workdir, small_disk):
  workdir = small_disk / "run"
  args = ["--config=configs/maskgit_fashion_mnist.py:tiny",
          f"--config.tokenizer_workdir={tokenizer_workdir}",
          "--config.eval_every_steps=1000"]
  run_to_completion(args + ["--config.num_train_steps=2"], workdir)
  checkpoint_dir = workdir / "checkpoints"
  saved = file_bytes(checkpoint_dir / "2")
  # Room for the metrics lines, not for another checkpoint (about 250 KB).
  filler = fill_disk(small_disk, leave_bytes=64 * 1024)

  failed = run_main(*args, "--config.num_train_steps=6",
                    f"--workdir={workdir}")
  assert failed.returncode == 1, failed.stderr[-3000:]
  # Orbax's save threads print their own tracebacks, possibly after ours.
  messages = [line for line in failed.stderr.splitlines()
              if line.startswith("Error: No space left on the device")]
  assert len(messages) == 1, failed.stderr[-3000:]
  message = messages[0]
  assert f"step 2 in {checkpoint_dir}, is intact" in message
  assert "re-run the same command" in message
  # The committed checkpoint is byte-for-byte what it was; the unfinished
  # save is gone, so its space is free again.
  assert sorted(os.listdir(checkpoint_dir)) == ["2"]
  assert file_bytes(checkpoint_dir / "2") == saved

  os.remove(filler)
  resumed = run_main(*args, "--config.num_train_steps=6",
                     f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "from step 2" in resumed.stderr
  assert 6 in [int(s) for s in os.listdir(checkpoint_dir) if s.isdigit()]


def image_folder_args(root, data_dir, skip):
  return ["--config=configs/vqgan_fashion_mnist.py:tiny",
          "--config.data.name=image_folder", f"--config.data.source_dir={root}",
          f"--config.data.data_dir={data_dir}", "--config.data.eval_split=train",
          f"--config.data.skip_corrupt_images={skip}",
          "--config.losses.perceptual_weight=0", "--config.num_train_steps=2",
          "--config.eval_every_steps=2"]


def test_training_skips_or_fails_on_corrupt_images(tmp_path):
  import PIL.Image
  root = tmp_path / "shapes"
  rng = np.random.default_rng(0)
  for label in ("circles", "squares"):
    (root / label).mkdir(parents=True)
    for i in range(6):
      PIL.Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                          ).save(root / label / f"{i}.png")
  (root / "squares" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")

  run = lambda skip, name: run_main(
      *image_folder_args(root, tmp_path / f"tfds_{name}", skip),
      f"--workdir={tmp_path / name}")
  strict = run(False, "strict")
  assert strict.returncode != 0
  assert "broken.jpg" in strict.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "strict" / "checkpoints" / "2")

  skipping = run(True, "skipping")
  assert skipping.returncode == 0, skipping.stderr[-3000:]
  assert "Skipping unreadable image" in skipping.stderr
  assert str(root / "squares" / "broken.jpg") in skipping.stderr
  assert "Skipped 1 unreadable image(s) of 13" in skipping.stderr
  assert os.path.isdir(tmp_path / "skipping" / "checkpoints" / "2")
