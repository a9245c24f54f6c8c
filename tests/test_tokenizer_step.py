"""The tokenizer's train step: when the discriminator plays, and how code
usage is counted."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import config_base
from maskgit_jax.models import build
from maskgit_jax.train import tokenizer_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gan_config(start_step: int):
  config = config_base.from_file(
      os.path.join(REPO, "configs", "vqgan_fashion_mnist.py"), "tiny")
  config.losses.update(discriminator_start_step=start_step,
                       perceptual_weight=0.0,
                       generator_adversarial_weight=0.1)
  config.num_train_steps = 100
  # Adam with b1 = 0, b2 = 0.99 (the official discriminator settings) makes
  # the size of the first real update easy to state: lr * g / |g| = lr.
  config.d_optimizer.update(learning_rate=1e-3, b1=0.0, b2=0.99)
  return config


def run_steps(config, num_steps):
  model, disc = build.tokenizer(config), build.discriminator(config)
  txs = tokenizer_stage.build_optimizers(config)
  state = tokenizer_stage.init_state(config, model, disc, txs,
                                     jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  step = jax.jit(lambda s: tokenizer_stage.train_step(
      config, model, disc, txs, None, s, {"image": images}))
  states = [state]
  for _ in range(num_steps):
    state, _ = step(state)
    states.append(state)
  return states


@pytest.fixture(scope="module")
def gan_states():
  """Train states after 0..4 steps, the discriminator starting at step 3."""
  return run_steps(gan_config(start_step=3), num_steps=4)


def test_discriminator_state_waits_for_its_start_step(gan_states):
  """Before the start step nothing of the discriminator moves: parameters,
  Adam moments and step count stay as initialised."""
  states = gan_states
  initial = states[0]["discriminator"]
  for state in states[1:4]:
    frozen = state["discriminator"]
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(frozen)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The generator trains meanwhile, and the discriminator starts on time.
  assert int(states[3]["generator"].step) == 3
  assert int(states[4]["discriminator"].step) == 1


def test_first_discriminator_update_has_the_learning_rate_size(gan_states):
  """Stepping Adam on zero gradients before the start would decay its
  second moment towards 0 and blow up the first real updates (2x after 3
  idle steps here, 10x after 500); the first update must be ~lr."""
  config, states = gan_config(start_step=3), gan_states
  before = states[3]["discriminator"].params
  after = states[4]["discriminator"].params
  largest = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  lr = config.d_optimizer.learning_rate
  assert 0.5 * lr < largest <= 1.01 * lr, largest


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
