r"""MaskGIT transformer on ImageNet 256x256: the official hyperparameters.

24 layers, hidden 768, MLP 3072, 16 heads, dropout 0.1, label smoothing 0.1,
AdamW (0.9, 0.96) at 1e-4 with 5k warm-up steps and weight decay 0.045,
batch 256, cosine masking, 16x16 tokens.

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd maskgit_jax && python -m maskgit_jax.main \
       --config=configs/maskgit_imagenet256.py --workdir=gs://$BUCKET/maskgit256 \
       --config.tokenizer_workdir=gs://$BUCKET/vqgan256"
"""

from maskgit_jax import config_base


def get_config(arg: str = ""):
  del arg
  c = config_base.transformer_config()
  c.tokenizer_workdir = "workdirs/vqgan_imagenet256"
  c.num_classes = 1000
  c.batch_size = 256
  c.num_train_steps = 2_000_000
  c.checkpoint_every_steps = 10_000
  c.eval_every_steps = 10_000
  c.log_every_steps = 100
  c.dtype = "bfloat16"
  c.sampling.update(num_iter=8, choice_temperature=4.5)
  return c
