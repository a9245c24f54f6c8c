"""Train state: parameters, optimizer state, EMA, step and RNG in one pytree.

Everything a resumed run needs lives here (the data iterator state is saved
beside it), so a checkpoint of this pytree is a complete snapshot. The
optimizer (a pair of functions) is not part of it: it is rebuilt from the
config and passed to `apply_gradients`.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray                 # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray                  # uint32 [2] raw PRNG key data

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation,
             rng: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params), ema_params=params,
               rng=jnp.asarray(rng, jnp.uint32))

  def apply_gradients(self, grads, tx: optax.GradientTransformation,
                      ema_decay: float) -> "TrainState":
    """Optimizer update, EMA update and step + 1."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params,
                        opt_state=opt_state,
                        ema_params=ema_update(self.ema_params, params,
                                              ema_decay))


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def step_rng(state_rng: jnp.ndarray, step: jnp.ndarray) -> jax.Array:
  """The step's PRNG key: a pure function of the run's key and the step.

  Deriving rather than carrying keys makes a resumed run draw exactly the
  random numbers an uninterrupted one would.
  """
  return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def keep_if_finite(loss: jnp.ndarray, grads, new_state, old_state):
  """new_state when the loss and every gradient are finite, else old_state
  with only the step advanced (config.on_nonfinite = "skip").

  Returns (state, skipped as float32 0/1)."""
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                      old_state.replace(step=new_state.step))
  return kept, 1.0 - finite.astype(jnp.float32)
