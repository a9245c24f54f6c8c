"""Iterative parallel decoding (paper Sec. 3.2, Alg. 1), entirely on device.

Iteration t of T = num_iter, starting from tokens with `mask_token_id` at the
unknown positions:

1. predict: `tokens_to_logits(tokens)` gives [B, N, V] logits; every unknown
   position draws a token from softmax(logits / temperature).
2. score: the confidence of a drawn token is its probability; tokens that were
   already known get +inf, so they are never masked again.
3. re-mask: the number of tokens left masked after iteration t is

       n(t) = max(1, min(u(t) - 1, floor(N0 * gamma((t + 1) / T))))

   for t < T - 1 and n(T - 1) = 0, where N0 is the number of unknown tokens in
   `inputs`, u(t) the number still unknown before iteration t and gamma the
   mask schedule. This is the official MaskGIT rule: each iteration fixes at
   least one token and leaves at least one for later, and the last iteration
   fixes everything. The n(t) least confident tokens are masked again, where
   the confidence is randomised as
   log(p) + choice_temperature * (1 - (t + 1) / T) * Gumbel noise,
   so early iterations pick more freely and the last ones greedily.

The iterations are one `jax.lax.fori_loop`, so `tokens_to_logits` is traced
once and the loop never returns to the host. Call `decode` under `jax.jit`
(or use `make_decoder`) to compile it once per input shape.

Classifier-free guidance is a wrapper around `tokens_to_logits`: `guided`
adds an unconditional half to the batch and combines the two halves,
with a scale that may follow a schedule over the iterations.
"""

import functools
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from maskgit_jax import masking
from maskgit_jax import schedules

TokensToLogits = Callable[[jnp.ndarray], jnp.ndarray]


class DecodeHistory(NamedTuple):
  """What each iteration produced, for visualisation.

  predicted: int32 [B, T, N], the tokens drawn at iteration t (no mask ids).
  remasked: bool [B, T, N], True where that token was masked again after t.
    The tokens held after iteration t are `where(remasked, mask_id, predicted)`.
  Iterations before `start_iter` hold the inputs and no re-masking.
  """
  predicted: jnp.ndarray
  remasked: jnp.ndarray


SEARCH_BLOCK = 32


def _last_positive(x: jnp.ndarray) -> jnp.ndarray:
  """Index of the last entry > 0 along the last axis."""
  return x.shape[-1] - 1 - jnp.argmax(jnp.flip(x > 0, axis=-1), axis=-1)


