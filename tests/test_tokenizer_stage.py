"""Stage 1, the VQGAN tokenizer: its train step (it learns; when the
discriminator plays; one device or eight), how code usage is counted, and
the token cache `--mode=tokenize` writes.

The step tests share one run: 20 steps of one jitted, single-device GAN step
on a fixed batch (compiled once), the discriminator starting at step 3.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import (NUM_TRAIN, garment_batch, garments, initialize, leaf,
                     load_config)
from maskgit_jax import parallel
from maskgit_jax import sharding
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.models import build
from maskgit_jax.train import tokenizer_stage

START = 3    # the discriminator's first step
STEPS = 20   # of the shared run (the loss is down to ~1/4 by then)


def gan_config(start_step: int = START):
  config = load_config("vqgan_fashion_mnist")
  config.losses.update(discriminator_start_step=start_step,
                       perceptual_weight=0.0,
                       generator_adversarial_weight=0.1)
  config.num_train_steps = 100
  # A batch statistic (the entropy of the batch's mean code distribution):
  # off, so that micro-batches take the step of the whole batch.
  config.vqgan.entropy_loss_ratio = 0.0
  config.optimizer.learning_rate = 3e-3  # so the loss halves in 20 steps
  # Adam with b1 = 0, b2 = 0.99 (the official discriminator settings) makes
  # the size of the first real update easy to state: lr * g / |g| = lr.
  config.d_optimizer.update(learning_rate=1e-3, b1=0.0, b2=0.99)
  return config


class Run:
  """The modules, the jitted step and what the shared run produced."""

  def __init__(self):
    self.config = config = gan_config()
    self.model = build.tokenizer(config)
    self.disc = build.discriminator(config)
    self.txs = tokenizer_stage.build_optimizers(config)
    self.batch = garment_batch(8, seed=3)
    self.step_fn = lambda s, b: tokenizer_stage.train_step(
        config, self.model, self.disc, self.txs, None, s, b)
    state = initialize(lambda rng: tokenizer_stage.init_state(
        config, self.model, self.disc, self.txs, rng))
    step = jax.jit(self.step_fn)
    self.states = [state]     # after 0 .. 4 steps
    self.metrics = []         # of steps 1 .. STEPS, on the host
    for i in range(STEPS):
      state, metrics = step(state, self.batch)
      if i < 4:
        self.states.append(state)
      self.metrics.append(jax.device_get(metrics))


@pytest.fixture(scope="module")
def run():
  return Run()


@pytest.mark.slow  # the shared 20-step run
def test_tokenizer_loss_falls_on_a_fixed_batch(run):
  """The GAN plays from step 3 on and the reconstruction loss still halves."""
  losses = [float(m["reconstruction_loss"]) for m in run.metrics]
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  assert all(float(m["discriminator_loss"]) > 0
             for m in run.metrics[START:]), "the discriminator never played"


@pytest.mark.slow  # the shared 20-step run
def test_discriminator_state_waits_for_its_start_step(run):
  """Before the start step nothing of the discriminator moves: parameters,
  Adam moments and step count stay as initialised."""
  states = run.states
  initial = states[0]["discriminator"]
  for state in states[1:START + 1]:
    frozen = state["discriminator"]
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(frozen)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The generator trains meanwhile, and the discriminator starts on time.
  assert int(states[START]["generator"].step) == START
  assert int(states[START + 1]["discriminator"].step) == 1


@pytest.mark.slow  # the shared 20-step run
def test_first_discriminator_update_has_the_learning_rate_size(run):
  """Stepping Adam on zero gradients before the start would decay its
  second moment towards 0 and blow up the first real updates (2x after 3
  idle steps here, 10x after 500); the first update must be ~lr."""
  before = run.states[START]["discriminator"].params
  after = run.states[START + 1]["discriminator"].params
  largest = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  lr = run.config.d_optimizer.learning_rate
  assert 0.5 * lr < largest <= 1.01 * lr, largest


@pytest.mark.slow  # the shared 20-step run, and the step compiled for a mesh
def test_a_mesh_of_eight_devices_takes_the_single_device_step(run):
  """Step 4 (the GAN's first, R1 included) on data=4 x fsdp=2, the batch
  split 4 ways and the state laid out by the config's sharding rules, gives
  the single-device step's losses and updates."""
  state = run.states[START]
  single, single_metrics = run.states[START + 1], run.metrics[START]
  mesh_sizes = {"data": 4, "fsdp": 2}
  mesh = parallel.create_mesh(mesh_sizes)
  layout = sharding.state_shardings(state, mesh, run.config.sharding_rules,
                                    min_size=1)
  with jax.set_mesh(mesh):
    sharded, sharded_metrics = jax.jit(
        run.step_fn, in_shardings=(layout, parallel.batch_sharding(mesh)),
        out_shardings=(layout, parallel.replicated(mesh)))(
            jax.device_put(state, layout),
            parallel.global_batch(run.batch, mesh))
  # The rules did shard both players.
  conv = leaf(sharded, "generator/params/encoder/level0_res0/conv1/kernel")
  assert conv.sharding.spec == P(None, None, "fsdp", None)
  codebook = leaf(sharded, "generator/params/quantizer/codebook")
  assert codebook.sharding.spec == P("fsdp", None)
  dense = leaf(sharded, "discriminator/params/dense/kernel")
  assert dense.sharding.spec == P("fsdp", None)
  sharded, single = jax.device_get((sharded, single))  # compared on the host
  assert float(single_metrics["r1_penalty"]) > 0  # the GAN is on
  for key in ("loss", "discriminator_loss", "r1_penalty", "psnr"):
    np.testing.assert_allclose(sharded_metrics[key], single_metrics[key],
                               rtol=1e-4, atol=1e-6, err_msg=key)
  # Adam's moments hold the gradients. (Its update is about lr * sign(g)
  # here (b1 = 0), which float noise can flip where g ~ 0, so parameters are
  # compared at the scale of one step.)
  for part in ("generator", "discriminator"):
    for a, b in zip(jax.tree.leaves(sharded[part].opt_state),
                    jax.tree.leaves(single[part].opt_state), strict=True):
      # Summation order differs across devices: compare leaf norms.
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-12
    lr = (run.config.optimizer if part == "generator"
          else run.config.d_optimizer).learning_rate
    for a, b in zip(jax.tree.leaves(sharded[part].params),
                    jax.tree.leaves(single[part].params), strict=True):
      np.testing.assert_allclose(a, b, atol=2 * lr)


def test_codebook_usage_counts_the_configured_window_of_steps():
  """Usage is over the last `codebook_usage_window` steps, across logging
  windows, not over one logging window."""
  summarize = tokenizer_stage.CodebookUsage(window=3)
  step = lambda code: {"loss": np.float32(1.0),
                       "code_counts": np.eye(8, dtype=np.int32)[code] * 5}
  # Steps use codes 0, 1 (first log window), then 2, 3, 4 (second).
  first = summarize([step(0), step(1)])
  assert first["codebook_usage"] == 2 / 8
  second = summarize([step(2), step(3), step(4)])
  assert second["codebook_usage"] == 3 / 8  # codes 2, 3, 4 only
  np.testing.assert_allclose(second["codebook_perplexity"], 3.0, rtol=1e-6)
  third = summarize([step(4)])  # window now holds steps using 3, 4, 4
  assert third["codebook_usage"] == 2 / 8
  assert third["loss"] == 1.0


@pytest.mark.slow  # reads the session's trained tokenizer (conftest.py)
def test_tokenize_encodes_both_flips(tokenizer_workdir):
  """The default cache holds, per image, its centre crop and the mirror."""
  source = tokens_lib.TokenSource(
      os.fspath(workdir_lib.Workdir(tokenizer_workdir).token_cache))
  assert len(source) == NUM_TRAIN and source.num_views == 2
  assert source.token_shape == (8, 8)
  assert source.metadata["codebook_size"] == 16
  assert source.metadata["num_views"] == 2 and source.metadata["flip"]
  assert int(np.max(source.tokens)) < 16
  assert not np.array_equal(source.tokens[:, 0], source.tokens[:, 1])
  assert sorted(np.asarray(source.labels).tolist()) == sorted(
      garments(NUM_TRAIN, 0)[1].tolist())


# ------------------------------------------------- gradient accumulation


@pytest.mark.slow  # the shared run, and its step with 4 micro-batches
def test_four_micro_batches_take_the_whole_batch_tokenizer_step(run):
  """grad_accum_steps=4 on the shared run's batch of 8 (micro-batches of 2)
  gives both players the step of the whole batch: step 4, the
  discriminator's first, R1 included. (The run's entropy loss is off: its
  entropy of the mean code distribution is a batch statistic, taken per
  micro-batch. LPIPS, a per-example mean like L2 and accumulated alike, is
  off too.)"""
  config = run.config.copy_and_resolve_references()
  config.grad_accum_steps = 4
  step = jax.jit(lambda s, b: tokenizer_stage.train_step(
      config, run.model, run.disc, run.txs, None, s, b))
  accumulated, metrics = step(run.states[START], run.batch)
  large, large_metrics = run.states[START + 1], run.metrics[START]
  accumulated, metrics = jax.device_get((accumulated, metrics))

  assert float(large_metrics["r1_penalty"]) > 0  # the GAN is on
  for key, value in large_metrics.items():
    if key == "code_counts":  # over the whole batch
      assert int(np.sum(value)) == 8 * 8 * 8
      np.testing.assert_array_equal(metrics[key], value)
    else:
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  for part in ("generator", "discriminator"):
    assert int(accumulated[part].step) == int(large[part].step)
    lr = (config.optimizer if part == "generator"
          else config.d_optimizer).learning_rate
    # Adam's moments hold the gradient and its square: they must agree to
    # well within a wrong weighting of a micro-batch (a quarter of the batch
    # here). All leaves but one layer's agree within 4e-6 of their largest
    # entry. The discriminator's first convolution differed by up to 2.1e-4
    # of it on a Zen 4 CPU, with micro-batches of 1 or 2 (not 4) and only
    # under some XLA code generation settings (the suite's -O0 with the
    # elemental emitters, or -O3), while its gradient alone, micro-batched
    # or not, matched a float64 one within 2e-6 (2026-12-08).
    for a, b in zip(jax.tree.leaves(accumulated[part].opt_state),
                    jax.tree.leaves(large[part].opt_state), strict=True):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(a, b, rtol=1e-4,
                                 atol=1e-3 * float(np.max(np.abs(b))),
                                 err_msg=f"{part} opt_state")
    # The discriminator's first Adam update is lr * g / (|g| + eps): for a
    # gradient entry near zero it turns float rounding into a sizeable part
    # of a step (6% seen), so the parameters agree to a fraction of it.
    for a, b in zip(jax.tree.leaves(accumulated[part].params),
                    jax.tree.leaves(large[part].params), strict=True):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-5,
          atol=0.25 * lr, err_msg=f"{part} params")


