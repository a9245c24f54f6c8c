"""What `main.py --mode=...` runs: build a stage from its config and run it.

Workdir layout (the workdir is the only state):

  config.json          resolved config (earlier differing ones kept as
                       config.<n>.json)
  checkpoints/<step>/  orbax: train state + data iterator position
  metrics.jsonl        one JSON object per logged step
  tensorboard/         event files
  images/              PNG grids (reconstructions or samples) per eval step
  tokens/train/        tokenizer only: the token cache (--mode=tokenize)
"""

import functools
import json
import logging
import os
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
import tqdm

from maskgit_jax import losses
from maskgit_jax import schedules
from maskgit_jax.data import input_pipeline
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import images as images_lib
from maskgit_jax.train import loop
from maskgit_jax.train import restore
from maskgit_jax.train import tokenizer_stage
from maskgit_jax.train import transformer_stage

STAGES = ("tokenizer", "transformer")


# ----------------------------------------------------------------- config

def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json, keeping a differing earlier one as config.<n>.json."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, restore.CONFIG_FILE)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.rename(path, os.path.join(workdir, f"config.{n}.json"))
    logging.warning("Config differs from the one %s was started with; the "
                    "old one is kept as config.%d.json.", workdir, n)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a config before anything is compiled."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; valid: {STAGES}.")
  if config.on_nonfinite not in ("error", "skip"):
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; valid: "
                     "'error', 'skip'.")
  for key in ("num_train_steps", "batch_size", "checkpoint_every_steps",
              "log_every_steps", "eval_every_steps"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
  if config.stage == "tokenizer":
    factor = 2**(len(config.vqgan.channel_multipliers) - 1)
    if config.data.image_size % factor:
      raise ValueError(
          f"data.image_size={config.data.image_size} is not divisible by the "
          f"tokenizer's downsampling factor {factor} (2 ** (len("
          f"channel_multipliers) - 1)).")
    if config.losses.reconstruction not in tokenizer_stage.RECONSTRUCTION:
      raise ValueError(
          f"losses.reconstruction={config.losses.reconstruction!r}; valid: "
          f"{sorted(tokenizer_stage.RECONSTRUCTION)}.")
  else:
    schedules.validate(config.mask_schedule)
    if not config.tokenizer_workdir:
      raise ValueError("config.tokenizer_workdir is empty: name the workdir "
                       "of a trained tokenizer.")


# ---------------------------------------------------------------- stage 1

def tokenizer_stage_for(config, workdir) -> loop.Stage:
  model = tokenizer_stage.build_tokenizer(config)
  disc = tokenizer_stage.build_discriminator(config)
  txs = tokenizer_stage.build_optimizers(config)
  perceptual_params = None
  if config.losses.perceptual_weight > 0:
    from maskgit_jax.models import perceptual
    perceptual_params = perceptual.load_lpips_params()
    lpips = perceptual.LPIPS()
    perceptual_fn = lambda p, x, y: lpips.apply({"params": p}, x, y)
  else:
    perceptual_fn = None

  def train_step(state, batch, lpips_params):
    fn = (None if perceptual_fn is None else
          functools.partial(perceptual_fn, lpips_params))
    return tokenizer_stage.train_step(config, model, disc, txs, fn, state,
                                      batch)

  def summarize(window):
    scalars = loop.mean_scalars(window)
    counts = np.sum([m["code_counts"] for m in window], axis=0)
    scalars["codebook_usage"] = float(losses.usage_from_counts(counts))
    scalars["codebook_perplexity"] = float(
        losses.perplexity_from_counts(counts))
    return scalars

  eval_batch = next(input_pipeline.make_image_iterator(
      config.data, split=config.data.eval_split,
      global_batch_size=config.num_eval_images, seed=config.seed,
      train=False, process_index=0, process_count=1))["image"]
  reconstruct = jax.jit(functools.partial(tokenizer_stage.reconstruct, model))

  def evaluate(state, step):
    recon = np.asarray(reconstruct(
        jax.device_get(state["generator"].ema_params), eval_batch))
    images_lib.save_pairs(eval_batch, recon, os.path.join(
        workdir, "images", f"reconstructions_{step:08d}.png"))
    return {"eval_psnr": float(np.mean(losses.psnr(recon, eval_batch)))}

  return loop.Stage(
      init_state=lambda rng: tokenizer_stage.init_state(config, model, disc,
                                                        txs, rng),
      train_step=train_step,
      make_iterator=lambda: input_pipeline.make_image_iterator(
          config.data, split=config.data.train_split,
          global_batch_size=config.batch_size, seed=config.seed, train=True),
      evaluate=evaluate, summarize=summarize, constants=perceptual_params)


# ---------------------------------------------------------------- stage 2

def tokenize_command(config) -> str:
  return (f"python -m maskgit_jax.main --config=<tokenizer config> "
          f"--workdir={config.tokenizer_workdir} --mode=tokenize")


def transformer_stage_for(config, workdir) -> loop.Stage:
  token_dir = restore.token_dir(config.tokenizer_workdir)
  hint = f"Write it with: {tokenize_command(config)}"
  source = tokens_lib.TokenSource(token_dir, missing_hint=hint)
  meta = source.metadata
  codebook_size = int(meta["codebook_size"])
  if "num_classes" in meta and int(meta["num_classes"]) > config.num_classes:
    raise ValueError(f"The token dataset has {meta['num_classes']} classes but "
                     f"config.num_classes={config.num_classes}.")
  height, width = source.token_shape
  model = transformer_stage.build_model(config, codebook_size, height * width)
  tx = transformer_stage.build_optimizer(config)

  def sample_grid(state, step):
    from maskgit_jax.pipeline import Pipeline
    _, tokenizer, k_params = restore.tokenizer_from_workdir(
        config.tokenizer_workdir)
    pipe = Pipeline(tokenizer, k_params, model,
                    jax.device_get(state.ema_params),
                    token_shape=(height, width),
                    mask_schedule=config.mask_schedule)
    return images_lib.sample_grid(pipe, config, os.path.join(
        workdir, "images", f"samples_{step:08d}.png"))

  return loop.Stage(
      init_state=lambda rng: transformer_stage.init_state(model, tx, rng),
      train_step=lambda state, batch, _: transformer_stage.train_step(
          config, model, tx, state, batch),
      make_iterator=lambda: tokens_lib.make_token_iterator(
          token_dir, global_batch_size=config.batch_size, seed=config.seed,
          missing_hint=hint),
      evaluate=sample_grid)


# ------------------------------------------------------------------ modes

def train(config, workdir) -> Any:
  validate(config)
  write_config(config, workdir)
  build = (tokenizer_stage_for if config.stage == "tokenizer" else
           transformer_stage_for)
  return loop.train_and_evaluate(config, workdir, build(config, workdir))


def tokenize(config, workdir) -> str:
  """Encodes the training split (and its mirror image) into the token cache."""
  if config.stage != "tokenizer":
    raise ValueError("--mode=tokenize needs a tokenizer config and workdir, "
                     f"got stage {config.stage!r}.")
  _, model, params = restore.tokenizer_from_workdir(workdir)
  data = config.data  # As in evaluate_tokenizer: the data of this run.
  out = restore.token_dir(workdir)
  if tokens_lib.is_token_dataset(out):
    loop.announce(f"Token cache {out} exists; nothing to do.")
    return out
  encode = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, method=model.encode_to_indices))
  iterator = input_pipeline.make_image_iterator(
      data, split=data.train_split,
      global_batch_size=config.tokenize_batch_size, seed=config.seed,
      train=False, process_index=0, process_count=1)
  from maskgit_jax.data import sources
  total = len(sources.build_source(data, data.train_split))
  all_tokens, all_labels = [], []
  for batch in tqdm.tqdm(iterator, desc="tokenize", unit="batch",
                         total=-(-total // config.tokenize_batch_size)):
    images = batch["image"]
    for view in (images, images[:, :, ::-1]):
      all_tokens.append(np.asarray(encode(params, view)))
      all_labels.append(batch["label"])
  meta = {"codebook_size": int(model.codebook_size),
          "image_size": int(data.image_size),
          "dataset": data.name, "split": data.train_split,
          "num_classes": int(sources.num_classes(data)),
          "flips": True}
  tokens_lib.write_token_dataset(out, np.concatenate(all_tokens),
                                 np.concatenate(all_labels), meta)
  loop.announce(f"Wrote {sum(map(len, all_tokens))} token grids to {out}.")
  return out


def sample(config, workdir) -> str:
  from maskgit_jax.pipeline import Pipeline
  pipe = Pipeline.from_workdirs(config.tokenizer_workdir, workdir)
  path = os.path.join(workdir, "images", "samples.png")
  images_lib.sample_grid(pipe, config, path)
  return path


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  if mode == "train":
    return train(config, workdir)
  if mode == "tokenize":
    return tokenize(config, workdir)
  if mode in ("sample", "eval") and config.stage == "transformer":
    return sample(config, workdir)
  if mode == "eval":
    return evaluate_tokenizer(config, workdir)
  raise ValueError(f"--mode={mode} does not apply to a {config.stage} config.")


def evaluate_tokenizer(config, workdir) -> Dict[str, float]:
  """Reconstruction PSNR over the evaluation split, written to eval.json."""
  # The model comes from the workdir, the data from this run's config (an
  # imported official tokenizer is evaluated on whatever data is given).
  _, model, params = restore.tokenizer_from_workdir(workdir)
  reconstruct = jax.jit(functools.partial(tokenizer_stage.reconstruct, model))
  iterator = input_pipeline.make_image_iterator(
      config.data, split=config.data.eval_split,
      global_batch_size=config.eval_batch_size, seed=config.seed,
      train=False, process_index=0, process_count=1)
  values = []
  for batch in tqdm.tqdm(iterator, desc="eval", unit="batch"):
    values.append(np.asarray(losses.psnr(
        reconstruct(params, batch["image"]), batch["image"])))
  result = {"psnr": float(np.mean(np.concatenate(values)))}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  loop.announce(f"Reconstruction PSNR: {result['psnr']:.2f} dB")
  return result
