"""3x3 convolutions with the algorithm chosen by the input's shape.

XLA:CPU's convolution falls well short of its matrix multiply at two ends
of the shapes MaskGIT meets, and `Conv3x3` (nn.Conv's parameters) avoids
both where they occur:

- Wide maps with wide channels: Winograd's F(2x2, 3x3) does the same work
  with fewer multiplies (`winograd.py`; the released tokenizer's decoder).
- Tiny maps: with a 2x2 map and 512 channels XLA's convolution ran at about
  1.5 GFLOP/s on 2 cores, 50x slower than the same sums as one matrix
  multiply. VGG16's last block sees 2x2 maps when LPIPS compares 32x32
  images, and the discriminator ends at 4x4. There the nine shifted views
  of the padded input are laid side by side ([B, H, W, 9 C]) and multiplied
  by the kernel as a [9 C, features] matrix (`conv3x3_as_matmul`).
- Kernel gradients of wide channels on large maps, which XLA computes as a
  convolution over the whole map: there `direct_conv3x3` takes them as
  nine matrix multiplies (`kernel_gradient`), also in second derivatives.

Every path computes the same sums; results agree to float rounding.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskgit_jax.models import conv_gradient
from maskgit_jax.models import winograd

Dtype = Any
ALGORITHMS = ("auto", "winograd", "matmul", "direct")

# Measured on 2 CPU cores (benchmarks/RESULTS.md): on maps of at most 4x4
# the matrix multiply was faster than XLA's convolution for every width
# tried (64-512 channels, batch 4-16; 1.3-50x); on 6x6 and larger maps it
# was about even or slower.
MAX_MATMUL_SIDE = 4
# Measured the same way: XLA's kernel gradient against `kernel_gradient`
# (standalone, batch 8-32) was 1.5-4.5x slower with 64-256 channels on
# 16x16 to 64x64 maps, and about even on 8x8 maps; in the discriminator's
# training step (R1 included) the step went from 18.3 to 3.3 s. In the
# demo tokenizer's step (16-64 channels, 64 channels only at 8x8) taking
# it everywhere made the step slower (0.22 -> 0.28 s), hence the bounds.
MIN_GEMM_GRADIENT_CHANNELS = 64
MIN_GEMM_GRADIENT_PIXELS = 256


def prefer_matmul(input_shape: Sequence[int],
                  backend: Optional[str] = None) -> bool:
  """Whether `conv3x3_as_matmul` beats XLA's convolution for an NHWC input:
  on CPU only, for maps of at most MAX_MATMUL_SIDE pixels a side."""
  if (backend or jax.default_backend()) != "cpu":
    return False
  _, height, width, _ = input_shape
  return max(height, width) <= MAX_MATMUL_SIDE


def choose_algorithm(input_shape: Sequence[int], features: int,
                     backend: Optional[str] = None) -> str:
  """"matmul", "winograd" or "direct" for a 3x3 convolution of this input."""
  if prefer_matmul(input_shape, backend):
    return "matmul"
  if winograd.prefer_winograd(input_shape, features, backend):
    return "winograd"
  return "direct"


def conv3x3_as_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """conv(x, kernel), stride 1, SAME padding, NHWC x HWIO -> NHWC, as one
  matrix multiply of the input's 3x3 neighbourhoods by the kernel."""
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"conv3x3_as_matmul needs a 3x3 kernel, got "
                     f"{kernel.shape}.")
  _, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Channel block (3 dy + dx) holds the input shifted by (dy - 1, dx - 1),
  # the row order of the HWIO kernel reshaped to [9 C, features].
  neighbourhoods = jnp.concatenate(
      [padded[:, dy:dy + height, dx:dx + width]
       for dy in range(3) for dx in range(3)], axis=-1)
  return jnp.einsum("bhwk,kf->bhwf", neighbourhoods,
                    kernel.reshape(9 * channels, -1))


