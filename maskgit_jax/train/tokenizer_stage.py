"""Stage 1: the VQGAN tokenizer, trained as a GAN.

Generator loss = reconstruction (L1 or L2) + LPIPS perceptual loss
+ quantizer losses (codebook, commitment, entropy) + adversarial loss.
Discriminator loss = non-saturating (or hinge) GAN loss + R1 penalty on real
images. Both players start their adversarial terms at
`losses.discriminator_start_step`; before that the tokenizer trains as a
plain VQ autoencoder. The EMA of the generator is what the token cache and
the Pipeline use.
"""

import collections
import functools
import os
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskgit_jax import losses
from maskgit_jax import streams
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import input_pipeline
from maskgit_jax.models import build
from maskgit_jax.models import discriminator as discriminator_lib
from maskgit_jax.models import vqgan as vqgan_lib
from maskgit_jax.train import accumulate
from maskgit_jax.train import images as images_lib
from maskgit_jax.train import loop
from maskgit_jax.train import optimizers
from maskgit_jax.train import state as state_lib

RECONSTRUCTION = {"l1": losses.l1_loss, "l2": losses.l2_loss}
PerceptualFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def validate(config: ml_collections.ConfigDict) -> None:
  """Tokenizer-specific checks, before anything is compiled."""
  factor = 2**(len(config.vqgan.channel_multipliers) - 1)
  if config.data.image_size % factor:
    raise ValueError(
        f"data.image_size={config.data.image_size} is not divisible by the "
        f"tokenizer's downsampling factor {factor} (2 ** (len("
        f"channel_multipliers) - 1)).")
  if config.losses.reconstruction not in RECONSTRUCTION:
    raise ValueError(
        f"losses.reconstruction={config.losses.reconstruction!r}; valid: "
        f"{sorted(RECONSTRUCTION)}.")
  accumulate.validate(config.grad_accum_steps, config.batch_size)
  if int(config.codebook_usage_window) < 1:
    raise ValueError("codebook_usage_window must be >= 1 step, got "
                     f"{config.codebook_usage_window}.")


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  """Whether the adversarial game ever starts in this run (a static choice)."""
  cfg = config.losses
  return (cfg.generator_adversarial_weight > 0 and
          cfg.discriminator_start_step < config.num_train_steps)


def build_optimizers(config: ml_collections.ConfigDict):
  """{"generator": tx, "discriminator": tx}."""
  return {"generator": optimizers.create_optimizer(config.optimizer,
                                                   config.num_train_steps),
          "discriminator": optimizers.create_optimizer(
              config.d_optimizer, config.num_train_steps)}


def reconstruct(model: vqgan_lib.VQGAN, params, images: jnp.ndarray
                ) -> jnp.ndarray:
  """Images through the tokenizer and back, clipped to [0, 1]."""
  recon = vqgan_lib.apply_in_streams(model, params, images)[0]
  return jnp.clip(recon, 0.0, 1.0)


def init_state(config: ml_collections.ConfigDict, model: vqgan_lib.VQGAN,
               disc: discriminator_lib.Discriminator, txs,
               rng: jax.Array) -> Dict[str, state_lib.TrainState]:
  g_rng, d_rng, run_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  g_params = model.init(g_rng, images)["params"]
  d_params = disc.init(d_rng, images)["params"]
  key_data = jax.random.key_data(run_rng)
  return {"generator": state_lib.TrainState.create(
              g_params, txs["generator"], key_data),
          "discriminator": state_lib.TrainState.create(
              d_params, txs["discriminator"], key_data)}


