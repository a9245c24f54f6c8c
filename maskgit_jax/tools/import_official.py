r"""Converts a released MaskGIT checkpoint pair into two maskgit_jax workdirs.

  python -m maskgit_jax.tools.import_official \
      --tokenizer=checkpoints/tokenizer_imagenet256_checkpoint \
      --transformer=checkpoints/maskgit_imagenet256_checkpoint \
      --out=workdirs/official256

writes OUT/tokenizer and OUT/transformer, each with config.json and a
step-0 checkpoint whose parameters (and EMA) are the official weights.
`Pipeline.from_workdirs(OUT/tokenizer, OUT/transformer)` samples from them,
and training from them fine-tunes: the discriminator (not released) and the
optimizer states start fresh. Nothing is overwritten: OUT must not hold
workdirs yet.
"""

import functools
import os

from absl import app
from absl import flags
import jax

from maskgit_jax import config_base
from maskgit_jax import official
from maskgit_jax import parallel
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.models import build
from maskgit_jax.train import tokenizer_stage
from maskgit_jax.train import transformer_stage

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Official tokenizer file.")
_TRANSFORMER = flags.DEFINE_string("transformer", None,
                                   "Official transformer file.")
_OUT = flags.DEFINE_string("out", None, "Folder for the two workdirs.")


def tokenizer_config(model, image_size: int):
  c = config_base.tokenizer_config()
  c.data.name = "imagenet2012"
  c.data.eval_split = "validation"
  c.data.image_size = image_size
  c.vqgan.update(filters=model.filters,
                 channel_multipliers=tuple(model.channel_multipliers),
                 num_res_blocks=model.num_res_blocks,
                 embedding_dim=model.embedding_dim,
                 codebook_size=model.codebook_size,
                 conv_downsample=model.conv_downsample)
  c.batch_size = 256
  return c


def transformer_config(model, tokenizer_workdir: str):
  c = config_base.transformer_config()
  c.tokenizer_workdir = tokenizer_workdir
  c.num_classes = model.num_classes
  c.transformer.update(hidden_size=model.hidden_size,
                       num_layers=model.num_layers,
                       num_heads=model.num_heads, mlp_dim=model.mlp_dim)
  c.batch_size = 256
  return c


def save_step0(workdir: str, state) -> None:
  ckpt = workdir_lib.Workdir(workdir).checkpointer(async_save=False)
  try:
    ckpt.save(0, state, force=True)
  finally:
    ckpt.close()


def import_official(tokenizer_path: str, transformer_path: str,
                    out: str) -> tuple:
  """Writes OUT/tokenizer and OUT/transformer; returns their paths."""
  k_model, k_params, t_model, t_params = official.load_official(
      tokenizer_path, transformer_path)
  k_dir, t_dir = os.path.join(out, "tokenizer"), os.path.join(out, "transformer")
  for d in (k_dir, t_dir):
    if os.path.exists(d) and os.listdir(d):
      raise FileExistsError(f"{d} is not empty; choose another --out.")
  side = int(round(t_model.num_tokens**0.5))
  k_config = tokenizer_config(k_model, side * k_model.downsample_factor)
  t_config = transformer_config(t_model, k_dir)

  model = build.tokenizer(k_config)
  disc = build.discriminator(k_config)
  state = parallel.initialize(functools.partial(
      tokenizer_stage.init_state, k_config, model, disc,
      tokenizer_stage.build_optimizers(k_config)),
      jax.random.key(k_config.seed))
  state["generator"] = state["generator"].replace(params=k_params,
                                                  ema_params=k_params)
  workdir_lib.Workdir(k_dir).write_config(k_config)
  save_step0(k_dir, state)

  model = build.transformer(t_config, t_model.codebook_size,
                            t_model.num_tokens)
  state = parallel.initialize(functools.partial(
      transformer_stage.init_state, model,
      transformer_stage.build_optimizer(t_config)),
      jax.random.key(t_config.seed))
  state = state.replace(params=t_params, ema_params=t_params)
  workdir_lib.Workdir(t_dir).write_config(t_config)
  save_step0(t_dir, state)
  return k_dir, t_dir


def main(argv):
  del argv
  k_dir, t_dir = import_official(_TOKENIZER.value, _TRANSFORMER.value,
                                 _OUT.value)
  print(f"Wrote {k_dir} and {t_dir}.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["tokenizer", "transformer", "out"])
  app.run(main)
