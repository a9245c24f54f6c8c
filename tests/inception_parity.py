"""Seeded stand-ins for the FID Inception weights and images (numpy only).

The real weights cannot be fetched in tests, so parity with the reference
port is checked on random weights instead: the same numbers, drawn here from
a seed, are loaded into the reference (once, outside the repo, to write the
fixture) and into our model (in every test run). Each array is drawn from
its own generator keyed by (seed, crc32 of its torch key), so the draw does
not depend on dictionary order.

Scales keep a 94-conv network numerically alive: He-scaled conv kernels,
BatchNorm with gamma and running variance in [0.5, 1.5] (positive) and
small means and betas, and a classifier scaled by 1/sqrt(2048).
"""

import zlib
from typing import Dict, Tuple

import numpy as np

from maskgit_jax.models import inception

SEP = inception.SEP
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def torch_shapes() -> Dict[str, Tuple[int, ...]]:
  """Torch state-dict key -> torch shape, for every variable of our model.

  Inverted from the Flax variables; that the reference port accepts these
  keys and shapes in a strict load_state_dict is what makes the fixture.
  """
  shapes = {}
  for path, shape in inception.expected_shapes().items():
    _, *modules, leaf = path.split(SEP)
    if len(shape) == 4:      # [kh, kw, in, out] -> [out, in, kh, kw]
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:    # [in, out] -> [out, in]
      shape = shape[::-1]
    shapes[".".join((*modules, _TORCH_LEAF[leaf]))] = tuple(shape)
  return shapes


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def random_array(seed: int, key: str, shape: Tuple[int, ...]) -> np.ndarray:
  """One float32 torch-shaped array, its scale chosen by what it is."""
  rng = _rng(seed, key)
  if key.endswith("conv.weight"):
    fan_in = int(np.prod(shape[1:]))
    value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
  elif key == "fc.weight":
    value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
  elif key.endswith(("bn.weight", "bn.running_var")):
    value = rng.uniform(0.5, 1.5, shape)
  elif key.endswith(("bn.bias", "bn.running_mean")):
    value = rng.normal(0.0, 0.1, shape)
  else:
    raise ValueError(f"No rule to draw {key!r}.")
  return value.astype(np.float32)


def random_state_dict(seed: int) -> Dict[str, np.ndarray]:
  """{torch key: float32 array} with the torch file's keys and shapes.

  Includes the classifier bias (the torch model needs it to load; our
  unbiased logits ignore it, as the real file's conversion does).
  """
  state = {key: random_array(seed, key, shape)
           for key, shape in sorted(torch_shapes().items())}
  state["fc.bias"] = _rng(seed, "fc.bias").normal(
      0.0, 0.1, (inception.NUM_LOGITS,)).astype(np.float32)
  return state


def random_images(seed: int, count: int = 4, height: int = 256,
                  width: int = 256) -> np.ndarray:
  """uint8 [count, height, width, 3] uniform noise."""
  return np.random.default_rng(seed).integers(
      0, 256, (count, height, width, 3), dtype=np.uint8)


def tf1_resize_reference(image: np.ndarray, out_h: int,
                         out_w: int) -> np.ndarray:
  """TensorFlow 1 bilinear resize of [H, W, C], written as plain loops.

  Source coordinate = output index * (in / out) (float32), lower tap floor,
  upper tap clamped to the edge; lerp along x, then along y.
  """
  image = image.astype(np.float32)
  in_h, in_w = image.shape[:2]
  scale_y, scale_x = np.float32(in_h / out_h), np.float32(in_w / out_w)
  out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
  for i in range(out_h):
    sy = np.float32(i) * scale_y
    y0 = int(np.floor(sy))
    y1, fy = min(y0 + 1, in_h - 1), np.float32(sy - y0)
    for j in range(out_w):
      sx = np.float32(j) * scale_x
      x0 = int(np.floor(sx))
      x1, fx = min(x0 + 1, in_w - 1), np.float32(sx - x0)
      top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * fx
      bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * fx
      out[i, j] = top + (bottom - top) * fy
  return out