def sample_categorical(rng: jax.Array, logits: jnp.ndarray,
                       temperature: Union[float, jnp.ndarray] = 1.0):
  """Draws one token per position from softmax(logits / temperature).

  Inverse-CDF sampling with one uniform number per position: exact for the
  categorical distribution and much cheaper than Gumbel-max
  (`jax.random.categorical`), which draws one number per vocabulary entry.
  The search runs in two levels so that no [..., V] cumulative sum is
  formed (on XLA:CPU that sum cost most of an iteration's sampling): the
  uniform picks a block of SEARCH_BLOCK entries by the blocks' cumulative
  mass, then an entry inside that block. A token of zero probability is
  never drawn.

  Returns:
    (tokens int32 [...], probability of each drawn token float32 [...]).
  """
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  pad = [(0, 0)] * (logits.ndim - 1) + [(0, -vocab % SEARCH_BLOCK)]
  logits = jnp.pad(logits, pad, constant_values=-jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  blocks = logits.reshape(logits.shape[:-1] + (-1, SEARCH_BLOCK))
  block_mass = jnp.sum(jnp.exp(blocks - top[..., None]), axis=-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  total = block_cdf[..., -1:]
  u = jax.random.uniform(rng, logits.shape[:-1] + (1,)) * total
  block = jnp.minimum(jnp.sum(block_cdf <= u, axis=-1),
                      _last_positive(block_mass))
  # The mass before the chosen block, exactly as the comparison above saw it
  # (so it is <= u, and leading zero-mass entries of the block count as
  # passed, never drawn).
  exclusive = jnp.concatenate(
      [jnp.zeros_like(total), block_cdf[..., :-1]], axis=-1)
  before = jnp.take_along_axis(exclusive, block[..., None], axis=-1)
  mass = jnp.exp(jnp.take_along_axis(
      blocks, block[..., None, None], axis=-2)[..., 0, :] - top)
  inside = jnp.minimum(
      jnp.sum(before + jnp.cumsum(mass, axis=-1) <= u, axis=-1),
      _last_positive(mass))
  tokens = (block * SEARCH_BLOCK + inside).astype(jnp.int32)
  chosen = jnp.take_along_axis(mass, inside[..., None], -1)[..., 0]
  return tokens, chosen / total[..., 0]


def num_left_masked(step: jnp.ndarray, num_iter: int, initial_unknown,
                    current_unknown, schedule: str) -> jnp.ndarray:
  """n(t) of the module docstring: tokens left masked after iteration `step`."""
  ratio = (step + 1).astype(jnp.float32) / num_iter
  gamma = schedules.mask_ratio(ratio, schedule, num_tokens=initial_unknown)
  count = jnp.floor(initial_unknown * gamma).astype(jnp.int32)
  count = jnp.maximum(1, jnp.minimum(current_unknown - 1, count))
  return jnp.where(step >= num_iter - 1, 0, count)


def _check_args(inputs, num_iter, start_iter, choice_temperature, schedule):
  if getattr(inputs, "ndim", None) != 2:
    raise ValueError("inputs must be int tokens of shape [batch, num_tokens], "
                     f"got shape {getattr(inputs, 'shape', None)}.")
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"inputs must be integer tokens, got dtype {inputs.dtype}.")
  if not isinstance(num_iter, int) or num_iter < 1:
    raise ValueError(f"num_iter must be a positive int, got {num_iter!r}.")
  if not isinstance(start_iter, int) or not 0 <= start_iter < num_iter:
    raise ValueError(f"start_iter must be an int in [0, num_iter={num_iter}), "
                     f"got {start_iter!r}.")
  if isinstance(choice_temperature, (int, float)) and choice_temperature < 0:
    raise ValueError("choice_temperature must be >= 0, got "
                     f"{choice_temperature!r}.")
  schedules.validate(schedule)


def decode(tokens_to_logits: TokensToLogits,
           inputs: jnp.ndarray,
           rng: jax.Array,
           *,
           num_iter: int,
           mask_token_id: int = -1,
           choice_temperature: float = 4.5,
           schedule: str = "cosine",
           start_iter: int = 0,
           temperature: float = 1.0,
           return_history: bool = False,
           pass_step: bool = False):
  """Fills every `mask_token_id` in `inputs` by iterative parallel decoding.

  Args:
    tokens_to_logits: maps int32 tokens [B, N] (with mask ids) to logits
      [B, N, V]; a pure function of its input (close over parameters).
    inputs: int [B, N]; `mask_token_id` marks the unknown positions. Known
      tokens (a class token, the kept part of an image) never change.
    rng: PRNG key; the same key gives the same output.
    num_iter: T, the total number of iterations of the schedule.
    mask_token_id: the id that marks unknown positions.
    choice_temperature: scale of the Gumbel noise in the re-masking choice,
      annealed linearly to 0 over the iterations.
    schedule: mask schedule name (see `schedules.VALID_METHODS`).
    start_iter: first iteration to run, to begin part-way through the
      schedule (editing); iterations start_iter..T-1 run.
    temperature: softmax temperature of the token sampling. The confidence
      is the probability under this same tempered distribution.
    return_history: also return a `DecodeHistory`.
    pass_step: call `tokens_to_logits(tokens, step)` with the iteration
      index (a traced int32), e.g. for a guidance scale that follows a
      schedule over the iterations.

  Returns:
    int32 [B, N] tokens without mask ids, or (tokens, DecodeHistory).
  """
  _check_args(inputs, num_iter, start_iter, choice_temperature, schedule)
  inputs = inputs.astype(jnp.int32)
  unknown = inputs == mask_token_id
  initial_unknown = jnp.sum(unknown, axis=-1, dtype=jnp.int32)
  if return_history:
    history = DecodeHistory(
        predicted=jnp.repeat(inputs[:, None, :], num_iter, axis=1),
        remasked=jnp.zeros(inputs.shape[:1] + (num_iter,) + inputs.shape[1:],
                           bool))
  else:
    history = None

  def one_iteration(step, carry):
    tokens, history = carry
    sample_rng, choice_rng = jax.random.split(jax.random.fold_in(rng, step))
    unknown = tokens == mask_token_id
    logits = (tokens_to_logits(tokens, step) if pass_step else
              tokens_to_logits(tokens))
    sampled, prob = sample_categorical(sample_rng, logits, temperature)
    sampled = jnp.where(unknown, sampled, tokens)

    count = num_left_masked(step, num_iter, initial_unknown,
                            jnp.sum(unknown, axis=-1, dtype=jnp.int32),
                            schedule)
    ratio = (step + 1).astype(jnp.float32) / num_iter
    noise_scale = choice_temperature * (1.0 - ratio)
    confidence = jnp.log(prob) + noise_scale * jax.random.gumbel(
        choice_rng, prob.shape)
    confidence = jnp.where(unknown, confidence, jnp.inf)
    remask = masking.rank_mask(confidence, count) & unknown
    new_tokens = jnp.where(remask, mask_token_id, sampled)

    if history is not None:
      history = DecodeHistory(
          predicted=history.predicted.at[:, step].set(sampled),
          remasked=history.remasked.at[:, step].set(remask))
    return new_tokens, history

  tokens, history = jax.lax.fori_loop(start_iter, num_iter, one_iteration,
                                      (inputs, history))
  return (tokens, history) if return_history else tokens


def make_decoder(tokens_to_logits: TokensToLogits, **decode_kwargs):
  """Returns jit(lambda inputs, rng: decode(tokens_to_logits, inputs, rng))."""
  return jax.jit(functools.partial(decode, tokens_to_logits, **decode_kwargs))


# --- classifier-free guidance ----------------------------------------------

GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")

StepLogits = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def validate_guidance_schedule(schedule: str) -> None:
  """Raises a ValueError naming `schedule` unless it is a known one."""
  if schedule not in GUIDANCE_SCHEDULES:
    raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, "
                     f"got {schedule!r}.")


