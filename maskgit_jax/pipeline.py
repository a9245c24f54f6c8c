"""The notebook-facing Pipeline: generate, edit, tokenize, detokenize, logits.

    from maskgit_jax import Pipeline
    pipe = Pipeline.from_workdirs("workdirs/vqgan", "workdirs/maskgit")
    images = pipe.generate([0, 1, 2, 3], seed=0)      # uint8 [4, H, W, 3]

The compiled programs are module-level jitted functions of (static modules
or `DecodeOptions`, parameters, inputs): parameters are arguments, never
baked in, so every Pipeline built from equal modules (a new checkpoint, a
fine-tuned copy) reuses one program per input shape and option set. The
same seed gives the same images.
"""

import dataclasses
import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import editing
from maskgit_jax import parallel
from maskgit_jax import sampling
from maskgit_jax import schedules
from maskgit_jax import streams
from maskgit_jax.editing import box_mask, extend_canvas  # noqa: F401  (re-exported)
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib

MASK = transformer_lib.MASK_TOKEN_ID


def image_logits(model: transformer_lib.MaskGITTransformer, params,
                 tokens: jnp.ndarray) -> jnp.ndarray:
  """Logits over image codes only, [B, 1 + N, codebook_size]."""
  return streams.in_streams(
      lambda t: model.apply({"params": params}, t, codes_only=True), tokens)


