"""Reading finished (or running) workdirs: config, models and EMA weights."""

import json
import os
from typing import Any, Optional, Tuple

import jax
import ml_collections

from maskgit_jax import checkpoints

CONFIG_FILE = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: {workdir!r} is not a maskgit_jax workdir "
        "(train one with `python -m maskgit_jax.main --config=... "
        f"--workdir={workdir}`).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_state(workdir: str, init_state, step: Optional[int] = None
                  ) -> Tuple[int, Any]:
  """Restores the train state (no data iterator) on the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  abstract = checkpoints.abstract_like(
      abstract, jax.tree.map(lambda _: device, abstract))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  async_save=False)
  try:
    restored_step, state = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints.")
  return restored_step, state


def tokenizer_from_workdir(workdir: str, step: Optional[int] = None):
  """(config, VQGAN module, EMA generator params)."""
  from maskgit_jax.train import tokenizer_stage
  config = load_config(workdir)
  if config.stage != "tokenizer":
    raise ValueError(f"{workdir} holds a {config.stage!r} run, not a "
                     "tokenizer.")
  model = tokenizer_stage.build_tokenizer(config)
  disc = tokenizer_stage.build_discriminator(config)
  _, state = restore_state(
      workdir, lambda rng: tokenizer_stage.init_state(
          config, model, disc, tokenizer_stage.build_optimizers(config), rng),
      step)
  return config, model, state["generator"].ema_params


def token_dir(tokenizer_workdir: str) -> str:
  return os.path.join(tokenizer_workdir, "tokens", "train")


def transformer_from_workdir(workdir: str, codebook_size: int,
                             num_tokens: int, step: Optional[int] = None):
  """(config, MaskGITTransformer module, EMA params)."""
  from maskgit_jax.train import transformer_stage
  config = load_config(workdir)
  if config.stage != "transformer":
    raise ValueError(f"{workdir} holds a {config.stage!r} run, not a "
                     "transformer.")
  model = transformer_stage.build_model(config, codebook_size, num_tokens)
  _, state = restore_state(
      workdir, lambda rng: transformer_stage.init_state(
          model, transformer_stage.build_optimizer(config), rng),
      step)
  return config, model, state.ema_params


def pipeline_from_workdirs(cls, tokenizer_workdir: str,
                           transformer_workdir: str, step: Optional[int]):
  k_config, tokenizer, k_params = tokenizer_from_workdir(tokenizer_workdir)
  from maskgit_jax.data import tokens as tokens_lib
  if tokens_lib.is_token_dataset(token_dir(tokenizer_workdir)):
    # The grid the transformer was trained on (e.g. 512px through a 256px
    # tokenizer config).
    token_shape = tuple(tokens_lib.TokenSource(
        token_dir(tokenizer_workdir)).token_shape)
  else:
    size = k_config.data.image_size // tokenizer.downsample_factor
    token_shape = (size, size)
  t_config, transformer, t_params = transformer_from_workdir(
      transformer_workdir, tokenizer.codebook_size,
      token_shape[0] * token_shape[1], step)
  return cls(tokenizer, k_params, transformer, t_params,
             token_shape=token_shape, mask_schedule=t_config.mask_schedule)
