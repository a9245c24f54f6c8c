r"""MaskGIT transformer on ImageNet 512x512 (32x32 = 1024 tokens).

Same model and optimiser as configs/maskgit_imagenet256.py; the tokenizer
workdir must hold a 512x512 token cache (the same tokenizer, tokenized at
512).

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd maskgit_jax && python -m maskgit_jax.main \
       --config=configs/maskgit_imagenet512.py --workdir=gs://$BUCKET/maskgit512 \
       --config.tokenizer_workdir=gs://$BUCKET/vqgan512"
"""

import os

from maskgit_jax import config_base


def get_config(arg: str = ""):
  del arg
  c = config_base.from_file(os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "maskgit_imagenet256.py"))
  c.tokenizer_workdir = "workdirs/vqgan_imagenet512"
  c.sampling.num_iter = 12
  return c