def guidance_at(scale, schedule: str, step, num_iter: int):
  """Guidance scale at iteration `step`: constant, or rising from ~0 to
  `scale` over the iterations (linear or half-cosine), so the early, freely
  chosen tokens are guided least."""
  validate_guidance_schedule(schedule)
  progress = (step + 1).astype(jnp.float32) / num_iter
  if schedule == "linear":
    return scale * progress
  if schedule == "cosine":
    return scale * (1.0 - jnp.cos(jnp.pi * progress)) / 2.0
  return scale


def combine_guidance(cond: jnp.ndarray, uncond: jnp.ndarray,
                     scale) -> jnp.ndarray:
  """The guidance rule: cond + scale * (cond - uncond)."""
  return cond + scale * (cond - uncond)


def guided(tokens_to_logits: TokensToLogits, scale, schedule: str,
           num_iter: int, mask_token_id: int = -1) -> StepLogits:
  """Wraps a logits fn of [class token, image tokens] sequences into a
  guided `fn(tokens, step)` for `decode(..., pass_step=True)`.

  The unconditional input holds `mask_token_id` in the class slot (what
  label dropout trains); both halves go through one batched forward pass,
  so guidance costs one call of twice the batch, not two calls.
  """
  validate_guidance_schedule(schedule)

  def guided_logits(tokens: jnp.ndarray, step) -> jnp.ndarray:
    unconditional = tokens.at[:, 0].set(mask_token_id)
    both = tokens_to_logits(jnp.concatenate([tokens, unconditional], axis=0))
    cond, uncond = jnp.split(both, 2, axis=0)
    return combine_guidance(cond, uncond,
                            guidance_at(scale, schedule, step, num_iter))
  return guided_logits