def decode_pixels(tokenizer: vqgan_lib.VQGAN, params,
                  indices: jnp.ndarray) -> jnp.ndarray:
  """Token indices [B, h, w] -> images [B, H, W, C] clipped to [0, 1]."""
  images = streams.in_streams(
      lambda i: tokenizer.apply({"params": params}, i,
                                method=tokenizer.decode_from_indices),
      indices)
  return jnp.clip(images, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """What `sample_images` compiles for: equal records share one program.

  Flax modules are frozen dataclasses compared by their fields, so two
  pipelines of the same architecture give equal records whatever their
  parameters. `guidance_schedule` None means no guidance (one forward pass
  per iteration instead of a doubled batch).
  """
  tokenizer: vqgan_lib.VQGAN
  transformer: transformer_lib.MaskGITTransformer
  token_shape: Tuple[int, int]
  num_iter: int
  mask_schedule: str = "cosine"
  guidance_schedule: Optional[str] = None
  start_iter: int = 0

  def __post_init__(self):
    object.__setattr__(self, "token_shape",
                       tuple(int(s) for s in self.token_shape))
    if isinstance(self.num_iter, bool) or not isinstance(
        self.num_iter, int) or self.num_iter < 1:
      raise ValueError(f"num_iter must be a positive int, got "
                       f"{self.num_iter!r}.")
    if isinstance(self.start_iter, bool) or not isinstance(
        self.start_iter, int) or not 0 <= self.start_iter < self.num_iter:
      raise ValueError(f"start_iter must be an int in [0, num_iter="
                       f"{self.num_iter}), got {self.start_iter!r}.")
    schedules.validate(self.mask_schedule)
    if self.guidance_schedule is not None:
      sampling.validate_guidance_schedule(self.guidance_schedule)


# --- the compiled functions (one program per static argument and shape) ----


@functools.partial(jax.jit, static_argnums=0)
def tokenize_images(tokenizer: vqgan_lib.VQGAN, params,
                    images: jnp.ndarray) -> jnp.ndarray:
  """Float images [B, H, W, C] -> int32 indices [B, h, w]."""
  return tokenizer.apply({"params": params}, images,
                         method=tokenizer.encode_to_indices)


@functools.partial(jax.jit, static_argnums=0)
def detokenize_indices(tokenizer: vqgan_lib.VQGAN, params,
                       indices: jnp.ndarray) -> jnp.ndarray:
  """Int32 indices [B, h, w] -> float images [B, H, W, C] in [0, 1]."""
  return decode_pixels(tokenizer, params, indices)


@functools.partial(jax.jit, static_argnums=0)
def transformer_logits(transformer: transformer_lib.MaskGITTransformer,
                       params, tokens: jnp.ndarray) -> jnp.ndarray:
  """Int32 [B, 1 + N] (class token first) -> image-code logits."""
  return image_logits(transformer, params, tokens)


@functools.partial(jax.jit, static_argnums=0)
def sample_images(options: DecodeOptions, transformer_params,
                  tokenizer_params, inputs: jnp.ndarray, rng: jax.Array,
                  choice_temperature: jnp.ndarray,
                  guidance_scale: jnp.ndarray,
                  temperature: jnp.ndarray) -> jnp.ndarray:
  """Decodes int32 inputs [B, 1 + N] (-1 = unknown) to uint8 images.

  The float knobs are traced arguments, so changing them never recompiles.
  """
  logits_fn = functools.partial(image_logits, options.transformer,
                                transformer_params)
  if options.guidance_schedule is None:
    to_logits = lambda tokens, step: logits_fn(tokens)
  else:
    to_logits = sampling.guided(logits_fn, guidance_scale,
                                options.guidance_schedule, options.num_iter,
                                mask_token_id=MASK)
  tokens = sampling.decode(to_logits, inputs, rng, num_iter=options.num_iter,
                           choice_temperature=choice_temperature,
                           schedule=options.mask_schedule,
                           temperature=temperature,
                           start_iter=options.start_iter, pass_step=True)
  indices = tokens[:, 1:].reshape((-1,) + options.token_shape)
  images = decode_pixels(options.tokenizer, tokenizer_params, indices)
  return jnp.round(images * 255).astype(jnp.uint8)


def _check_float(name: str, value, minimum: float,
                 inclusive: bool = True) -> float:
  """`value` as a float, or a ValueError naming it and the allowed range."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  bound = number >= minimum if inclusive else number > minimum
  if not (math.isfinite(number) and bound):
    relation = ">=" if inclusive else ">"
    raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, "
                     f"got {value!r}.")
  return number


def _knobs(choice_temperature, guidance_scale,
           temperature) -> Tuple[float, float, float]:
  """The traced float options, checked before anything compiles."""
  return (_check_float("choice_temperature", choice_temperature, 0.0),
          _check_float("guidance_scale", guidance_scale, 0.0),
          _check_float("temperature", temperature, 0.0, inclusive=False))


class Pipeline:
  """A tokenizer and a transformer with their parameters (EMA weights).

  `has_unconditional` says whether the transformer was trained with label
  dropout, i.e. also learned the unconditional model that classifier-free
  guidance needs; without it guidance is refused rather than silently
  producing off-distribution samples.
  """

  def __init__(self, tokenizer: vqgan_lib.VQGAN, tokenizer_params,
               transformer: transformer_lib.MaskGITTransformer,
               transformer_params, *, token_shape: Sequence[int],
               mask_schedule: str = "cosine",
               has_unconditional: bool = False):
    if tokenizer.codebook_size != transformer.codebook_size:
      raise ValueError(
          f"Tokenizer codebook_size={tokenizer.codebook_size} differs from the "
          f"transformer's codebook_size={transformer.codebook_size}.")
    height, width = token_shape
    if height * width != transformer.num_tokens:
      raise ValueError(f"token_shape {tuple(token_shape)} has {height * width} "
                       f"tokens; the transformer expects "
                       f"{transformer.num_tokens}.")
    schedules.validate(mask_schedule)
    if not isinstance(has_unconditional, (bool, np.bool_)):
      raise ValueError(f"has_unconditional must be True or False, got "
                       f"{has_unconditional!r}.")
    try:  # The modules are static arguments of the compiled functions.
      hash((tokenizer, transformer))
    except TypeError as e:
      raise ValueError(f"The tokenizer and transformer modules must be "
                       f"hashable (tuples, not lists, in their fields): {e}")
    self.tokenizer, self.tokenizer_params = tokenizer, tokenizer_params
    self.transformer, self.transformer_params = transformer, transformer_params
    self.token_shape = (int(height), int(width))
    self.mask_schedule = mask_schedule
    self.has_unconditional = bool(has_unconditional)
    self.num_classes = transformer.num_classes
    self.codebook_size = transformer.codebook_size

  @classmethod
  def from_workdirs(cls, tokenizer_workdir: str, transformer_workdir: str,
                    step: Optional[int] = None) -> "Pipeline":
    """Loads both stages' EMA parameters from their training workdirs.

    Only the EMA weights are read from the checkpoints (`step`: the
    transformer's; default the newest), and both models run in float32
    whatever dtype they were trained in.
    """
    from maskgit_jax import workdir as workdir_lib
    tokenizer_run = workdir_lib.Workdir(tokenizer_workdir)
    k_config, tokenizer, k_params = tokenizer_run.load_tokenizer()
    token_shape = tokenizer_run.token_shape(k_config,
                                            tokenizer.downsample_factor)
    t_config, transformer, t_params = workdir_lib.Workdir(
        transformer_workdir).load_transformer(
            tokenizer.codebook_size, token_shape[0] * token_shape[1], step)
    return cls(tokenizer, k_params, transformer, t_params,
               token_shape=token_shape, mask_schedule=t_config.mask_schedule,
               has_unconditional=workdir_lib.has_unconditional(t_config))

  @classmethod
  def from_official(cls, tokenizer: str, transformer: str) -> "Pipeline":
    """Loads a released MaskGIT checkpoint pair (flax msgpack files).

    Every size is inferred from the parameter trees; the token grid is
    square (16x16 at 256px, 32x32 at 512px). See `maskgit_jax.official`.
    The released transformers were trained without label dropout, so they
    have no unconditional model and take no guidance.
    """
    from maskgit_jax import official
    k_model, k_params, t_model, t_params = official.load_official(
        tokenizer, transformer)
    side = int(round(t_model.num_tokens**0.5))
    if side * side != t_model.num_tokens:
      raise official.OfficialCheckpointError(
          f"The transformer has {t_model.num_tokens} image positions, not a "
          "square grid.")
    return cls(k_model, k_params, t_model, t_params, token_shape=(side, side),
               has_unconditional=False)

  @classmethod
  def random(cls, seed: int = 0, num_classes: int = 10,
             image_size: int = 32) -> "Pipeline":
    """A small pipeline with random weights, to try the API without any
    checkpoint (its images are noise-like, not samples of anything).
    Every option works on it, guidance included."""
    tokenizer = vqgan_lib.VQGAN(filters=16, channel_multipliers=(1, 2, 2),
                                num_res_blocks=1, embedding_dim=16,
                                codebook_size=64, num_groups=8)
    side = image_size // tokenizer.downsample_factor
    transformer = transformer_lib.MaskGITTransformer(
        codebook_size=64, num_classes=num_classes, num_tokens=side * side,
        hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)
    k_rng, t_rng = jax.random.split(jax.random.key(seed))
    k_params = parallel.initialize(lambda rng: tokenizer.init(
        rng, jnp.zeros((1, image_size, image_size, 3)))["params"], k_rng)
    t_params = parallel.initialize(lambda rng: transformer.init(
        rng, jnp.zeros((1, transformer.seq_len), jnp.int32))["params"], t_rng)
    return cls(tokenizer, k_params, transformer, t_params,
               token_shape=(side, side), has_unconditional=True)

  # --- tokens <-> images ---------------------------------------------------

  def tokenize(self, images) -> np.ndarray:
    """Images [B, H, W, C] -> int32 indices [B, h, w].

    Float images must lie in [0, 1]; uint8 images (0..255, what `generate`
    returns) are scaled to it.
    """
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(
          "float images must lie in [0, 1], got values in "
          f"[{images.min():.3g}, {images.max():.3g}]; pass uint8 images or "
          "divide by 255.")
    return np.asarray(tokenize_images(self.tokenizer, self.tokenizer_params,
                                      images))

  def detokenize(self, indices) -> np.ndarray:
    """Int indices [B, h, w] -> float images [B, H, W, C] in [0, 1]."""
    indices = np.asarray(indices)
    if indices.ndim != 3:
      raise ValueError(f"indices must be [B, h, w], got shape {indices.shape}.")
    if indices.min() < 0 or indices.max() >= self.codebook_size:
      raise ValueError(f"indices must lie in [0, {self.codebook_size}), got "
                       f"range [{indices.min()}, {indices.max()}].")
    return np.asarray(detokenize_indices(self.tokenizer, self.tokenizer_params,
                                         indices.astype(np.int32)))

  # --- the transformer ------------------------------------------------------

  def _class_tokens(self, class_ids) -> np.ndarray:
    class_ids = np.asarray(class_ids).reshape(-1)
    if class_ids.size == 0:
      raise ValueError("class ids must hold at least one class, got none.")
    if not np.issubdtype(class_ids.dtype, np.integer):
      raise ValueError(f"class ids must be integers, got {class_ids.tolist()} "
                       f"(dtype {class_ids.dtype}).")
    if class_ids.min() < 0 or class_ids.max() >= self.num_classes:
      raise ValueError(f"class ids must lie in [0, {self.num_classes}), got "
                       f"{class_ids.tolist()}.")
    return (class_ids + self.codebook_size).astype(np.int32)

  def logits(self, tokens, class_ids) -> np.ndarray:
    """tokens int [B, N] (-1 = masked), class ids [B] -> float32
    logits [B, N, codebook_size] over image codes."""
    tokens = np.asarray(tokens)
    n = self.transformer.num_tokens
    if tokens.ndim != 2 or tokens.shape[1] != n:
      raise ValueError(f"tokens must be [B, {n}], got shape {tokens.shape}.")
    classes = self._class_tokens(class_ids)
    if classes.size != len(tokens):
      raise ValueError(f"got {classes.size} class ids for {len(tokens)} token "
                       "rows; give one per row.")
    full = np.concatenate([classes[:, None], tokens.astype(np.int32)], axis=1)
    return np.asarray(transformer_logits(self.transformer,
                                         self.transformer_params, full))[:, 1:]

  def _guidance(self, scale, schedule: str) -> Optional[str]:
    """The static guidance option: None (off) or the schedule name.

    Refuses guidance on a transformer without an unconditional model,
    before anything compiles.
    """
    sampling.validate_guidance_schedule(schedule)
    scale = _check_float("guidance_scale", scale, 0.0)
    if scale == 0.0:
      return None
    if not self.has_unconditional:
      raise ValueError(
          f"guidance_scale={scale} needs a transformer trained with label "
          "dropout (an unconditional model); this one was not (imported "
          "official weights, or config.label_dropout=0). Retrain or fine-tune "
          "with --config.label_dropout=0.1, or use guidance_scale=0.")
    return schedule

  def _options(self, num_iter: int, schedule: str, guidance: Optional[str],
               start_iter: int) -> DecodeOptions:
    return DecodeOptions(tokenizer=self.tokenizer,
                         transformer=self.transformer,
                         token_shape=self.token_shape, num_iter=num_iter,
                         mask_schedule=schedule, guidance_schedule=guidance,
                         start_iter=start_iter)

  def _sample(self, options: DecodeOptions, inputs: np.ndarray, seed: int,
              knobs: Tuple[float, float, float],
              sharding: Optional[jax.sharding.Sharding] = None) -> np.ndarray:
    t_params, k_params = self.transformer_params, self.tokenizer_params
    if sharding is not None:  # The batch split over devices (evaluation).
      inputs = jax.device_put(inputs, sharding)
      t_params, k_params = self._replicated(sharding)
    return np.asarray(sample_images(
        options, t_params, k_params, inputs,
        jax.random.key(seed), *(jnp.float32(k) for k in knobs)))

  def _replicated(self, sharding: jax.sharding.Sharding):
    """Both parameter trees copied to every device of `sharding`, once."""
    key = (id(self.transformer_params), id(self.tokenizer_params),
           tuple(d.id for d in sharding.device_set))
    cached = getattr(self, "_replica_cache", None)
    if cached is None or cached[0] != key:
      everywhere = jax.sharding.NamedSharding(sharding.mesh,
                                              jax.sharding.PartitionSpec())
      cached = (key, jax.device_put(
          (self.transformer_params, self.tokenizer_params), everywhere))
      self._replica_cache = cached
    return cached[1]

  def generate(self, class_ids, seed: int = 0, num_iter: int = 8,
               choice_temperature: float = 4.5, guidance_scale: float = 0.0,
               temperature: float = 1.0, schedule: Optional[str] = None,
               guidance_schedule: str = "constant",
               sharding: Optional[jax.sharding.Sharding] = None
               ) -> np.ndarray:
    """Class-conditional samples: uint8 images [B, H, W, C].

    guidance_scale > 0 applies classifier-free guidance (it needs
    `has_unconditional`), at that scale throughout
    (`guidance_schedule="constant"`) or rising to it over the iterations
    ("linear", "cosine"). `sharding` (e.g. a NamedSharding over a batch
    axis) splits the batch over devices; the images are the same.
    """
    knobs = _knobs(choice_temperature, guidance_scale, temperature)
    options = self._options(num_iter, schedule or self.mask_schedule,
                            self._guidance(guidance_scale, guidance_schedule),
                            start_iter=0)
    classes = self._class_tokens(class_ids)
    inputs = np.full((classes.size, 1 + self.transformer.num_tokens), MASK,
                     np.int32)
    inputs[:, 0] = classes
    return self._sample(options, inputs, seed, knobs, sharding)

  # --- editing --------------------------------------------------------------

  def token_mask(self, pixel_mask, dilate: int = 1) -> np.ndarray:
    """Pixel mask [B, H, W] -> the token mask [B, h, w] that `edit`
    regenerates with the same `dilate` (see `editing.token_mask`)."""
    return editing.token_mask(pixel_mask, self.token_shape, dilate)

  def edit(self, images, mask, class_ids, seed: int = 0, num_iter: int = 12,
           start_iter: int = 2, choice_temperature: float = 4.5,
           guidance_scale: float = 0.0, temperature: float = 1.0,
           dilate: int = 1, blend: bool = True,
           guidance_schedule: str = "constant",
           blur_radius: Optional[int] = None) -> np.ndarray:
    """Regenerates the masked part of `images` under `class_ids`.

    One call covers the official demo's edits: inpainting (mask a region),
    outpainting (`editing.extend_canvas` gives the shifted image and the
    mask of the new area) and class-conditional editing (a box and a new
    class). The kept tokens stay fixed; decoding starts at `start_iter` of
    `num_iter`, as the official editing does (2 of 12).

    Args:
      images: float [B, H, W, C] in [0, 1].
      mask: bool [B, H, W] pixels to regenerate (or [H, W] for all).
      class_ids: [B] target classes.
      dilate: grow the token mask by this many tokens each way (the
        official demo grows an edited box by one, so it blends in).
      blend: paste the result back through the token mask Gaussian-blurred
        by `blur_radius` pixels, as the official demo composites; False
        returns the decoded images as they are.
      blur_radius: defaults to H // 16 - 1 (the official radius: 15 at
        256 px, 31 at 512 px).
    Returns:
      uint8 images [B, H, W, C].
    """
    knobs = _knobs(choice_temperature, guidance_scale, temperature)
    options = self._options(num_iter, self.mask_schedule,
                            self._guidance(guidance_scale, guidance_schedule),
                            start_iter)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
    mask = np.asarray(mask, bool)
    if mask.ndim == 2:
      mask = np.broadcast_to(mask, images.shape[:3])
    if mask.shape != images.shape[:3]:
      raise ValueError(f"mask shape {mask.shape} does not match images "
                       f"{images.shape[:3]}.")
    classes = self._class_tokens(class_ids)
    if classes.size != len(images):
      raise ValueError(f"got {classes.size} class ids for {len(images)} "
                       "images; give one per image.")
    cells = self.token_mask(mask, dilate)
    # The blur radius is checked here too, before anything compiles.
    weight = (editing.soft_mask(cells, images.shape[1:3], blur_radius)
              if blend else None)
    tokens = np.where(cells, MASK, self.tokenize(images)).reshape(
        len(images), -1)
    inputs = np.concatenate([classes[:, None], tokens], axis=1).astype(
        np.int32)
    edited = self._sample(options, inputs, seed, knobs)
    return edited if weight is None else editing.composite(edited, images,
                                                           weight)
