"""The notebook-facing Pipeline: generate, tokenize, detokenize, logits.

    from maskgit_jax import Pipeline
    pipe = Pipeline.from_workdirs("workdirs/vqgan", "workdirs/maskgit")
    images = pipe.generate([0, 1, 2, 3], seed=0)      # uint8 [4, H, W, 3]

Every method is jitted once per input shape (and per static option such as
`num_iter`) and reused; parameters are passed as arguments, not baked into
the compiled program. The same seed gives the same images.
"""

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import sampling
from maskgit_jax import schedules
from maskgit_jax import streams
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib

MASK = transformer_lib.MASK_TOKEN_ID


def guided_logits(model: transformer_lib.MaskGITTransformer, params,
                  tokens: jnp.ndarray, guidance_scale) -> jnp.ndarray:
  """Image-code logits with classifier-free guidance in one batched pass.

  The unconditional input holds the mask token in the class slot (what
  label dropout trains); logits = cond + scale * (cond - uncond).
  """
  unconditional = tokens.at[:, 0].set(MASK)
  both = image_logits(model, params,
                      jnp.concatenate([tokens, unconditional], axis=0))
  cond, uncond = jnp.split(both, 2, axis=0)
  return cond + guidance_scale * (cond - uncond)


GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def guidance_at(scale, schedule: str, step, num_iter: int):
  """Guidance scale at iteration `step`: constant, or rising from ~0 to
  `scale` over the iterations (linear or half-cosine)."""
  progress = (step + 1).astype(jnp.float32) / num_iter
  if schedule == "linear":
    return scale * progress
  if schedule == "cosine":
    return scale * (1.0 - jnp.cos(jnp.pi * progress)) / 2.0
  return scale


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


