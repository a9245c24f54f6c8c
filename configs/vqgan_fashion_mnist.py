r"""Tokenizer on Fashion-MNIST at 32x32, sized for a 2-core CPU (the demo).

8x8 tokens from a 128-entry codebook. On a 2-core CPU the adversarial game
(discriminator + R1) and LPIPS each make a step about 6x slower, so the demo
trains the VQ autoencoder with the L2 and quantizer losses only; the full
objective is one override away:
  --config.losses.perceptual_weight=0.1 \
  --config.losses.generator_adversarial_weight=0.1

  python -m maskgit_jax.main --config=configs/vqgan_fashion_mnist.py \
      --workdir=workdirs/vqgan_fashion_mnist

then `--mode=tokenize` on the same workdir writes the token cache that
configs/maskgit_fashion_mnist.py trains on. Variants: `:tiny` (a few steps,
for tests).
"""

from maskgit_jax import config_base


def get_config(arg: str = ""):
  c = config_base.tokenizer_config()
  c.data.name = "fashion_mnist"
  c.data.image_size = 32
  # Decoded once (47 MiB) instead of at every read: a 32-image training
  # batch took 14 ms instead of 36 on 2 cores, with the same batches.
  c.data.in_memory = True
  c.vqgan.update(filters=16, channel_multipliers=(1, 2, 4), num_res_blocks=1,
                 embedding_dim=32, codebook_size=128, num_groups=8)
  c.discriminator.update(max_filters=64)
  c.losses.update(perceptual_weight=0.0, generator_adversarial_weight=0.0,
                  discriminator_start_step=500, r1_weight=1.0)
  c.optimizer.update(learning_rate=5e-4, b1=0.9)
  c.d_optimizer.learning_rate = 4e-4
  c.batch_size = 32
  c.num_train_steps = 1200
  c.checkpoint_every_steps = 400
  c.eval_every_steps = 400
  c.log_every_steps = 25
  c.ema_decay = 0.99
  # LPIPS (VGG16) costs ~0.1 s an image on 2 CPU cores: 128 test images
  # (its standard error over them is about 0.005).
  c.eval.update(feature_network="classifier", num_reference=10_000,
                lpips_images=128)
  # The token cache holds each image's centre crop, not its mirror image:
  # Fashion-MNIST's shoes face one way (all ankle boots and 99.7% of
  # sneakers lie nearer their class's mean image than their mirror images
  # do), and a transformer trained on mirror images too drew worse samples
  # (FID 81 against 50 at the same recipe and sampling). One view also
  # halves the tokenize time.
  c.tokenize.flip = False
  if arg == "tiny":
    c.vqgan.update(filters=8, embedding_dim=8, codebook_size=16, num_groups=4)
    c.discriminator.update(max_filters=8)
    # The tiny run exercises every loss term, LPIPS and the GAN included.
    c.losses.update(discriminator_start_step=2, perceptual_weight=0.1,
                    generator_adversarial_weight=0.1)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_train_steps = 4
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 4
    c.log_every_steps = 1
    c.num_eval_images = 4
    c.tokenize.flip = True  # The tests cover a cache of two views.
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; valid: '' or 'tiny'.")
  return c