def train_step(config: ml_collections.ConfigDict, model: vqgan_lib.VQGAN,
               disc: discriminator_lib.Discriminator, txs,
               perceptual: Optional[PerceptualFn],
               state: Dict[str, state_lib.TrainState],
               batch: Dict[str, jnp.ndarray]):
  """One generator and one discriminator update on {"image": [B,H,W,3]}.

  With config.grad_accum_steps = K > 1 each player's gradients and losses
  are averaged over K micro-batches (accumulate.py); the reconstructions
  and code indices are kept for the whole batch, for the discriminator's
  fakes, PSNR and the code histogram.
  """
  g_state, d_state = state["generator"], state["discriminator"]
  cfg = config.losses
  steps = config.grad_accum_steps
  images = batch["image"].astype(jnp.float32)
  gan_on = (g_state.step >= cfg.discriminator_start_step).astype(jnp.float32)
  reconstruction_loss = RECONSTRUCTION[cfg.reconstruction]

  def generator_loss(g_params, images):
    recon, indices, q_losses = vqgan_lib.apply_in_streams(
        model, g_params, images, train=True)
    terms = dict(q_losses)
    terms["reconstruction_loss"] = reconstruction_loss(recon, images)
    terms["perceptual_loss"] = (
        jnp.mean(perceptual(recon, images)) if perceptual is not None
        else jnp.zeros((), jnp.float32))
    if uses_gan(config):
      fake_logits = disc.apply({"params": d_state.params}, recon)
      terms["generator_adversarial_loss"] = losses.generator_loss(
          fake_logits, cfg.gan_loss)
    else:
      terms["generator_adversarial_loss"] = jnp.zeros((), jnp.float32)
    total = (cfg.reconstruction_weight * terms["reconstruction_loss"] +
             cfg.perceptual_weight * terms["perceptual_loss"] +
             terms["quantizer_loss"] +
             gan_on * cfg.generator_adversarial_weight *
             terms["generator_adversarial_loss"])
    return total, (recon, indices, terms)

  def generator_micro_step(micro, _):
    (total, (recon, indices, terms)), grads = jax.value_and_grad(
        generator_loss, has_aux=True)(g_state.params, micro["image"])
    return (total, grads, terms), (recon, indices)

  (g_total, g_grads, terms), (recon, indices) = (
      accumulate.mean_over_microbatches(generator_micro_step,
                                        {"image": images}, steps))
  fake = jax.lax.stop_gradient(recon)

  def discriminator_loss(d_params, images, fake):
    apply = lambda x: disc.apply({"params": d_params}, x)
    adversarial = losses.discriminator_loss(apply(images), apply(fake),
                                            cfg.gan_loss)
    r1 = losses.r1_penalty(apply, images)
    return adversarial + cfg.r1_weight * r1, (adversarial, r1)

  def discriminator_update(d_state):
    def micro_step(micro, _):
      (total, aux), grads = jax.value_and_grad(
          discriminator_loss, has_aux=True)(d_state.params, micro["image"],
                                            micro["fake"])
      return (total, aux, grads), None

    (d_total, (d_adversarial, r1), d_grads), _ = (
        accumulate.mean_over_microbatches(
            micro_step, {"image": images, "fake": fake}, steps))
    new_d_state = d_state.apply_gradients(d_grads, txs["discriminator"], 0.0)
    d_skipped = jnp.zeros((), jnp.float32)
    if config.on_nonfinite == "skip":
      new_d_state, d_skipped = state_lib.keep_if_finite(
          d_total, d_grads, new_d_state, d_state)
    return new_d_state, (d_total, d_adversarial, r1, d_skipped)

  def discriminator_waits(d_state):
    # Before the start step the whole discriminator state (parameters,
    # Adam moments and step count) stays as initialised: stepping Adam on
    # zero gradients would inflate its first real updates.
    zero = jnp.zeros((), jnp.float32)
    return d_state, (zero, zero, zero, zero)

  if uses_gan(config):
    d_state, (d_total, d_adversarial, r1, d_skipped) = jax.lax.cond(
        gan_on > 0, discriminator_update, discriminator_waits, d_state)
  else:  # The discriminator never plays: skip its cost entirely.
    d_state, (d_total, d_adversarial, r1, d_skipped) = discriminator_waits(
        d_state)

  new_g_state = g_state.apply_gradients(g_grads, txs["generator"],
                                        config.ema_decay)
  skipped = jnp.zeros((), jnp.float32)
  if config.on_nonfinite == "skip":
    new_g_state, skipped = state_lib.keep_if_finite(
        g_total, g_grads, new_g_state, g_state)
    skipped = jnp.maximum(skipped, d_skipped)
  new_state = {"generator": new_g_state, "discriminator": d_state}
  metrics = dict(terms)
  metrics.update(
      loss=g_total, generator_loss=g_total, discriminator_loss=d_total,
      discriminator_adversarial_loss=d_adversarial, r1_penalty=r1,
      skipped_updates=skipped,
      psnr=jnp.mean(losses.psnr(jnp.clip(recon, 0.0, 1.0), images)),
      code_counts=jnp.bincount(indices.reshape(-1),
                               length=model.codebook_size))
  return new_state, metrics