@pytest.mark.parametrize("steps, batch_size, match", [
    (0, 8, r"grad_accum_steps=0; valid: an integer >= 1"),
    (3, 8, r"batch_size=8 is not divisible by config\.grad_accum_steps=3"),
])
def test_bad_grad_accum_steps_is_refused_by_the_tokenizer(steps, batch_size,
                                                          match):
  config = load_config("vqgan_fashion_mnist")
  config.update(grad_accum_steps=steps, batch_size=batch_size)
  with pytest.raises(ValueError, match=match):
    tokenizer_stage.validate(config)


# ---------------------------------------------------- bfloat16 compute


def tokenizer_step(config, **overrides):
  """The jitted step (state, batch) -> (state, metrics) of `config` updated
  with `overrides` (no LPIPS)."""
  config = config.copy_and_resolve_references()
  config.update(overrides)
  model, disc = build.tokenizer(config), build.discriminator(config)
  txs = tokenizer_stage.build_optimizers(config)
  return jax.jit(lambda state, batch: tokenizer_stage.train_step(
      config, model, disc, txs, None, state, batch))


@pytest.mark.slow
def test_bfloat16_compute_trains_the_tokenizer_with_float32_state(run):
  """config.dtype="bfloat16", the GAN playing from step 3: the loss falls
  over 12 steps on a fixed batch while parameters, optimizer state, EMA and
  the losses stay float32."""
  step = tokenizer_step(gan_config(), dtype="bfloat16")
  # The compute dtype is not the parameters': the shared run's initial
  # state (of the same config in float32) is this run's too.
  state, batch = run.states[0], run.batch
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    assert metrics["loss"].dtype == metrics["r1_penalty"].dtype == jnp.float32
    losses.append(float(metrics["loss"]))
  assert float(metrics["discriminator_loss"]) > 0  # the GAN played
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
  for part in state.values():
    for tree in (part.params, part.opt_state, part.ema_params):
      assert {leaf.dtype for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
                  jnp.dtype(jnp.float32)}
