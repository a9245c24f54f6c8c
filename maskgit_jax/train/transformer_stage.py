"""Stage 2: the masked-token transformer, trained on cached tokens.

Loss: cross-entropy over the masked positions only, with label smoothing.
Each example draws its own mask ratio from the schedule (masking.py). With
`label_dropout` > 0 the class token is replaced by the mask token for that
fraction of examples, which trains the unconditional model that
classifier-free guidance needs.
"""

import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from maskgit_jax import losses
from maskgit_jax import masking
from maskgit_jax import schedules
from maskgit_jax import streams
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.models import build
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.train import accumulate
from maskgit_jax.train import images as images_lib
from maskgit_jax.train import loop
from maskgit_jax.train import optimizers
from maskgit_jax.train import state as state_lib


def validate(config: ml_collections.ConfigDict) -> None:
  """Stage-2 checks, before anything is compiled."""
  schedules.validate(config.mask_schedule)
  accumulate.validate(config.grad_accum_steps, config.batch_size)
  if not config.tokenizer_workdir:
    raise ValueError("config.tokenizer_workdir is empty: name the workdir "
                     "of a trained tokenizer.")
  if not 0.0 <= config.label_dropout < 1.0:
    raise ValueError(f"config.label_dropout={config.label_dropout}; valid: "
                     "[0, 1).")
  if not config.sampling.temperature > 0:
    raise ValueError(f"config.sampling.temperature="
                     f"{config.sampling.temperature}; valid: > 0.")
  check_guidance(config, workdir_lib.has_unconditional(config))


def check_guidance(config: ml_collections.ConfigDict,
                   has_unconditional: bool) -> None:
  """Classifier-free guidance needs a model trained with label dropout."""
  scale = config.sampling.guidance_scale
  if scale > 0 and not has_unconditional:
    raise ValueError(
        f"config.sampling.guidance_scale={scale} needs a transformer trained "
        "with label dropout (an unconditional model), and this run has none "
        "(config.label_dropout=0, or imported official weights). Train or "
        "fine-tune with --config.label_dropout=0.1, or sample with "
        "--config.sampling.guidance_scale=0.")

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


TRAIN_STREAMS = 2


def train_streams(batch_size: int) -> int:
  """How many independent slices a train step computes its batch in."""
  return streams.default_streams(batch_size, limit=TRAIN_STREAMS)


def training_logits(model: transformer_lib.MaskGITTransformer, params,
                    inputs: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
  """Logits over the image codes [B, S, codebook_size], with dropout.

  Only the codes enter the loss, so the head is computed over them alone
  (the other vocabulary rows get no gradient from it either way). The batch
  runs as independent slices (streams.py; CPU only, one stream elsewhere),
  each with its own dropout key. On 2 CPU cores two slices made the
  benchmark steps 5-9% faster; four were slower at batch 8.
  """
  return streams.in_streams(
      lambda x, rng: model.apply({"params": params}, x, deterministic=False,
                                 codes_only=True, rngs={"dropout": rng}),
      inputs, rng=rng,
      num_streams=train_streams(inputs.shape[0]))


def _examples_with_masks(mask: jnp.ndarray) -> jnp.ndarray:
  """How many rows of mask [B, N] hide at least one token (float32)."""
  return jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))


def train_step(config: ml_collections.ConfigDict,
               model: transformer_lib.MaskGITTransformer, tx,
               state: state_lib.TrainState,
               batch: Dict[str, jnp.ndarray]
               ) -> Tuple[state_lib.TrainState, Dict[str, jnp.ndarray]]:
  """One optimizer step on a batch {"tokens": [B, N], "label": [B]}.

  Masks and label dropout are drawn for the whole batch; with
  config.grad_accum_steps = K > 1 the gradients are then accumulated over K
  micro-batches (accumulate.py), each with its own dropout key.
  """
  steps = config.grad_accum_steps
  rng = state_lib.step_rng(state.rng, state.step)
  input_rng, dropout_rng = jax.random.split(rng)
  tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
  tokens = tokens.astype(jnp.int32)
  inputs, mask = model_inputs(input_rng, tokens, batch["label"],
                              model.codebook_size, config.mask_schedule,
                              config.label_dropout)
  # The loss is a mean over the examples that hide a token (all of them in
  # training): a micro-batch's share of it is its own such mean, weighted
  # by its part of their count.
  examples = (None if steps == 1 else
              jnp.maximum(_examples_with_masks(mask), 1.0))

  def micro_step(micro, micro_rng):
    share = (None if examples is None else
             _examples_with_masks(micro["mask"]) / examples)

    def loss_fn(params):
      logits = training_logits(model, params, micro["inputs"], micro_rng)
      logits = logits[:, 1:]
      loss = losses.masked_cross_entropy(logits, micro["tokens"],
                                         micro["mask"], config.label_smoothing)
      return (loss if share is None else share * loss), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    accuracy = losses.masked_accuracy(logits, micro["tokens"], micro["mask"])
    if share is not None:
      accuracy = share * accuracy
    return (loss, grads, accuracy), None

  (loss, grads, accuracy), _ = accumulate.sum_over_microbatches(
      micro_step, {"inputs": inputs, "tokens": tokens, "mask": mask}, steps,
      dropout_rng)
  new_state = state.apply_gradients(grads, tx, config.ema_decay)
  skipped = jnp.zeros((), jnp.float32)
  if config.on_nonfinite == "skip":
    new_state, skipped = state_lib.keep_if_finite(loss, grads, new_state,
                                                  state)
  metrics = {
      "loss": loss,
      "masked_accuracy": accuracy,
      "mask_ratio": jnp.mean(mask),
      "grad_norm": optax.tree.norm(grads),
      "skipped_updates": skipped,
  }
  return new_state, metrics


