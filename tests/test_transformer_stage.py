"""Stage 2, the masked-token transformer: its train step (it learns; one
device or eight; a non-finite update skipped when configured), the model's
link to the tokenizer's codebook, and inference from the trained workdirs
(Pipeline.from_workdirs, --mode=sample).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import file_bytes, initialize, load_config, transformer_config
from maskgit_jax import checkpoints
from maskgit_jax import parallel
from maskgit_jax import Pipeline
from maskgit_jax.models import build
from maskgit_jax.train import jobs
from maskgit_jax.train import transformer_stage


def tiny_transformer_setup(**config_overrides):
  config = load_config("maskgit_fashion_mnist")
  config.update(config_overrides)
  model = build.transformer(config, 16, 16)
  tx = transformer_stage.build_optimizer(config)
  labels = np.arange(8, dtype=np.int32)
  # Each class has its own token pattern: learnable from the class token.
  tokens = (labels[:, None] * 3 + np.arange(16)[None, :] ** 2) % 16
  batch = {"tokens": tokens.astype(np.int32), "label": labels}
  return config, model, tx, batch


def init_state(model, tx):
  return initialize(
      lambda rng: transformer_stage.init_state(model, tx, rng))


@pytest.fixture(scope="module")
def tiny_state():
  """The tiny config's initial train state (initialised once)."""
  _, model, tx, _ = tiny_transformer_setup()
  return init_state(model, tx)


# ---------------------------------------------------------------- the step


@pytest.mark.slow
def train_on_a_fixed_batch(num_steps, **setup):
  """(model, final state, losses, loss dtypes) of a 2-layer transformer
  trained on one fixed batch without dropout or label smoothing."""
  config, _, _, batch = tiny_transformer_setup(**setup)
  config.transformer.update(hidden_size=64, num_layers=2, num_heads=4,
                            mlp_dim=128, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
  config.label_smoothing = 0.0
  model = build.transformer(config, 16, 16)
  tx = transformer_stage.build_optimizer(config)
  state = init_state(model, tx)
  step = jax.jit(lambda s, b: transformer_stage.train_step(config, model, tx,
                                                           s, b))
  losses, dtypes = [], set()
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    dtypes.add(metrics["loss"].dtype)
  return model, state, losses, dtypes


def test_transformer_loss_falls_on_a_fixed_batch():
  _, _, losses, _ = train_on_a_fixed_batch(50)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_logits_are_the_models_over_the_codes(tiny_state, dropout):
  """The train step's logits (the batch in two streams on CPU, the head over
  the codes only) are the whole-vocabulary model's, sliced; with dropout,
  every row draws its own masks, even where two rows are the same."""
  config, _, _, batch = tiny_transformer_setup()
  config.transformer.update(dropout_rate=dropout,
                            attention_dropout_rate=dropout)
  model = build.transformer(config, 16, 16)
  params = tiny_state.params
  inputs = np.concatenate([batch["label"][:, None] + 16, batch["tokens"]], 1)
  inputs = np.concatenate([inputs, inputs])  # rows r and r + 8 are the same
  logits = jax.jit(lambda p, x: transformer_stage.training_logits(
      model, p, x, jax.random.key(3)))(params, inputs)
  assert logits.shape == (16, 17, 16)
  full = jax.jit(model.apply)({"params": params}, inputs)[..., :16]
  if dropout == 0.0:
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
  else:
    assert not np.allclose(logits, full, atol=1e-3)
    for r in range(8):
      assert not np.allclose(logits[r], logits[r + 8], atol=1e-3), r


@pytest.mark.slow
def test_one_and_eight_devices_take_the_same_step(tiny_state):
  config, model, tx, batch = tiny_transformer_setup()
  state = tiny_state
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


def test_nonfinite_update_is_skipped_when_configured(tiny_state):
  config, model, tx, batch = tiny_transformer_setup(on_nonfinite="skip")
  state = tiny_state
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


# ------------------------------------------- the tokenizer's codebook size


@pytest.mark.slow  # reads the session's trained workdirs (conftest.py)
def test_checkpoint_of_another_codebook_is_an_error_and_kept(
    tokenizer_workdir, transformer_workdir, tmp_path):
  """The token embedding's shape follows the tokenizer's codebook (+ the
  classes and the mask token): resuming a run on a tokenizer of 32 codes
  names the leaf and both shapes, and leaves the checkpoints alone."""
  # Copies without what other tests may be writing meanwhile (the shared
  # workdirs' eval results and sample grids).
  other_files = shutil.ignore_patterns("eval", "images")
  other_tokenizer = tmp_path / "tokenizer_with_32_codes"
  shutil.copytree(tokenizer_workdir, other_tokenizer, ignore=other_files)
  meta_path = other_tokenizer / "tokens" / "train" / "metadata.json"
  meta = json.loads(meta_path.read_text())
  meta["metadata"]["codebook_size"] = 32
  meta_path.write_text(json.dumps(meta))
  workdir = tmp_path / "run"
  shutil.copytree(transformer_workdir, workdir, ignore=other_files)
  before = file_bytes(workdir / "checkpoints")

  config = transformer_config(str(other_tokenizer))
  config.num_train_steps = 6
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r"params/token_embedding: \(27, 16\) in the "
                           r"checkpoint, \(43, 16\) now"):
    jobs.run("train", config, str(workdir))
  assert file_bytes(workdir / "checkpoints") == before
  assert not os.path.exists(workdir / "checkpoints_damaged")