def step_functions(config: ml_collections.ConfigDict):
  """(init_state, train_step, batch shapes) without data or LPIPS weights.

  init_state(rng) -> state and train_step(state, batch, lpips_params) ->
  (state, metrics) are what `make_stage` gives the loop; `lpips_params`
  (the loop's constants) are the frozen LPIPS weights when
  losses.perceptual_weight > 0, else None. The global batch is described
  as ShapeDtypeStructs {"image": float32 [B, S, S, 3], "label": int32 [B]}.
  `tools.plan` compiles these on a virtual mesh.
  """
  model = build.tokenizer(config)
  disc = build.discriminator(config)
  txs = build_optimizers(config)
  lpips = None
  if config.losses.perceptual_weight > 0:
    from maskgit_jax.models import perceptual
    lpips = perceptual.LPIPS()

  def step(state, batch, lpips_params):
    fn = None if lpips is None else (
        lambda x, y: lpips.apply({"params": lpips_params}, x, y))
    return train_step(config, model, disc, txs, fn, state, batch)

  size, side = config.batch_size, config.data.image_size
  batch_shapes = {"image": jax.ShapeDtypeStruct((size, side, side, 3),
                                                jnp.float32),
                  "label": jax.ShapeDtypeStruct((size,), jnp.int32)}
  return (lambda rng: init_state(config, model, disc, txs, rng), step,
          batch_shapes)


class CodebookUsage:
  """Codebook usage and perplexity over the last `window` training steps.

  The loop hands `summarize` the per-step metrics of each logging window;
  the code counts of the newest `window` steps are kept across calls, so
  usage is measured over `config.codebook_usage_window` steps whatever the
  logging interval (fewer right after a start or resume).
  """

  def __init__(self, window: int):
    self.recent = collections.deque(maxlen=int(window))

  def __call__(self, metrics: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
    scalars = loop.mean_scalars(metrics)
    self.recent.extend(np.asarray(m["code_counts"]) for m in metrics)
    counts = np.sum(self.recent, axis=0)
    scalars["codebook_usage"] = float(losses.usage_from_counts(counts))
    scalars["codebook_perplexity"] = float(
        losses.perplexity_from_counts(counts))
    return scalars


def make_stage(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
  """The tokenizer's modules, step, data and evaluation for the loop."""
  validate(config)
  run = workdir_lib.Workdir(workdir)
  init_fn, step, _ = step_functions(config)
  perceptual_params = None
  if config.losses.perceptual_weight > 0:
    from maskgit_jax.models import perceptual
    perceptual_params = perceptual.load_lpips_params()

  eval_batch = next(input_pipeline.make_image_iterator(
      config.data, split=config.data.eval_split,
      global_batch_size=config.num_eval_images, seed=config.seed,
      train=False, process_index=0, process_count=1))["image"]
  # Evaluation runs the EMA weights in float32, whatever the training dtype.
  eval_model = build.tokenizer(config, dtype="float32")
  reconstruct_fn = jax.jit(functools.partial(reconstruct, eval_model))

  def evaluate(state, step_number):
    recon = np.asarray(reconstruct_fn(
        jax.device_get(state["generator"].ema_params), eval_batch))
    images_lib.save_pairs(eval_batch, recon, str(
        run.images / f"reconstructions_{step_number:08d}.png"))
    return {"eval_psnr": float(np.mean(losses.psnr(recon, eval_batch)))}

  return loop.Stage(
      init_state=init_fn,
      train_step=step,
      make_iterator=lambda: input_pipeline.make_image_iterator(
          config.data, split=config.data.train_split,
          global_batch_size=config.batch_size, seed=config.seed, train=True),
      evaluate=evaluate, summarize=CodebookUsage(config.codebook_usage_window),
      constants=perceptual_params)


# ------------------------------------------------------------------ modes

def tokenize_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=tokenize: encodes the training split's views (config.tokenize)
  into the token cache stage 2 reads; see `token_cache`.

  As in `evaluate_mode`, the model comes from the workdir and the data (and
  the views) from this run's config. In a job of several processes each
  encodes its share of the records on its own devices (every encoder batch
  split over them when it divides evenly) and process 0 assembles the one
  cache.
  """
  from maskgit_jax.evaluation import generation
  from maskgit_jax.train import token_cache
  sharding = generation.local_batch_sharding(
      token_cache.encoder_batch_size(config))  # Checks config.tokenize.
  run = workdir_lib.Workdir(workdir)
  _, model, params = run.load_tokenizer()  # On this process's first device.
  if sharding is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()))
  # Each image is encoded on its own, so the batch runs as slices, as in
  # training.
  encode_fn = jax.jit(lambda p, x: streams.in_streams(
      lambda x: model.apply({"params": p}, x,
                            method=model.encode_to_indices), x,
      num_streams=vqgan_lib.stream_count(x.shape[0])))

  def encode(images: np.ndarray) -> jax.Array:
    if sharding is not None:
      images = jax.device_put(images, sharding)
    return encode_fn(params, images)

  return token_cache.write_token_cache(
      config, encode, os.fspath(run.token_cache), int(model.codebook_size))
