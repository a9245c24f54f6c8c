r"""MaskGIT tokenizer on ImageNet 256x256: the official hyperparameters.

VQGAN without attention, codebook 1024 x 256, 16x downsampling (16x16
tokens), entropy loss 0.1, commitment 0.25, LPIPS weight 0.1, non-saturating
GAN loss weight 0.1, R1 penalty 10, Adam(0, 0.99) at 1e-4, batch 256.
ImageNet must be prepared as array_record first (see maskgit_jax.data).

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd maskgit_jax && python -m maskgit_jax.main \
       --config=configs/vqgan_imagenet256.py --workdir=gs://$BUCKET/vqgan256"
"""

from maskgit_jax import config_base


def get_config(arg: str = ""):
  del arg
  c = config_base.tokenizer_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.eval_split = "validation"  # imagenet2012's test split has no labels
  c.batch_size = 256
  c.eval_batch_size = 128
  c.num_train_steps = 1_000_000
  c.checkpoint_every_steps = 10_000
  c.eval_every_steps = 10_000
  c.log_every_steps = 100
  c.optimizer.update(learning_rate=1e-4, b1=0.0, b2=0.99)
  c.d_optimizer.update(learning_rate=1e-4, b1=0.0, b2=0.99)
  c.dtype = "bfloat16"
  # Stage 2 on ImageNet trains for hundreds of epochs; a fixed centre crop
  # would let it see each image only twice (with the mirror), so store 10
  # random resized crops and their mirrors (20 views: about 26 GB of tokens
  # for the 1.28M training images at 16x16).
  c.tokenize.num_crops = 10
  return c
