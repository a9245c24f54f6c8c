"""A run's workdir: the one place that knows its layout.

The workdir is a run's only state:

  config.json             the resolved config (a differing earlier one is
                          kept as config.<n>.json)
  checkpoints/<step>/     orbax: train state + data iterator position
  checkpoints_damaged/    unreadable checkpoints set aside, never deleted
  metrics.jsonl           one JSON object per logged step
  tensorboard/            event files
  images/                 PNG grids (reconstructions or samples)
  tokens/train/           tokenizer runs: the token cache (--mode=tokenize)
  eval/<name>.json        --mode=eval results (and a PNG for sweeps)

Paths are `etils.epath.Path`s, which orbax and TFDS also use, so a workdir
may live on a local disk or an object store. Reading weights for inference
restores only the EMA parameters from a checkpoint: no optimizer state, no
discriminator, nothing from `train/`.
"""

import json
import logging
import os
from typing import Any, List, Optional, Tuple, Union

import jax
import ml_collections
from etils import epath

from maskgit_jax import checkpoints as checkpoints_lib
from maskgit_jax.models import build

PathLike = Union[str, os.PathLike]
# Where each stage keeps the weights inference uses, inside the train state.
_EMA_PATHS = {"tokenizer": ("generator", "ema_params"),
              "transformer": ("ema_params",)}


class Workdir:
  """Paths of a run's directory, and what inference reads from it."""

  def __init__(self, path: PathLike):
    text = os.fspath(path)
    if "://" not in text:  # Local: absolute (orbax needs it), ~ expanded.
      text = os.path.abspath(os.path.expanduser(text))
    self.path = epath.Path(text)

  def __repr__(self) -> str:
    return f"Workdir({os.fspath(self.path)!r})"

  @property
  def config_file(self) -> epath.Path:
    return self.path / "config.json"

  def archived_config_file(self, n: int) -> epath.Path:
    return self.path / f"config.{n}.json"

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / "checkpoints"

  @property
  def damaged_checkpoints(self) -> epath.Path:
    return self.path / "checkpoints_damaged"

  @property
  def metrics_file(self) -> epath.Path:
    return self.path / "metrics.jsonl"

  @property
  def tensorboard(self) -> epath.Path:
    return self.path / "tensorboard"

  @property
  def images(self) -> epath.Path:
    return self.path / "images"

  @property
  def token_cache(self) -> epath.Path:
    return self.path / "tokens" / "train"

  @property
  def eval_dir(self) -> epath.Path:
    return self.path / "eval"

  def eval_result(self, name: str, suffix: str = ".json") -> epath.Path:
    """eval/<name>.json (or another suffix, e.g. the sweep's .png)."""
    return self.eval_dir / f"{name}{suffix}"

  def all_steps(self) -> List[int]:
    """Steps of the committed checkpoints, oldest first."""
    if not self.checkpoints.exists():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir()
                  if p.name.isdigit())

  def latest_step(self) -> Optional[int]:
    """The newest committed checkpoint's step (None if there is none)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # --- config ---------------------------------------------------------------

  def load_config(self) -> ml_collections.ConfigDict:
    if not self.config_file.exists():
      raise FileNotFoundError(
          f"{self.config_file} does not exist: {os.fspath(self.path)!r} is not "
          "a maskgit_jax workdir (train one with `python -m maskgit_jax.main "
          f"--config=... --workdir={os.fspath(self.path)}`).")
    return ml_collections.ConfigDict(json.loads(self.config_file.read_text()))

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes config.json on process 0; a differing earlier one is kept as
    config.<n>.json, never overwritten."""
    if jax.process_index() != 0:
      return
    self.path.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if self.config_file.exists():
      if self.config_file.read_text() == text:
        return
      n = 1
      while self.archived_config_file(n).exists():
        n += 1
      self.config_file.rename(self.archived_config_file(n))
      logging.warning("Config differs from the one %s was started with; the "
                      "old one is kept as %s.", self.path,
                      self.archived_config_file(n).name)
    tmp = self.path / (self.config_file.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(self.config_file)

  def checkpointer(self, **kwargs) -> checkpoints_lib.Checkpointer:
    return checkpoints_lib.Checkpointer(
        os.fspath(self.checkpoints),
        damaged_directory=os.fspath(self.damaged_checkpoints), **kwargs)

  # --- weights for inference ------------------------------------------------

  def restore_ema_params(self, abstract_params: Any, stage: str,
                         step: Optional[int] = None) -> Tuple[int, Any]:
    """(step, EMA params) of the newest checkpoint (or `step`), on this
    process's first device (in a job of several processes jax.devices()[0]
    belongs to process 0 only), reading nothing else of the train state."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        abstract_params)
    for key in reversed(_EMA_PATHS[stage]):
      abstract = {key: abstract}
    ckpt = self.checkpointer(async_save=False)
    try:
      restored_step, tree = ckpt.restore(abstract, step=step, partial=True)
    finally:
      ckpt.close()
    if tree is None:
      raise FileNotFoundError(f"No checkpoint in {self.checkpoints}: train "
                              "this workdir first.")
    for key in _EMA_PATHS[stage]:
      tree = tree[key]
    return restored_step, tree

  def load_tokenizer(self, step: Optional[int] = None):
    """(config, VQGAN in float32, EMA params) of a tokenizer run."""
    config = self._load_stage_config("tokenizer")
    model = build.tokenizer(config, dtype="float32")
    size = config.data.image_size
    abstract = jax.eval_shape(
        lambda rng: model.init(rng, jax.numpy.zeros((1, size, size, 3))),
        jax.random.key(0))["params"]
    return config, model, self.restore_ema_params(abstract, "tokenizer",
                                                  step)[1]

  def token_shape(self, config: ml_collections.ConfigDict,
                  downsample_factor: int) -> Tuple[int, int]:
    """The token grid of this tokenizer run: its cache's when written (a
    512px cache through a 256px-config tokenizer), else from the config."""
    from maskgit_jax.data import tokens as tokens_lib
    if tokens_lib.is_token_dataset(os.fspath(self.token_cache)):
      shape = tokens_lib.TokenSource(os.fspath(self.token_cache)).token_shape
      return int(shape[0]), int(shape[1])
    side = config.data.image_size // downsample_factor
    return side, side

  def load_transformer(self, codebook_size: int, num_tokens: int,
                       step: Optional[int] = None):
    """(config, MaskGITTransformer in float32, EMA params) of a stage-2 run."""
    config = self._load_stage_config("transformer")
    model = build.transformer(config, codebook_size, num_tokens,
                              dtype="float32")
    abstract = jax.eval_shape(
        lambda rng: model.init(rng, jax.numpy.zeros((1, model.seq_len),
                                                     jax.numpy.int32)),
        jax.random.key(0))["params"]
    return config, model, self.restore_ema_params(abstract, "transformer",
                                                  step)[1]

  def _load_stage_config(self, stage: str) -> ml_collections.ConfigDict:
    config = self.load_config()
    if config.stage != stage:
      raise ValueError(f"{os.fspath(self.path)} holds a {config.stage!r} run, "
                       f"not a {stage}.")
    return config


def has_unconditional(config: ml_collections.ConfigDict) -> bool:
  """Whether a transformer run trained the unconditional model that
  classifier-free guidance needs (label dropout > 0)."""
  return float(config.get("label_dropout", 0.0)) > 0.0
