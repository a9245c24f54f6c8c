"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3).

A 3x3 convolution computes each 2x2 block of outputs from a 4x4 input tile
with 36 multiplies per channel pair; Winograd's transform does it with 16
(Lavin & Gray, arXiv 1509.09308): the input tiles and the kernel are mapped
by fixed 4x4 matrices of 0, +-1 and +-1/2, the products become 16
independent GEMMs [tiles, C_in] x [C_in, C_out], and a 2x4 matrix maps the
results back. The transforms are additions only, so on XLA:CPU, where the
released tokenizer's pixel decoder is bound by its 3x3 convolutions, fewer
multiplies are fewer seconds once the channels are wide enough to make the
GEMMs dominate (`prefer_winograd`). The result equals the direct
convolution's up to float rounding (about 1e-6 of the output's scale in
float32).
"""

from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.models import conv_gradient

# Input transform B^T, kernel transform G and output transform A^T.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
              np.float32)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# Measured on 2 CPU cores (benchmarks/RESULTS.md): with 128 or more input
# channels and at least 1024 output tiles per call the GEMMs dominate and
# F(2x2, 3x3) was 1.1-1.6x faster than XLA's convolution; with 64 channels
# or fewer, or few tiles (16x16 maps), the transforms made it slower.
MIN_CHANNELS = 128
MIN_TILES = 1024


def prefer_winograd(input_shape: Sequence[int], features: int,
                    backend: Optional[str] = None) -> bool:
  """Whether `conv3x3` beats XLA's convolution for an NHWC input: on CPU
  only (accelerators have tuned convolutions), wide channels, many tiles."""
  if (backend or jax.default_backend()) != "cpu":
    return False
  batch, height, width, channels = input_shape
  tiles = batch * -(-height // 2) * -(-width // 2)
  return (channels >= MIN_CHANNELS and features >= MIN_CHANNELS
          and tiles >= MIN_TILES)


def _combine(matrix, terms):
  """[sum_j matrix[i][j] * terms[j] for each row i], with the 0/+-1
  coefficients as additions."""
  rows = []
  for coefficients in matrix:
    total = None
    for c, term in zip(coefficients, terms):
      if c == 0:
        continue
      part = term if c == 1 else -term
      total = part if total is None else total + part
    rows.append(total)
  return rows


def transform_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """HWIO [3, 3, I, O] -> G g G^T, [16, I, O] (row-major over the 4x4)."""
  g = jnp.asarray(_G, kernel.dtype)
  out = jnp.einsum("ai,ijxy,bj->abxy", g, kernel, g)
  return out.reshape((16,) + kernel.shape[2:])


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """conv(x, kernel), stride 1, SAME padding: NHWC x HWIO -> NHWC.

  Any height and width (odd sizes are padded to whole tiles, then cropped).
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"conv3x3 needs a 3x3 kernel, got {kernel.shape}.")
  return _conv3x3(x, kernel.astype(x.dtype))


def _input_tiles(x: jnp.ndarray) -> List[List[jnp.ndarray]]:
  """B^T d B of every 4x4 input tile (stride 2): v[i][j] [N, rows, cols, C]."""
  _, height, width, _ = x.shape
  rows, cols = -(-height // 2), -(-width // 2)
  padded = jnp.pad(x, ((0, 0), (1, 2 * rows + 1 - height),
                       (1, 2 * cols + 1 - width), (0, 0)))
  # tile[a][b]: element (a, b) of every 4x4 input tile, [N, rows, cols, C].
  tile = [[padded[:, a:a + 2 * rows:2, b:b + 2 * cols:2] for b in range(4)]
          for a in range(4)]
  # First over the tile's rows, then over its columns.
  by_rows = [_combine(_BT, [tile[a][b] for a in range(4)]) for b in range(4)]
  return [_combine(_BT, [by_rows[b][i] for b in range(4)]) for i in range(4)]


def _winograd(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  batch, height, width, _ = x.shape
  v = _input_tiles(x)
  # One GEMM per tile element, each straight from its own transform. Stacking
  # the 16 into one batched GEMM copied all of them once more (four times
  # the input's size): the released decoder's 256x256 convolutions took
  # 192-199 ms that way, 156-170 ms this way (2 images, 2 CPU cores).
  u = transform_kernel(kernel)
  m = [[jnp.einsum("nrci,io->nrco", v[i][j], u[4 * i + j]) for j in range(4)]
       for i in range(4)]
  # A^T m A, back to the 2x2 outputs of each tile.
  by_rows = [_combine(_AT, [m[i][j] for i in range(4)]) for j in range(4)]
  y = [_combine(_AT, [by_rows[j][r] for j in range(4)]) for r in range(2)]
  out = jnp.stack([jnp.stack(y[r], axis=3) for r in range(2)], axis=2)
  rows, cols = out.shape[1], out.shape[3]
  out = out.reshape(batch, 2 * rows, 2 * cols, -1)
  return out[:, :height, :width]


def _kernel_gradient(x: jnp.ndarray, cotangent: jnp.ndarray) -> jnp.ndarray:
  """d sum(cotangent * conv3x3(x, kernel)) / d kernel, in the transform
  domain: the output transform's transpose maps the cotangent's 2x2 tiles
  to 16 [tiles, C_out] arrays, one batched GEMM against the input
  transforms gives the gradient of the 16 transformed kernels, and G^T
  (.) G maps it back to 3x3."""
  _, height, width, channels = x.shape
  rows, cols = -(-height // 2), -(-width // 2)
  g = jnp.pad(cotangent, ((0, 0), (0, 2 * rows - height),
                          (0, 2 * cols - width), (0, 0)))
  g = [[g[:, r::2, q::2] for q in range(2)] for r in range(2)]
  a = tuple(zip(*_AT))  # A, the transpose of A^T: 4 x 2
  by_rows = [_combine(a, [g[r][q] for r in range(2)]) for q in range(2)]
  dm = [_combine(a, [by_rows[q][i] for q in range(2)]) for i in range(4)]
  v = _input_tiles(x)
  def stacked(terms):  # 16 x [N, rows, cols, K] -> [16, tiles, K]
    return jnp.stack([t.reshape(-1, t.shape[-1]) for row in terms
                      for t in row])
  du = jnp.einsum("tpi,tpo->tio", stacked(v), stacked(dm))
  gt = jnp.asarray(_G, x.dtype)
  return jnp.einsum("ai,abxy,bj->ijxy", gt, du.reshape((4, 4, channels, -1)),
                    gt)


# Autodiff of `_winograd`'s 16 separate GEMMs was slower than that of the
# stacked, batched form (2x256x256x128, 2 CPU cores: 1.1-2.1 s against 0.72 s
# for a sum of sines of the output). Instead, the input's gradient is the
# same Winograd convolution of the cotangent, and the kernel's is one
# batched GEMM in the transform domain; only x is kept for it, not its 16
# transforms. A swish-conv-swish block's gradient took 653-674 ms this way,
# 689-710 ms by autodiff of the stacked form and 2.2-2.3 s with XLA's
# convolution.
_conv3x3 = conv_gradient.with_gradients(_winograd, _kernel_gradient)
