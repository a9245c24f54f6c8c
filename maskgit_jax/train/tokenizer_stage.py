"""Stage 1: the VQGAN tokenizer, trained as a GAN.

Generator loss = reconstruction (L1 or L2) + LPIPS perceptual loss
+ quantizer losses (codebook, commitment, entropy) + adversarial loss.
Discriminator loss = non-saturating (or hinge) GAN loss + R1 penalty on real
images. Both players start their adversarial terms at
`losses.discriminator_start_step`; before that the tokenizer trains as a
plain VQ autoencoder. The EMA of the generator is what the token cache and
the Pipeline use.
"""

from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from maskgit_jax import losses
from maskgit_jax.models import discriminator as discriminator_lib
from maskgit_jax.models import vqgan as vqgan_lib
from maskgit_jax.train import optimizers
from maskgit_jax.train import state as state_lib
from maskgit_jax.train.transformer_stage import compute_dtype

RECONSTRUCTION = {"l1": losses.l1_loss, "l2": losses.l2_loss}
PerceptualFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  """Whether the adversarial game ever starts in this run (a static choice)."""
  cfg = config.losses
  return (cfg.generator_adversarial_weight > 0 and
          cfg.discriminator_start_step < config.num_train_steps)


def build_tokenizer(config: ml_collections.ConfigDict) -> vqgan_lib.VQGAN:
  v = config.vqgan
  return vqgan_lib.VQGAN(
      filters=v.filters, channel_multipliers=tuple(v.channel_multipliers),
      num_res_blocks=v.num_res_blocks, embedding_dim=v.embedding_dim,
      codebook_size=v.codebook_size, num_groups=v.num_groups,
      activation=v.activation, conv_downsample=v.conv_downsample,
      commitment_cost=v.commitment_cost,
      entropy_loss_ratio=v.entropy_loss_ratio,
      entropy_temperature=v.entropy_temperature,
      entropy_loss_type=v.entropy_loss_type,
      dtype=compute_dtype(config.dtype))


def build_discriminator(
    config: ml_collections.ConfigDict) -> discriminator_lib.Discriminator:
  d = config.discriminator
  return discriminator_lib.Discriminator(
      image_size=config.data.image_size,
      channel_multiplier=d.channel_multiplier, max_filters=d.max_filters,
      blur_resample=d.blur_resample, dtype=compute_dtype(config.dtype))


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
    return gan_on * (adversarial + cfg.r1_weight * r1), (adversarial, r1)

  if uses_gan(config):
    (d_total, (d_adversarial, r1)), d_grads = jax.value_and_grad(
        discriminator_loss, has_aux=True)(d_state.params)
    d_state = d_state.apply_gradients(d_grads, txs["discriminator"], 0.0)
  else:  # The discriminator never plays: skip its cost entirely.
    d_total = d_adversarial = r1 = jnp.zeros((), jnp.float32)
    d_state = d_state.replace(step=d_state.step + 1)

  new_g_state = g_state.apply_gradients(g_grads, txs["generator"],
                                        config.ema_decay)
  skipped = jnp.zeros((), jnp.float32)
  if config.on_nonfinite == "skip":
    new_g_state, skipped = state_lib.keep_if_finite(
        g_total, g_grads, new_g_state, g_state)
    if uses_gan(config):
      d_state, d_skipped = state_lib.keep_if_finite(
          d_total, d_grads, d_state, state["discriminator"])
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