def step_functions(config: ml_collections.ConfigDict, codebook_size: int,
                   num_tokens: int):
  """(init_state, train_step, batch shapes) for a token grid, without data.

  init_state(rng) -> state and train_step(state, batch, constants) ->
  (state, metrics) are what `make_stage` gives the loop; the global batch
  is described as ShapeDtypeStructs {"tokens": int32 [B, N], "label":
  int32 [B]}. `tools.plan` compiles these on a virtual mesh.
  """
  model = build.transformer(config, codebook_size, num_tokens)
  tx = build_optimizer(config)
  size = config.batch_size
  batch_shapes = {"tokens": jax.ShapeDtypeStruct((size, num_tokens),
                                                 jnp.int32),
                  "label": jax.ShapeDtypeStruct((size,), jnp.int32)}
  return (lambda rng: init_state(model, tx, rng),
          lambda state, batch, _: train_step(config, model, tx, state, batch),
          batch_shapes)


def tokenize_command(config: ml_collections.ConfigDict) -> str:
  return (f"python -m maskgit_jax.main --config=<tokenizer config> "
          f"--workdir={config.tokenizer_workdir} --mode=tokenize")


def make_stage(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
  """The transformer's modules, step, token data and sample grids."""
  validate(config)
  run = workdir_lib.Workdir(workdir)
  token_dir = os.fspath(workdir_lib.Workdir(config.tokenizer_workdir)
                        .token_cache)
  hint = f"Write it with: {tokenize_command(config)}"
  source = tokens_lib.TokenSource(token_dir, missing_hint=hint)
  meta = source.metadata
  codebook_size = int(meta["codebook_size"])
  if "num_classes" in meta and int(meta["num_classes"]) > config.num_classes:
    raise ValueError(f"The token dataset has {meta['num_classes']} classes but "
                     f"config.num_classes={config.num_classes}.")
  height, width = source.token_shape
  init_fn, step_fn, _ = step_functions(config, codebook_size, height * width)

  tokenizer_weights = []  # read from the tokenizer workdir once, when needed

  def sample_grid(state, step):
    from maskgit_jax.pipeline import Pipeline  # Inference side, float32.
    if not tokenizer_weights:
      tokenizer_weights.extend(workdir_lib.Workdir(
          config.tokenizer_workdir).load_tokenizer()[1:])
    tokenizer, k_params = tokenizer_weights
    pipe = Pipeline(tokenizer, k_params,
                    build.transformer(config, codebook_size, height * width,
                                      dtype="float32"),
                    jax.device_get(state.ema_params),
                    token_shape=(height, width),
                    mask_schedule=config.mask_schedule,
                    has_unconditional=workdir_lib.has_unconditional(config))
    return images_lib.sample_grid(
        pipe, config, str(run.images / f"samples_{step:08d}.png"))

  return loop.Stage(
      init_state=init_fn,
      train_step=step_fn,
      make_iterator=lambda: tokens_lib.make_token_iterator(
          token_dir, global_batch_size=config.batch_size, seed=config.seed,
          missing_hint=hint),
      evaluate=sample_grid)


# ------------------------------------------------------------------ modes

def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: a class grid from the EMA weights (images/samples.png)."""
  from maskgit_jax.pipeline import Pipeline
  pipe = Pipeline.from_workdirs(config.tokenizer_workdir, workdir)
  path = str(workdir_lib.Workdir(workdir).images / "samples.png")
  images_lib.sample_grid(pipe, config, path)
  return path