class Pipeline:
  """A tokenizer and a transformer with their parameters (EMA weights)."""

  def __init__(self, tokenizer: vqgan_lib.VQGAN, tokenizer_params,
               transformer: transformer_lib.MaskGITTransformer,
               transformer_params, *, token_shape: Sequence[int],
               mask_schedule: str = "cosine"):
    if tokenizer.codebook_size != transformer.codebook_size:
      raise ValueError(
          f"Tokenizer codebook_size={tokenizer.codebook_size} differs from the "
          f"transformer's codebook_size={transformer.codebook_size}.")
    height, width = token_shape
    if height * width != transformer.num_tokens:
      raise ValueError(f"token_shape {tuple(token_shape)} has {height * width} "
                       f"tokens; the transformer expects "
                       f"{transformer.num_tokens}.")
    self.tokenizer, self.tokenizer_params = tokenizer, tokenizer_params
    self.transformer, self.transformer_params = transformer, transformer_params
    self.token_shape = (int(height), int(width))
    self.mask_schedule = mask_schedule
    self.num_classes = transformer.num_classes
    self.codebook_size = transformer.codebook_size

  @classmethod
  def from_workdirs(cls, tokenizer_workdir: str, transformer_workdir: str,
                    step: Optional[int] = None) -> "Pipeline":
    """Loads both stages' EMA parameters from their training workdirs."""
    from maskgit_jax.train import restore  # Local: avoids an import cycle.
    return restore.pipeline_from_workdirs(cls, tokenizer_workdir,
                                          transformer_workdir, step)

  @classmethod
  def from_official(cls, tokenizer: str, transformer: str) -> "Pipeline":
    """Loads a released MaskGIT checkpoint pair (flax msgpack files).

    Every size is inferred from the parameter trees; the token grid is
    square (16x16 at 256px, 32x32 at 512px). See `maskgit_jax.official`.
    """
    from maskgit_jax import official
    k_model, k_params, t_model, t_params = official.load_official(
        tokenizer, transformer)
    side = int(round(t_model.num_tokens**0.5))
    if side * side != t_model.num_tokens:
      raise official.OfficialCheckpointError(
          f"The transformer has {t_model.num_tokens} image positions, not a "
          "square grid.")
    return cls(k_model, k_params, t_model, t_params, token_shape=(side, side))

  @classmethod
  def random(cls, seed: int = 0, num_classes: int = 10,
             image_size: int = 32) -> "Pipeline":
    """A small pipeline with random weights, to try the API without any
    checkpoint (its images are noise-like, not samples of anything)."""
    tokenizer = vqgan_lib.VQGAN(filters=16, channel_multipliers=(1, 2, 2),
                                num_res_blocks=1, embedding_dim=16,
                                codebook_size=64, num_groups=8)
    side = image_size // tokenizer.downsample_factor
    transformer = transformer_lib.MaskGITTransformer(
        codebook_size=64, num_classes=num_classes, num_tokens=side * side,
        hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)
    k_rng, t_rng = jax.random.split(jax.random.key(seed))
    k_params = tokenizer.init(
        k_rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
    t_params = transformer.init(
        t_rng, jnp.zeros((1, transformer.seq_len), jnp.int32))["params"]
    return cls(tokenizer, k_params, transformer, t_params,
               token_shape=(side, side))

  # --- tokens <-> images ---------------------------------------------------

  @functools.partial(jax.jit, static_argnums=0)
  def _encode(self, params, images):
    return self.tokenizer.apply({"params": params}, images,
                                method=self.tokenizer.encode_to_indices)

  @functools.partial(jax.jit, static_argnums=0)
  def _decode(self, params, indices):
    return decode_pixels(self.tokenizer, params, indices)

  def tokenize(self, images) -> np.ndarray:
    """Float images [B, H, W, C] in [0, 1] -> int32 indices [B, h, w]."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
    return np.asarray(self._encode(self.tokenizer_params, images))

  def detokenize(self, indices) -> np.ndarray:
    """Int indices [B, h, w] -> float images [B, H, W, C] in [0, 1]."""
    indices = np.asarray(indices)
    if indices.ndim != 3:
      raise ValueError(f"indices must be [B, h, w], got shape {indices.shape}.")
    if indices.min() < 0 or indices.max() >= self.codebook_size:
      raise ValueError(f"indices must lie in [0, {self.codebook_size}), got "
                       f"range [{indices.min()}, {indices.max()}].")
    return np.asarray(self._decode(self.tokenizer_params,
                                   indices.astype(np.int32)))

  # --- the transformer ------------------------------------------------------

  def _class_tokens(self, class_ids) -> np.ndarray:
    class_ids = np.asarray(class_ids).reshape(-1)
    if class_ids.size and (class_ids.min() < 0 or
                           class_ids.max() >= self.num_classes):
      raise ValueError(f"class ids must lie in [0, {self.num_classes}), got "
                       f"{class_ids.tolist()}.")
    return (class_ids + self.codebook_size).astype(np.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def _logits(self, params, tokens):
    return image_logits(self.transformer, params, tokens)

  def logits(self, tokens, class_ids) -> np.ndarray:
    """tokens int [B, N] (-1 = masked), class ids [B] -> float32
    logits [B, N, codebook_size] over image codes."""
    tokens = np.asarray(tokens)
    n = self.transformer.num_tokens
    if tokens.ndim != 2 or tokens.shape[1] != n:
      raise ValueError(f"tokens must be [B, {n}], got shape {tokens.shape}.")
    full = np.concatenate([self._class_tokens(class_ids)[:, None],
                           tokens.astype(np.int32)], axis=1)
    return np.asarray(self._logits(self.transformer_params, full))[:, 1:]

  @functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
  def _generate(self, t_params, k_params, inputs, rng, num_iter, schedule,
                guidance, start_iter, choice_temperature, guidance_scale,
                temperature):
    """`guidance`: None, or the name of the guidance-scale schedule."""
    def to_logits(tokens, step):
      if guidance is None:
        return image_logits(self.transformer, t_params, tokens)
      scale = guidance_at(guidance_scale, guidance, step, num_iter)
      return guided_logits(self.transformer, t_params, tokens, scale)

    tokens = sampling.decode(to_logits, inputs, rng, num_iter=num_iter,
                             choice_temperature=choice_temperature,
                             schedule=schedule, temperature=temperature,
                             start_iter=start_iter, pass_step=True)
    indices = tokens[:, 1:].reshape((-1,) + self.token_shape)
    images = decode_pixels(self.tokenizer, k_params, indices)
    return jnp.round(images * 255).astype(jnp.uint8)

  def generate(self, class_ids, seed: int = 0, num_iter: int = 8,
               choice_temperature: float = 4.5, guidance_scale: float = 0.0,
               temperature: float = 1.0, schedule: Optional[str] = None,
               guidance_schedule: str = "constant") -> np.ndarray:
    """Class-conditional samples: uint8 images [B, H, W, C].

    guidance_scale > 0 applies classifier-free guidance, at that scale
    throughout (`guidance_schedule="constant"`) or rising to it over the
    iterations ("linear", "cosine").
    """
    if not isinstance(num_iter, int) or num_iter < 1:
      raise ValueError(f"num_iter must be a positive int, got {num_iter!r}.")
    schedule = schedule or self.mask_schedule
    schedules.validate(schedule)
    classes = self._class_tokens(class_ids)
    inputs = np.full((classes.size, 1 + self.transformer.num_tokens), MASK,
                     np.int32)
    inputs[:, 0] = classes
    images = self._generate(
        self.transformer_params, self.tokenizer_params, inputs,
        jax.random.key(seed), num_iter, schedule,
        _guidance(guidance_scale, guidance_schedule), 0,
        jnp.float32(choice_temperature), jnp.float32(guidance_scale),
        jnp.float32(temperature))
    return np.asarray(images)

  # --- editing --------------------------------------------------------------

  def token_mask(self, pixel_mask, dilate: int = 0) -> np.ndarray:
    """Pixel mask [B, H, W] -> token mask [B, h, w]: a token is regenerated
    when any pixel of its patch is, grown by `dilate` tokens each way (the
    official demo grows an edited box by one token)."""
    pixel_mask = np.asarray(pixel_mask, bool)
    b, height, width = pixel_mask.shape
    h, w = self.token_shape
    if height % h or width % w:
      raise ValueError(f"mask of size {height}x{width} does not tile the "
                       f"{h}x{w} token grid.")
    cells = pixel_mask.reshape(b, h, height // h, w, width // w).any((2, 4))
    for _ in range(dilate):  # Rows, then columns: a box grows into a box.
      rows = cells.copy()
      rows[:, 1:] |= cells[:, :-1]
      rows[:, :-1] |= cells[:, 1:]
      cells = rows.copy()
      cells[:, :, 1:] |= rows[:, :, :-1]
      cells[:, :, :-1] |= rows[:, :, 1:]
    return cells

  def edit(self, images, mask, class_ids, seed: int = 0, num_iter: int = 12,
           start_iter: int = 2, choice_temperature: float = 4.5,
           guidance_scale: float = 0.0, temperature: float = 1.0,
           dilate: int = 0, blend: bool = True,
           guidance_schedule: str = "constant") -> np.ndarray:
    """Regenerates the masked part of `images` under `class_ids`.

    One call covers the official demo's edits: inpainting (mask a region),
    outpainting (`extend_canvas` gives the shifted image and the mask of
    the new area) and class-conditional editing (a box and a new class).
    The kept tokens stay fixed; decoding starts at `start_iter` of
    `num_iter`, as the official editing does (2 of 12).

    Args:
      images: float [B, H, W, C] in [0, 1].
      mask: bool [B, H, W] pixels to regenerate (or [H, W] for all).
      class_ids: [B] target classes.
      dilate: grow the token mask by this many tokens each way.
      blend: paste the result back through the token mask blurred by
        (patch size - 1) pixels, as the official demo composites; False
        returns the decoded images as they are.
    Returns:
      uint8 images [B, H, W, C].
    """
    images = np.asarray(images, np.float32)
    mask = np.asarray(mask, bool)
    if mask.ndim == 2:
      mask = np.broadcast_to(mask, images.shape[:3])
    if mask.shape != images.shape[:3]:
      raise ValueError(f"mask shape {mask.shape} does not match images "
                       f"{images.shape[:3]}.")
    if not isinstance(start_iter, int) or not 0 <= start_iter < num_iter:
      raise ValueError(f"start_iter must be in [0, num_iter={num_iter}), got "
                       f"{start_iter!r}.")
    cells = self.token_mask(mask, dilate)
    tokens = np.where(cells, MASK, self.tokenize(images)).reshape(
        len(images), -1)
    inputs = np.concatenate([self._class_tokens(class_ids)[:, None], tokens],
                            axis=1).astype(np.int32)
    edited = np.asarray(self._generate(
        self.transformer_params, self.tokenizer_params, inputs,
        jax.random.key(seed), num_iter, self.mask_schedule,
        _guidance(guidance_scale, guidance_schedule), start_iter,
        jnp.float32(choice_temperature),
        jnp.float32(guidance_scale), jnp.float32(temperature)))
    if not blend:
      return edited
    weight = soft_mask(cells, images.shape[1:3])[..., None]
    original = np.round(np.clip(images, 0, 1) * 255)
    return np.round(edited * weight + original * (1 - weight)).astype(np.uint8)


def _guidance(scale: float, schedule: str) -> Optional[str]:
  if schedule not in GUIDANCE_SCHEDULES:
    raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, "
                     f"got {schedule!r}.")
  return None if scale == 0.0 else schedule


def soft_mask(cells: np.ndarray, size) -> np.ndarray:
  """Token mask [B, h, w] -> float [B, H, W]: upsampled, Gaussian-blurred
  with radius (patch size - 1) pixels, as the official demo composites."""
  from PIL import Image, ImageFilter
  height, width = size
  radius = max(height // cells.shape[1] - 1, 0)
  out = []
  for cell in cells:
    image = Image.fromarray(cell.astype(np.uint8) * 255).resize(
        (width, height), Image.NEAREST)
    out.append(np.asarray(image.filter(ImageFilter.GaussianBlur(radius)),
                          np.float32) / 255.0)
  return np.stack(out)


def box_mask(size, top: int, left: int, height: int, width: int) -> np.ndarray:
  """bool [H, W], True inside the box: what `edit` regenerates."""
  mask = np.zeros(tuple(size), bool)
  mask[top:top + height, left:left + width] = True
  return mask


def extend_canvas(images, pixels: int, side: str = "right"):
  """Outpainting inputs: shifts `images` [B, H, W, C] by `pixels` away from
  `side` and returns (canvas, mask) with mask True on the new strip."""
  images = np.asarray(images, np.float32)
  sides = {"right": (2, -1), "left": (2, 1), "bottom": (1, -1), "top": (1, 1)}
  if side not in sides:
    raise ValueError(f"side must be one of {sorted(sides)}, got {side!r}.")
  axis, direction = sides[side]
  if not 0 < pixels < images.shape[axis]:
    raise ValueError(f"pixels must be in (0, {images.shape[axis]}), got "
                     f"{pixels}.")
  canvas = np.roll(images, direction * pixels, axis=axis)
  mask = np.zeros(images.shape[:3], bool)
  index = [slice(None)] * 3
  index[axis] = slice(-pixels, None) if side in ("right", "bottom") else (
      slice(0, pixels))
  mask[tuple(index)] = True
  canvas[mask] = 0.0
  return canvas, mask
