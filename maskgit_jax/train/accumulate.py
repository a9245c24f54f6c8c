"""Gradient accumulation: one optimizer step over K micro-batches.

`config.grad_accum_steps` = K (default 1) splits each global batch of B
examples into K micro-batches of B / K, runs the forward and backward pass
on one at a time (a `jax.lax.scan`, so activation memory is that of B / K
examples) and adds up the gradients and loss pieces; the stage then makes
one optimizer update. The result is the large-batch step's, up to float
rounding, for any loss that is a sum or an equal-weight mean of per-example
terms. Statistics of the whole batch computed inside the model (the
quantizer's entropy of the mean code distribution) are taken per
micro-batch instead. Example: the official batch of 256 on 16 devices that
fit 4 examples each is `--config.batch_size=256 --config.grad_accum_steps=4`.

Layout: micro-batch k is rows k, k + K, k + 2K, ... of the batch (reshape
[B, ...] -> [B / K, K, ...] and take column k). The batch's leading
dimension is split over the D data-parallel devices in contiguous blocks of
B / D rows; when B is divisible by K * D, each block holds B / (K * D) rows
of every micro-batch, so each micro-batch stays spread over all D devices
and the split moves no data between them. (Contiguous slices, rows
[k B / K, (k + 1) B / K), would put each micro-batch on 1 / K of the
devices and leave the others idle.) When B is divisible by D and by K but
not by K * D the result is the same, at the cost of moving rows.

With K = 1 nothing is split and no scan is traced: the step is exactly the
one without accumulation.
"""

import operator
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from maskgit_jax import streams

# fn(micro_batch, rng) -> (summed, kept): `summed` is added up (or averaged)
# over micro-batches, `kept` is put back together into whole-batch arrays.
MicroStep = Callable[[Any, Optional[jax.Array]], Tuple[Any, Any]]


def validate(steps: Any, batch_size: int) -> None:
  """config.grad_accum_steps must be an int >= 1 that divides batch_size."""
  try:
    count = operator.index(steps)
  except TypeError:
    count = 0
  if isinstance(steps, bool) or count < 1:
    raise ValueError(f"config.grad_accum_steps={steps!r}; valid: an integer "
                     ">= 1 (1 = no gradient accumulation).")
  if batch_size % count:
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by "
        f"config.grad_accum_steps={count}: the micro-batches must be of "
        "equal size.")


# Micro-batch k is rows k, k + K, ...: the layout streams.py slices in.
split = streams.split
merge = streams.merge


def sum_over_microbatches(fn: MicroStep, batch: Any, steps: int,
                          rng: Optional[jax.Array] = None) -> Tuple[Any, Any]:
  """(sum over micro-batches of fn's `summed`, fn's `kept` for the batch).

  Micro-batch k gets the key `fold_in(rng, k)` (None if rng is None). For
  steps == 1 this is `fn(batch, rng)`, with rng not folded.
  """
  if steps == 1:
    return fn(batch, rng)

  def body(total, xs):
    micro, index = xs
    key = None if rng is None else jax.random.fold_in(rng, index)
    summed, kept = fn(micro, key)
    return jax.tree.map(jnp.add, total, summed), kept

  micro_batches = split(batch, steps)
  micro_shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro_batches)
  shapes = jax.eval_shape(fn, micro_shapes, rng)[0]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, kept = jax.lax.scan(body, zeros,
                             (micro_batches, jnp.arange(steps)))
  return total, merge(kept)


def mean_over_microbatches(fn: MicroStep, batch: Any, steps: int,
                           rng: Optional[jax.Array] = None
                           ) -> Tuple[Any, Any]:
  """As `sum_over_microbatches`, with `summed` averaged: for losses that
  are means over examples, as micro-batches are of equal size."""
  total, kept = sum_over_microbatches(fn, batch, steps, rng)
  if steps > 1:
    total = jax.tree.map(lambda x: x / steps, total)
  return total, kept
