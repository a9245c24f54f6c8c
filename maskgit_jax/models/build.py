"""Config -> Flax modules, for training and inference alike.

Training (`train/`), inference (`pipeline`, `workdir`) and the import of
official checkpoints all build their modules here, so a workdir's saved
config always yields the module it was trained with. Nothing here builds
an optimizer or touches a checkpoint.
"""

import jax.numpy as jnp
import ml_collections

from maskgit_jax.models import discriminator as discriminator_lib
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The jnp dtype of `config.dtype` (parameters always stay float32)."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(DTYPES)}.")
  return DTYPES[name]


def tokenizer(config: ml_collections.ConfigDict,
              dtype: str = "") -> vqgan_lib.VQGAN:
  """The VQGAN of a tokenizer config; `dtype` overrides `config.dtype`."""
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
      dtype=compute_dtype(dtype or config.dtype))


def discriminator(
    config: ml_collections.ConfigDict) -> discriminator_lib.Discriminator:
  """The StyleGAN discriminator of a tokenizer config (training only)."""
  d = config.discriminator
  return discriminator_lib.Discriminator(
      image_size=config.data.image_size,
      channel_multiplier=d.channel_multiplier, max_filters=d.max_filters,
      blur_resample=d.blur_resample, dtype=compute_dtype(config.dtype))


def transformer(config: ml_collections.ConfigDict, codebook_size: int,
                num_tokens: int,
                dtype: str = "") -> transformer_lib.MaskGITTransformer:
  """The transformer of a stage-2 config over a given token grid.

  The codebook size and the number of image tokens come from the tokenizer
  (its token cache), not from this config.
  """
  t = config.transformer
  return transformer_lib.MaskGITTransformer(
      codebook_size=codebook_size, num_classes=config.num_classes,
      num_tokens=num_tokens, hidden_size=t.hidden_size,
      num_layers=t.num_layers, num_heads=t.num_heads, mlp_dim=t.mlp_dim,
      dropout_rate=t.dropout_rate,
      attention_dropout_rate=t.attention_dropout_rate,
      dtype=compute_dtype(dtype or config.dtype))
