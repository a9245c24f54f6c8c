"""Stage 2: the masked-token transformer, trained on cached tokens.

Loss: cross-entropy over the masked positions only, with label smoothing.
Each example draws its own mask ratio from the schedule (masking.py). With
`label_dropout` > 0 the class token is replaced by the mask token for that
fraction of examples, which trains the unconditional model that
classifier-free guidance needs.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from maskgit_jax import losses
from maskgit_jax import masking
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.train import optimizers
from maskgit_jax.train import state as state_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(DTYPES)}.")
  return DTYPES[name]


def build_model(config: ml_collections.ConfigDict, codebook_size: int,
                num_tokens: int) -> transformer_lib.MaskGITTransformer:
  t = config.transformer
  return transformer_lib.MaskGITTransformer(
      codebook_size=codebook_size, num_classes=config.num_classes,
      num_tokens=num_tokens, hidden_size=t.hidden_size,
      num_layers=t.num_layers, num_heads=t.num_heads, mlp_dim=t.mlp_dim,
      dropout_rate=t.dropout_rate,
      attention_dropout_rate=t.attention_dropout_rate,
      dtype=compute_dtype(config.dtype))


def build_optimizer(config: ml_collections.ConfigDict):
  return optimizers.create_optimizer(config.optimizer, config.num_train_steps)


def init_state(model: transformer_lib.MaskGITTransformer, tx,
               rng: jax.Array) -> state_lib.TrainState:
  init_rng, run_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, model.seq_len), jnp.int32)
  params = model.init(init_rng, tokens)["params"]
  return state_lib.TrainState.create(params, tx,
                                     jax.random.key_data(run_rng))


def model_inputs(rng: jax.Array, tokens: jnp.ndarray, labels: jnp.ndarray,
                 codebook_size: int, schedule: str, label_dropout: float):
  """Masks image tokens and prepends the (possibly dropped) class token."""
  mask_rng, drop_rng = jax.random.split(rng)
  batch, num_tokens = tokens.shape
  mask = masking.random_mask(mask_rng, batch, num_tokens, schedule)
  masked = masking.apply_mask(tokens, mask, transformer_lib.MASK_TOKEN_ID)
  class_ids = transformer_lib.class_token(labels, codebook_size)
  if label_dropout > 0:
    drop = jax.random.bernoulli(drop_rng, label_dropout, (batch,))
    class_ids = jnp.where(drop, transformer_lib.MASK_TOKEN_ID, class_ids)
  return jnp.concatenate([class_ids[:, None], masked], axis=1), mask


def train_step(config: ml_collections.ConfigDict,
               model: transformer_lib.MaskGITTransformer, tx,
               state: state_lib.TrainState,
               batch: Dict[str, jnp.ndarray]
               ) -> Tuple[state_lib.TrainState, Dict[str, jnp.ndarray]]:
  """One optimizer step on a batch {"tokens": [B, N], "label": [B]}."""
  rng = state_lib.step_rng(state.rng, state.step)
  input_rng, dropout_rng = jax.random.split(rng)
  tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
  tokens = tokens.astype(jnp.int32)
  inputs, mask = model_inputs(input_rng, tokens, batch["label"],
                              model.codebook_size, config.mask_schedule,
                              config.label_dropout)

  def loss_fn(params):
    logits = model.apply({"params": params}, inputs, deterministic=False,
                         rngs={"dropout": dropout_rng})
    logits = logits[:, 1:, :model.codebook_size]
    loss = losses.masked_cross_entropy(logits, tokens, mask,
                                       config.label_smoothing)
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads, tx, config.ema_decay)
  skipped = jnp.zeros((), jnp.float32)
  if config.on_nonfinite == "skip":
    new_state, skipped = state_lib.keep_if_finite(loss, grads, new_state,
                                                  state)
  metrics = {
      "loss": loss,
      "masked_accuracy": losses.masked_accuracy(logits, tokens, mask),
      "mask_ratio": jnp.mean(mask),
      "grad_norm": optax.tree.norm(grads),
      "skipped_updates": skipped,
  }
  return new_state, metrics
