"""Optimizers from config: Adam/AdamW, warm-up + constant/cosine, clipping."""

import jax
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(opt: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then constant or cosine decay to 0."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"Unknown learning-rate schedule {opt.schedule!r}; "
                     f"valid: {SCHEDULES}.")
  warmup = int(opt.warmup_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup, max(num_train_steps, warmup + 1))
  if warmup == 0:
    return optax.constant_schedule(opt.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt.learning_rate, warmup),
       optax.constant_schedule(opt.learning_rate)], [warmup])


def decay_mask(params):
  """Weight decay on matrices and convolution kernels only.

  Biases, LayerNorm/GroupNorm scales and the codebook-free 1-D parameters
  are not decayed (the usual BERT practice).
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(opt: ml_collections.ConfigDict,
                     num_train_steps: int) -> optax.GradientTransformation:
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {opt.name!r}; valid: {OPTIMIZERS}.")
  schedule = learning_rate_schedule(opt, num_train_steps)
  if opt.name == "adamw":
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                       weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    core = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
  return core
