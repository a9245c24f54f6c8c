"""Default configs that every file in configs/ starts from.

Configs are code: a file in configs/ calls `tokenizer_config()` or
`transformer_config()` and overrides what differs. Every key a trainer reads
is defined here, so a typo in an override (`--config.bach_size=8`) fails
instead of being ignored.
"""

import importlib.util
import os

import ml_collections


def from_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file: what `--config=path:arg` loads."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _data_config(name: str = "fashion_mnist",
                 image_size: int = 32) -> ml_collections.ConfigDict:
  from maskgit_jax.data import data_config
  data = data_config.default_data_config()
  data.name = name
  data.image_size = image_size
  return data


def _common(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 42
  c.num_train_steps = 1000
  c.batch_size = 64                 # global, over all processes
  c.grad_accum_steps = 1            # micro-batches per step (accumulation)
  c.eval_batch_size = 64
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.eval_every_steps = 500          # and at the last step; 0: never
  c.dtype = "float32"               # compute dtype; parameters stay float32
  c.ema_decay = 0.999
  # Mesh axis sizes; -1 = all remaining devices. The batch is split over
  # `data` x `fsdp`; parameters are sharded over `fsdp` and `model` by
  # `sharding_rules`.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  # Logical axis -> mesh axis (None: replicated), tried in order, a repeated
  # name being a fallback (maskgit_jax/sharding.py). FSDP splits each large
  # parameter's largest dimension over `fsdp`; tensor parallelism splits
  # the transformer's heads and MLP hidden dimension over `model`.
  c.sharding_rules = (
      ("heads", "model"), ("mlp", "model"), ("mlp", "fsdp"),
      ("embed", "fsdp"), ("conv_in", "fsdp"), ("conv_out", "fsdp"),
      ("dense_in", "fsdp"), ("dense_out", "fsdp"), ("codes", "fsdp"),
      ("code_dim", "fsdp"), ("vocab", None), ("positions", None),
      ("qkv", None), ("kv", None), ("norm", None), ("conv_height", None),
      ("conv_width", None))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0, schedule="constant", grad_clip_norm=0.0))
  # Non-finite loss: "error" stops naming the step; "skip" drops the update.
  c.on_nonfinite = "error"
  # When checkpoints exist but none can be restored (all damaged): False
  # stops with an error listing them; True moves them to
  # checkpoints_damaged/ and trains from step 0.
  c.start_fresh_if_unrestorable = False
  return c


def _eval_config() -> ml_collections.ConfigDict:
  """`--mode=eval` settings (see maskgit_jax/evaluation/)."""
  return ml_collections.ConfigDict(dict(
      # Feature network for FID, IS and precision/recall: "inception" (the
      # FID InceptionV3; weights from `inception_weights`), "classifier"
      # (a small in-project classifier from `classifier`, for datasets such
      # as Fashion-MNIST where Inception is the wrong network) or "none"
      # (pixel metrics only).
      feature_network="inception",
      # An npz written by `python -m maskgit_jax.tools.convert_inception`.
      inception_weights="inception_fid.npz",
      classifier="",                # npz of evaluation.classifier
      # Reference statistics: an npz (ours, or an ADM reference batch such
      # as VIRTUAL_imagenet256_labeled.npz); empty = computed once from the
      # data's eval split and cached in `reference_cache_dir`.
      reference="",
      reference_cache_dir="~/.cache/maskgit_jax/reference",
      num_reference=50_000,         # real images for the reference
      num_samples=50_000,           # generated samples per seed and setting
      seeds=3,                      # mean and spread over this many seeds
      precision_recall_samples=10_000,  # feature rows kept per side
      cas=False,                    # classification accuracy score
      cas_train_steps=1500,         # steps of the classifier CAS trains
      lpips_images=50_000,          # tokenizer eval: images LPIPS covers
      name="",                      # eval/<name>.json; empty = from settings
      step=0,                       # transformer checkpoint; 0 = the newest
      # At most one list: sweeps that sampling setting (a PNG plots FID).
      sweep=ml_collections.ConfigDict(dict(
          num_iter=(), mask_schedule=(), choice_temperature=(),
          guidance_scale=(), temperature=())),
  ))


def tokenizer_config() -> ml_collections.ConfigDict:
  """Stage 1: VQGAN with perceptual and adversarial losses."""
  c = _common("tokenizer")
  c.data = _data_config()
  c.vqgan = ml_collections.ConfigDict(dict(
      filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
      embedding_dim=256, codebook_size=1024, num_groups=32,
      activation="swish", conv_downsample=False, commitment_cost=0.25,
      entropy_loss_ratio=0.1, entropy_temperature=0.01,
      entropy_loss_type="softmax"))
  c.discriminator = ml_collections.ConfigDict(dict(
      channel_multiplier=1, max_filters=512, blur_resample=True))
  c.losses = ml_collections.ConfigDict(dict(
      reconstruction="l2",          # "l1" or "l2"
      reconstruction_weight=1.0,
      perceptual_weight=0.1,        # LPIPS (VGG16)
      gan_loss="non-saturating",    # or "hinge"
      generator_adversarial_weight=0.1,
      r1_weight=10.0,
      discriminator_start_step=0))
  c.optimizer.b1 = 0.0
  c.optimizer.b2 = 0.99
  c.d_optimizer = ml_collections.ConfigDict(dict(c.optimizer))
  c.codebook_usage_window = 100     # steps over which code usage is counted
  c.num_eval_images = 16            # reconstructions drawn at eval intervals
  c.eval = _eval_config()
  # --mode=tokenize: the token cache stage 2 trains on, V views per image.
  c.tokenize = ml_collections.ConfigDict(dict(
      batch_size=256,   # images (views included) per encoder call
      # 0: the single centre crop; n > 0: n random resized crops per image,
      # drawn like the training augmentation (data.random_resized_crop_scale
      # and _ratio), seeded by `seed`; stage 2 draws one view per epoch.
      num_crops=0,
      flip=True))       # also store each view's mirror image
  return c


def transformer_config() -> ml_collections.ConfigDict:
  """Stage 2: bidirectional transformer on the tokenizer's token cache."""
  c = _common("transformer")
  c.tokenizer_workdir = ""          # required: the stage-1 workdir
  c.num_classes = 1000
  c.transformer = ml_collections.ConfigDict(dict(
      hidden_size=768, num_layers=24, num_heads=16, mlp_dim=3072,
      dropout_rate=0.1, attention_dropout_rate=0.1))
  c.mask_schedule = "cosine"
  c.label_smoothing = 0.1
  c.label_dropout = 0.0             # > 0 trains the unconditional model (CFG)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.96, weight_decay=0.045,
      warmup_steps=5000, schedule="cosine", grad_clip_norm=1.0))
  c.sampling = ml_collections.ConfigDict(dict(
      num_iter=8, choice_temperature=4.5, guidance_scale=0.0,
      # Softmax temperature of the token draws: 1 draws from the model's
      # distribution, as the official sampler does; above 1 gives more
      # varied samples, below 1 more typical ones.
      temperature=1.0,
      samples_per_class=4))
  c.eval = _eval_config()
  return c