# ------------------------------------------- inference from the workdirs


@pytest.fixture(scope="module")
def pipe(tokenizer_workdir, transformer_workdir):
  return Pipeline.from_workdirs(tokenizer_workdir, transformer_workdir)


@pytest.mark.slow  # reads the session's trained workdirs (conftest.py)
def test_pipeline_from_workdirs_generates_tokenizes_and_scores(pipe):
  # All 10 classes, 4 iterations: the program --mode=sample runs (below).
  classes = list(range(10))
  images = pipe.generate(classes, seed=5, num_iter=4)
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, pipe.generate(classes, seed=5,
                                                      num_iter=4))
  guided = pipe.generate(classes, seed=5, num_iter=4, guidance_scale=2.0)
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


@pytest.mark.slow  # reads the session's trained workdirs (conftest.py)
def test_sample_mode_writes_a_grid(pipe, tokenizer_workdir,
                                   transformer_workdir):
  del pipe  # compiled the same sampler already
  config = transformer_config(tokenizer_workdir)
  path = jobs.run("sample", config, transformer_workdir)
  from PIL import Image
  grid = np.asarray(Image.open(path))
  assert grid.shape[0] > 10 * 32  # one row per class


# ------------------------------------------------- gradient accumulation


def accumulation_setup(label_smoothing=0.0):
  """Batch 16, no dropout (so micro-batches draw nothing of their own) and
  no warm-up (so the first step moves the parameters)."""
  config = load_config("maskgit_fashion_mnist")
  config.transformer.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  config.optimizer.warmup_steps = 0
  config.label_smoothing = label_smoothing
  model = build.transformer(config, 16, 16)
  tx = transformer_stage.build_optimizer(config)
  labels = np.arange(16, dtype=np.int32) % 10
  tokens = (labels[:, None] * 3 + np.arange(16)[None, :] ** 2) % 16
  batch = {"tokens": tokens.astype(np.int32), "label": labels}
  return config, model, tx, batch


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def accumulated_step(config, model, tx, steps, **jit_kwargs):
  """The jitted train step with config.grad_accum_steps = steps."""
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = steps
  return jax.jit(lambda s, b: transformer_stage.train_step(config, model, tx,
                                                           s, b), **jit_kwargs)


def test_four_micro_batches_take_the_large_batch_step():
  """grad_accum_steps=4 on batch 16 gives the step of one batch of 16: the
  masks and label dropout are drawn for the whole batch, and the loss is
  the whole batch's masked mean (with the default label smoothing, 0.1)."""
  config, model, tx, batch = accumulation_setup(label_smoothing=0.1)
  state = init_state(model, tx)
  large, large_metrics = accumulated_step(config, model, tx, 1)(state, batch)
  accumulated, metrics = accumulated_step(config, model, tx, 4)(state, batch)
  for key in ("loss", "masked_accuracy", "mask_ratio", "grad_norm",
              "skipped_updates"):
    np.testing.assert_allclose(metrics[key], large_metrics[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  assert_trees_close(accumulated.opt_state, large.opt_state)
  assert_trees_close(accumulated.params, large.params)
  assert int(accumulated.step) == 1
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(large.params), jax.tree.leaves(state.params)))
  assert moved > 1e-4  # the compared update is not empty


@pytest.mark.slow
def test_micro_batches_on_eight_devices_take_the_large_batch_step():
  """Sharded over 8 data-parallel devices, 2 micro-batches of 8 (each
  spanning every device) give the single-device step of one batch of 16."""
  config, model, tx, batch = accumulation_setup()
  state = init_state(model, tx)
  large, large_metrics = accumulated_step(config, model, tx, 1)(state, batch)
  mesh = parallel.create_mesh({"data": 8})
  replicated = parallel.fsdp_sharding(state, mesh)
  step = accumulated_step(
      config, model, tx, 2,
      in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=(replicated, parallel.replicated(mesh)))
  with jax.set_mesh(mesh):
    sharded, metrics = step(jax.device_put(state, replicated),
                            parallel.global_batch(batch, mesh))
  np.testing.assert_allclose(metrics["loss"], large_metrics["loss"],
                             rtol=1e-5)
  assert_trees_close(sharded.opt_state, large.opt_state, rtol=1e-4)
  assert_trees_close(sharded.params, large.params, rtol=1e-4)


@pytest.mark.parametrize("steps, batch_size, match", [
    (0, 8, r"grad_accum_steps=0; valid: an integer >= 1"),
    (3, 8, r"batch_size=8 is not divisible by config\.grad_accum_steps=3"),
])
def test_bad_grad_accum_steps_is_refused(steps, batch_size, match):
  config = load_config("maskgit_fashion_mnist")
  config.update(grad_accum_steps=steps, batch_size=batch_size)
  with pytest.raises(ValueError, match=match):
    transformer_stage.validate(config)


# ---------------------------------------------------- bfloat16 compute


def float_dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_state():
  """config.dtype="bfloat16": the loss falls over 25 steps on a fixed batch
  while parameters, optimizer state, EMA and the loss stay float32."""
  model, state, losses, dtypes = train_on_a_fixed_batch(25,
                                                        dtype="bfloat16")
  assert model.dtype == jnp.bfloat16
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
  for part in (state.params, state.opt_state, state.ema_params):
    assert float_dtypes(part) == {jnp.dtype(jnp.float32)}