def xla_conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """XLA's convolution, stride 1, SAME padding: what nn.Conv computes."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_gradient(x: jnp.ndarray, cotangent: jnp.ndarray) -> jnp.ndarray:
  """The gradient of sum(cotangent * conv3x3(x, kernel)) in the kernel,
  [3, 3, C, F]: per tap, the input shifted by it against the cotangent,
  nine [C, B H W] x [B H W, F] matrix multiplies."""
  _, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  flat_cotangent = cotangent.reshape(-1, cotangent.shape[-1])
  taps = [padded[:, dy:dy + height, dx:dx + width].reshape(-1, channels).T
          @ flat_cotangent for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape((3, 3, channels, -1))


# XLA's convolution forward; its kernel gradients, first and second order
# (the discriminator's R1 penalty), as matrix multiplies.
_conv3x3_gemm_kernel_gradient = conv_gradient.with_gradients(
    xla_conv3x3, kernel_gradient)


def prefer_gemm_kernel_gradient(input_shape: Sequence[int], features: int,
                                backend: Optional[str] = None) -> bool:
  """Whether `kernel_gradient` beats XLA's for a direct 3x3 convolution:
  on CPU, with MIN_GEMM_GRADIENT_CHANNELS or more channels in and out, on
  maps of MIN_GEMM_GRADIENT_PIXELS or more."""
  if (backend or jax.default_backend()) != "cpu":
    return False
  _, height, width, channels = input_shape
  return (min(channels, features) >= MIN_GEMM_GRADIENT_CHANNELS and
          height * width >= MIN_GEMM_GRADIENT_PIXELS)


def direct_conv3x3(x: jnp.ndarray, kernel: jnp.ndarray,
                   gemm_kernel_gradient: Optional[bool] = None,
                   backend: Optional[str] = None) -> jnp.ndarray:
  """XLA's convolution, with its kernel gradient as `kernel_gradient` on
  CPU where `prefer_gemm_kernel_gradient` says so (gemm_kernel_gradient
  None), always (True) or never (False).

  XLA:CPU computes a convolution's kernel gradient as another convolution.
  With wide channels on large maps it ran many times slower than the
  forward pass it belongs to, and inside a lax.cond branch (where the
  tokenizer's step updates the discriminator) 7-30x slower again, at any
  width. Values and gradients are the same sums either way.
  """
  backend = backend or jax.default_backend()
  if gemm_kernel_gradient is None:
    gemm_kernel_gradient = prefer_gemm_kernel_gradient(
        x.shape, kernel.shape[-1], backend)
  if backend == "cpu" and gemm_kernel_gradient:
    return _conv3x3_gemm_kernel_gradient(x, kernel)
  return xla_conv3x3(x, kernel)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3)) with the same parameters ("kernel", and
  "bias" when use_bias), computed by the algorithm `choose_algorithm` picks
  for each call's shape. `algorithm` other than "auto" forces one."""
  features: int
  dtype: Dtype = jnp.float32
  algorithm: str = "auto"
  use_bias: bool = False
  # The direct path's kernel gradient (see direct_conv3x3): None picks by
  # shape; True takes matrix multiplies on CPU whatever the shape.
  gemm_kernel_gradient: Optional[bool] = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm={self.algorithm!r}; valid: "
                       f"{', '.join(map(repr, ALGORITHMS))}.")
    kernel = self.param("kernel", self.kernel_init,
                        (3, 3, x.shape[-1], self.features))
    bias = (self.param("bias", self.bias_init, (self.features,))
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    algorithm = (choose_algorithm(x.shape, self.features)
                 if self.algorithm == "auto" else self.algorithm)
    if algorithm == "matmul":
      y = conv3x3_as_matmul(x, kernel)
    elif algorithm == "winograd":
      y = winograd.conv3x3(x, kernel)
    else:
      y = direct_conv3x3(x, kernel, self.gemm_kernel_gradient)
    return y if bias is None else y + bias


class Conv1x1(nn.Module):
  """nn.Conv(features, (1, 1)) without bias, the same parameter, as one
  matrix multiply over the channels: its kernel gradient is then a matrix
  multiply too (see direct_conv3x3 for why that matters on CPU)."""
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", self.kernel_init,
                        (1, 1, x.shape[-1], self.features))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0])
