"""VQGAN tokenizer: image -> grid of codebook indices -> image.

Follows the official MaskGIT tokenizer so its released checkpoints map onto
this module by renaming: convolutional encoder and decoder with GroupNorm and
swish, no attention layers, 2x2 average-pool downsampling and
nearest-neighbour upsampling, and a vector quantizer with commitment, codebook
and entropy losses. Images are float in [0, 1], channels last.

Quirk kept on purpose: when a residual block changes the channel count, its
shortcut is a 1x1 convolution of the block's *output* (not of its input), so
the block returns h + conv1x1(h). The official checkpoints were trained so.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import streams
from maskgit_jax.models.conv import Conv3x3
from maskgit_jax.models.group_norm import GroupNorm

Dtype = Any

ACTIVATIONS: Dict[str, Callable] = {"swish": nn.swish, "relu": nn.relu}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def average_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 average pooling, stride 2, 'SAME' padding; padded cells not counted.

  For even sizes this is the plain mean of each 2x2 block; for odd sizes the
  last row/column averages only the real pixels (TensorFlow's convention).
  """
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3] + (1,), x.dtype)[None],
                                0.0, jax.lax.add, window, strides, "SAME")
  return total / count


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour 2x upsampling of [B, H, W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# Which 3x3 kernel rows (or columns) land on each low-resolution offset after
# nearest 2x upsampling: output row 2i + phase reads low-res rows
# (i - 1, i) for phase 0 and (i, i + 1) for phase 1.
_PHASE_TAPS = np.array([[[1., 0., 0.], [0., 1., 1.]],
                        [[1., 1., 0.], [0., 0., 1.]]])


class UpsampleConv(nn.Module):
  """conv3x3(nearest_upsample_2x(x)), computed at the input resolution.

  Every output pixel of the upsampled conv is a 2x2 conv of the input whose
  kernel sums some of the 3x3 taps; there are four such kernels, one per
  output phase. Same parameters and result as nn.Conv after
  `upsample_nearest_2x` (up to float rounding of the tap sums), with 4/9 of
  the multiplies and no 4x-larger intermediate.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    # [row phase, col phase, 2, 2, in, out]
    kernels = jnp.einsum("ary,bsx,yxio->abrsio", taps, taps, kernel)
    rows = []
    for a in range(2):
      cols = []
      for b in range(2):
        cols.append(jax.lax.conv_general_dilated(
            x, kernels[a, b], window_strides=(1, 1),
            padding=((1 - a, a), (1 - b, b)),
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2(b), C]
    out = jnp.stack(rows, axis=2)  # [B, H, 2(a), W, 2(b), C]
    batch, height, _, width, _, channels = out.shape
    return out.reshape(batch, 2 * height, 2 * width, channels) + bias


class ResBlock(nn.Module):
  """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a shortcut."""
  filters: int
  num_groups: int = 32
  activation: str = "swish"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    act = _activation(self.activation)
    conv = lambda name: Conv3x3(self.filters, self.dtype, name=name)
    norm = lambda name: GroupNorm(self.num_groups, dtype=self.dtype,
                                  name=name)
    h = conv("conv1")(act(norm("norm1")(x)))
    h = conv("conv2")(act(norm("norm2")(h)))
    if x.shape[-1] == self.filters:
      return h + x
    # Official quirk (see module docstring): the projection reads h, not x.
    return h + nn.Conv(self.filters, (1, 1), use_bias=False, dtype=self.dtype,
                       name="shortcut")(h)


class Encoder(nn.Module):
  """Image [B, H, W, C] -> continuous latents [B, H/f, W/f, embedding_dim]."""
  filters: int
  channel_multipliers: Sequence[int]
  num_res_blocks: int
  embedding_dim: int
  num_groups: int = 32
  activation: str = "swish"
  conv_downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = lambda f, name: ResBlock(f, self.num_groups, self.activation,
                                     self.dtype, name=name)
    x = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype,
                name="conv_in")(x)
    num_levels = len(self.channel_multipliers)
    for level, multiplier in enumerate(self.channel_multipliers):
      filters = self.filters * multiplier
      for i in range(self.num_res_blocks):
        x = block(filters, f"level{level}_res{i}")(x)
      if level < num_levels - 1:
        if self.conv_downsample:
          x = nn.Conv(filters, (4, 4), strides=(2, 2), dtype=self.dtype,
                      name=f"level{level}_downsample")(x)
        else:
          x = average_pool_2x2(x)
    for i in range(self.num_res_blocks):
      x = block(filters, f"mid_res{i}")(x)
    x = GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(x)
    x = _activation(self.activation)(x)
    return nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype,
                   name="conv_out")(x)


class Decoder(nn.Module):
  """Latents [B, h, w, D] -> image [B, h*f, w*f, output_channels]."""
  filters: int
  channel_multipliers: Sequence[int]
  num_res_blocks: int
  output_channels: int = 3
  num_groups: int = 32
  activation: str = "swish"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = lambda f, name: ResBlock(f, self.num_groups, self.activation,
                                     self.dtype, name=name)
    filters = self.filters * self.channel_multipliers[-1]
    x = nn.Conv(filters, (3, 3), dtype=self.dtype, name="conv_in")(x)
    for i in range(self.num_res_blocks):
      x = block(filters, f"mid_res{i}")(x)
    for level in reversed(range(len(self.channel_multipliers))):
      filters = self.filters * self.channel_multipliers[level]
      for i in range(self.num_res_blocks):
        x = block(filters, f"level{level}_res{i}")(x)
      if level > 0:
        x = UpsampleConv(filters, self.dtype,
                         name=f"level{level}_upsample_conv")(x)
    x = GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(x)
    x = _activation(self.activation)(x)
    return nn.Conv(self.output_channels, (3, 3), dtype=self.dtype,
                   name="conv_out")(x)


def squared_distances(x: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """|x - e|^2 for every row of x [M, D] and codebook entry e [K, D] -> [M, K]."""
  x_sq = jnp.sum(x**2, axis=-1, keepdims=True)
  codebook_sq = jnp.sum(codebook**2, axis=-1)[None, :]
  return x_sq - 2.0 * (x @ codebook.T) + codebook_sq


def entropy_loss(affinity: jnp.ndarray, temperature: float,
                 loss_type: str = "softmax") -> jnp.ndarray:
  """Mean per-token entropy minus entropy of the mean code distribution.

  Low per-token entropy makes assignments confident; high entropy of the
  average spreads them over the codebook (better codebook usage).
  """
  logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
  if loss_type == "argmax":
    onehot = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
    targets = probs + jax.lax.stop_gradient(onehot - probs)
  elif loss_type == "softmax":
    targets = probs
  else:
    raise ValueError(f"Unknown entropy loss type {loss_type!r}; valid: "
                     "'softmax', 'argmax'.")
  mean_probs = jnp.mean(targets, axis=0)
  mean_entropy = -jnp.sum(mean_probs * jnp.log(mean_probs + 1e-5))
  token_entropy = -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
  return token_entropy - mean_entropy


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantizer with a straight-through gradient."""
  codebook_size: int
  embedding_dim: int
  commitment_cost: float = 0.25
  entropy_loss_ratio: float = 0.1
  entropy_temperature: float = 0.01
  entropy_loss_type: str = "softmax"
  dtype: Dtype = jnp.float32

  def setup(self):
    self.codebook = self.param(
        "codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
        (self.codebook_size, self.embedding_dim))

  def lookup(self, indices: jnp.ndarray) -> jnp.ndarray:
    """Codebook vectors of int indices [...] -> [..., D]."""
    return jnp.take(self.codebook, indices, axis=0).astype(self.dtype)

  def __call__(self, x: jnp.ndarray, train: bool = False
               ) -> Tuple[jnp.ndarray, jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Returns (quantized [..., D], indices int32 [...], losses)."""
    codebook = self.codebook.astype(jnp.float32)
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    distances = squared_distances(flat, codebook)
    indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
    quantized = jnp.take(codebook, indices, axis=0).reshape(x.shape)
    indices = indices.reshape(x.shape[:-1])
    x32 = x.astype(jnp.float32)
    losses = {}
    if train:
      losses["commitment_loss"] = self.commitment_cost * jnp.mean(
          (jax.lax.stop_gradient(quantized) - x32)**2)
      losses["codebook_loss"] = jnp.mean(
          (quantized - jax.lax.stop_gradient(x32))**2)
      losses["entropy_loss"] = (
          self.entropy_loss_ratio * entropy_loss(
              -distances, self.entropy_temperature, self.entropy_loss_type)
          if self.entropy_loss_ratio else jnp.zeros((), jnp.float32))
      losses["quantizer_loss"] = sum(losses.values())
      quantized = x32 + jax.lax.stop_gradient(quantized - x32)
    return quantized.astype(self.dtype), indices, losses


class VQGAN(nn.Module):
  """The tokenizer. Defaults are the official ImageNet 256 tokenizer."""
  filters: int = 128
  channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embedding_dim: int = 256
  codebook_size: int = 1024
  num_groups: int = 32
  activation: str = "swish"
  conv_downsample: bool = False
  image_channels: int = 3
  commitment_cost: float = 0.25
  entropy_loss_ratio: float = 0.1
  entropy_temperature: float = 0.01
  entropy_loss_type: str = "softmax"
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2**(len(self.channel_multipliers) - 1)

  def setup(self):
    shared = dict(filters=self.filters,
                  channel_multipliers=tuple(self.channel_multipliers),
                  num_res_blocks=self.num_res_blocks,
                  num_groups=self.num_groups, activation=self.activation,
                  dtype=self.dtype)
    self.encoder = Encoder(embedding_dim=self.embedding_dim,
                           conv_downsample=self.conv_downsample, **shared)
    self.decoder = Decoder(output_channels=self.image_channels, **shared)
    self.quantizer = VectorQuantizer(
        self.codebook_size, self.embedding_dim, self.commitment_cost,
        self.entropy_loss_ratio, self.entropy_temperature,
        self.entropy_loss_type, self.dtype)

  def encode(self, images: jnp.ndarray, train: bool = False):
    """Images [B, H, W, C] in [0, 1] -> (quantized, indices [B, h, w], losses)."""
    return self.quantizer(self.encoder(images), train=train)

  def encode_to_indices(self, images: jnp.ndarray) -> jnp.ndarray:
    return self.encode(images)[1]

  def decode(self, quantized: jnp.ndarray) -> jnp.ndarray:
    return self.decoder(quantized).astype(jnp.float32)

  def decode_from_indices(self, indices: jnp.ndarray) -> jnp.ndarray:
    """Indices [B, h, w] -> reconstruction [B, H, W, C] (about [0, 1])."""
    return self.decode(self.quantizer.lookup(indices))

  def __call__(self, images: jnp.ndarray, train: bool = False):
    """Returns (reconstruction, indices, quantizer losses)."""
    quantized, indices, losses = self.encode(images, train=train)
    return self.decode(quantized), indices, losses


# Below this many images a slice's convolutions gain nothing from running
# beside the others' (and tiny test batches compile faster whole).
MIN_STREAM_ROWS = 8


def stream_count(batch_size: int) -> int:
  """Slices for the encoder or decoder of a batch (`streams`): each keeps
  at least MIN_STREAM_ROWS images."""
  return streams.default_streams(batch_size, min_rows=MIN_STREAM_ROWS)


def apply_in_streams(model: VQGAN, params, images: jnp.ndarray,
                     train: bool = False,
                     num_streams: Optional[int] = None):
  """`model.apply({"params": params}, images, train=train)`, with the
  encoder and the decoder run as independent batch slices (`streams`).

  Each image is computed as before; the quantizer still sees the whole
  batch, so its batch statistic (the entropy of the mean code distribution)
  is unchanged. On XLA:CPU the convolutions of a small batch leave a core
  idle; four slices made the demo tokenizer's training step about a third
  faster on 2 cores. By default a slice keeps at least `MIN_STREAM_ROWS`
  images. Elsewhere (one stream) it is the plain call.
  """
  num_streams = num_streams or stream_count(images.shape[0])
  apply = lambda fn: lambda x: model.apply({"params": params}, x, method=fn)
  latents = streams.in_streams(apply(lambda m, x: m.encoder(x)), images,
                               num_streams=num_streams)
  quantized, indices, losses = model.apply(
      {"params": params}, latents, train,
      method=lambda m, z, train: m.quantizer(z, train=train))
  recon = streams.in_streams(apply(lambda m, q: m.decode(q)), quantized,
                             num_streams=num_streams)
  return recon, indices, losses
