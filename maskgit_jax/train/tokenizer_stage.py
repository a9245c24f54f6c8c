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
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import input_pipeline
from maskgit_jax.models import build
from maskgit_jax.models import discriminator as discriminator_lib
from maskgit_jax.models import vqgan as vqgan_lib
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
  return jnp.clip(model.apply({"params": params}, images)[0], 0.0, 1.0)


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
  """One generator and one discriminator update on {"image": [B,H,W,3]}."""
  g_state, d_state = state["generator"], state["discriminator"]
  cfg = config.losses
  images = batch["image"].astype(jnp.float32)
  gan_on = (g_state.step >= cfg.discriminator_start_step).astype(jnp.float32)
  reconstruction_loss = RECONSTRUCTION[cfg.reconstruction]

  def generator_loss(g_params):
    recon, indices, q_losses = model.apply({"params": g_params}, images,
                                           train=True)
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

  (g_total, (recon, indices, terms)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(g_state.params)
  fake = jax.lax.stop_gradient(recon)

  def discriminator_loss(d_params):
    apply = lambda x: disc.apply({"params": d_params}, x)
    adversarial = losses.discriminator_loss(apply(images), apply(fake),
                                            cfg.gan_loss)
    r1 = losses.r1_penalty(apply, images)
    return adversarial + cfg.r1_weight * r1, (adversarial, r1)

  def discriminator_update(d_state):
    (d_total, (d_adversarial, r1)), d_grads = jax.value_and_grad(
        discriminator_loss, has_aux=True)(d_state.params)
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
  model = build.tokenizer(config)
  disc = build.discriminator(config)
  txs = build_optimizers(config)
  perceptual_params = perceptual_fn = None
  if config.losses.perceptual_weight > 0:
    from maskgit_jax.models import perceptual
    perceptual_params = perceptual.load_lpips_params()
    lpips = perceptual.LPIPS()
    perceptual_fn = lambda p, x, y: lpips.apply({"params": p}, x, y)

  def step(state, batch, lpips_params):
    fn = (None if perceptual_fn is None else
          functools.partial(perceptual_fn, lpips_params))
    return train_step(config, model, disc, txs, fn, state, batch)

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
      init_state=lambda rng: init_state(config, model, disc, txs, rng),
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
  the views) from this run's config.
  """
  from maskgit_jax.train import token_cache
  if jax.process_count() > 1:  # Each process would write the whole cache.
    raise ValueError(
        f"--mode=tokenize runs as one process for now; this job has "
        f"{jax.process_count()}. Run it once without the multi-process "
        "launcher (e.g. `python -m maskgit_jax.main --mode=tokenize ...`).")
  run = workdir_lib.Workdir(workdir)
  _, model, params = run.load_tokenizer()
  encode_fn = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, method=model.encode_to_indices))
  return token_cache.write_token_cache(
      config, lambda images: encode_fn(params, images),
      os.fspath(run.token_cache), int(model.codebook_size))
