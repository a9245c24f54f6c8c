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


# Leaves that weight decay shrinks, by their role (the name flax gives them):
# dense and convolution kernels (`kernel`, and the attention's fused
# `qkv_kernel` / `out_kernel`) and the transformer's embedding tables.
# Everything else is left alone: biases of any shape (the fused QKV bias is
# [3, heads, head_dim]), norm scales and the VQ codebook.
DECAYED_EMBEDDINGS = ("token_embedding", "position_embedding")


def is_decayed(name: str) -> bool:
  """Whether the parameter called `name` is a matrix or kernel to decay."""
  return name == "kernel" or name.endswith("_kernel") or (
      name in DECAYED_EMBEDDINGS)


def decay_mask(params):
  """True on the leaves weight decay applies to (see `is_decayed`); the
  usual BERT practice, decided by name rather than by number of dims."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_decayed(_leaf_name(path[-1])), params)


def _leaf_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", key)))


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
