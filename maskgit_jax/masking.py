"""Training-time random masking (the MVTM objective, paper Sec. 3.2).

Each example draws its own progress r ~ U[0, 1) and hides
ceil(gamma(r) * N) of its N tokens (at least one), chosen uniformly at random.
Everything runs on device inside the jitted train step.
"""

import jax
import jax.numpy as jnp

from maskgit_jax import schedules


def num_masked(rng: jax.Array, batch_size: int, num_tokens: int,
               schedule: str = "cosine") -> jnp.ndarray:
  """Returns int32 [B]: how many tokens each example hides, in [1, N]."""
  r = jax.random.uniform(rng, (batch_size,), minval=0.0, maxval=1.0)
  ratio = schedules.mask_ratio(r, schedule, num_tokens=num_tokens)
  count = jnp.ceil(ratio * num_tokens).astype(jnp.int32)
  return jnp.clip(count, 1, num_tokens)


def rank_mask(scores: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
  """True at the `count[b]` lowest scores of each row of `scores` [B, N].

  Uses ranks rather than a threshold so that exactly `count` positions are
  chosen even when scores tie.
  """
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < count[:, None]


def random_mask(rng: jax.Array, batch_size: int, num_tokens: int,
                schedule: str = "cosine") -> jnp.ndarray:
  """Returns bool [B, N], True where a token is hidden from the model."""
  schedules.validate(schedule)
  count_rng, position_rng = jax.random.split(rng)
  count = num_masked(count_rng, batch_size, num_tokens, schedule)
  scores = jax.random.uniform(position_rng, (batch_size, num_tokens))
  return rank_mask(scores, count)


def apply_mask(tokens: jnp.ndarray, mask: jnp.ndarray,
               mask_token_id: int = -1) -> jnp.ndarray:
  """Replaces the tokens at `mask` by `mask_token_id`."""
  return jnp.where(mask, jnp.asarray(mask_token_id, tokens.dtype), tokens)
