"""InceptionV3 as the FID feature network (the 2015-12-05 TensorFlow graph).

FID, Inception Score and precision/recall are only comparable with published
numbers when computed by the very network the field uses: the 2015-12-05
TensorFlow InceptionV3 graph, as ported to PyTorch by pytorch-fid and
torch-fidelity. That graph differs from torchvision's InceptionV3 in ways
that change the numbers, and each is reproduced here:

- the input is resized to 299x299 with TensorFlow 1's bilinear resize
  (align_corners=False and no half-pixel centres), then mapped to [-1, 1]
  as (x - 128) / 128;
- the 3x3 average pools inside Mixed_5*, Mixed_6b-e and Mixed_7b ignore the
  padded zeros in their averages (count_include_pad=False);
- the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool;
- BatchNorm runs in inference form with epsilon 0.001;
- the classifier has 1008 outputs; Inception Score reads the logits without
  the classifier bias.

Weights: `load_inception_params` reads a plain .npz written by
`python -m maskgit_jax.tools.convert_inception` from the standard
`pt_inception-2015-12-05-6726825d.pth`. `params_from_torch` is the one name
mapping from that file's state dict to this module's variables.
"""

import functools
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = Dict[str, Any]
Pair = Tuple[int, int]

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3

TORCH_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/"
                     f"download/fid_weights/{TORCH_WEIGHTS_FILE}")
DEFAULT_NPZ = "inception_fid.npz"
# Separates the levels of a variable's path in the .npz keys.
SEP = "/"


def convert_command(out: str = DEFAULT_NPZ) -> str:
  """The shell command that writes `out`; error messages quote it."""
  return (f"python -m maskgit_jax.tools.convert_inception "
          f"--src {TORCH_WEIGHTS_FILE} --out {out}")


# ---------------------------------------------------------------- resizing


def _tf1_bilinear_taps(in_size: int,
                       out_size: int) -> Tuple[np.ndarray, np.ndarray,
                                               np.ndarray]:
  """(lower index, upper index, weight of upper) per output pixel.

  TensorFlow 1 (align_corners=False, no half-pixel centres) samples output
  pixel i at source coordinate i * (in / out), with the scale and the product
  in float32. The taps depend on shapes only, so they are numpy constants.
  """
  scale = np.float32(in_size / out_size)
  source = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(source).astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
  weight = (source - lower.astype(np.float32)).astype(np.float32)
  return lower, upper, weight


def resize_bilinear_tf1(images: jnp.ndarray, size: Pair) -> jnp.ndarray:
  """[B, H, W, C] float -> [B, *size, C], TensorFlow 1's bilinear resize.

  Interpolates along the width first, then the height, as torch-fidelity's
  port does, so that float32 results agree to the last bits.
  """
  images = jnp.asarray(images, jnp.float32)
  y_lo, y_hi, dy = _tf1_bilinear_taps(images.shape[1], size[0])
  x_lo, x_hi, dx = _tf1_bilinear_taps(images.shape[2], size[1])
  dx = jnp.asarray(dx)[None, None, :, None]
  dy = jnp.asarray(dy)[None, :, None, None]

  def along_width(rows: jnp.ndarray) -> jnp.ndarray:
    left, right = rows[:, :, x_lo], rows[:, :, x_hi]
    return left + (right - left) * dx

  top = along_width(images[:, y_lo])
  bottom = along_width(images[:, y_hi])
  return top + (bottom - top) * dy


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1]."""
  x = resize_bilinear_tf1(images, (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------ layers


def _symmetric(padding: Pair) -> Tuple[Pair, Pair]:
  return ((padding[0], padding[0]), (padding[1], padding[1]))


def avg_pool_3x3_same(x: jnp.ndarray) -> jnp.ndarray:
  """3x3, stride 1, pad 1, averaging only real pixels (TF's SAME pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x: jnp.ndarray) -> jnp.ndarray:
  """3x3, stride 1, pad 1 (padding never wins a max)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_down(x: jnp.ndarray) -> jnp.ndarray:
  """3x3, stride 2, no padding: halves the grid (floor), as in the graph."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
  """Conv (no bias) -> inference BatchNorm (eps 0.001) -> ReLU."""
  features: int
  kernel_size: Pair = (1, 1)
  strides: Pair = (1, 1)
  padding: Pair = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=_symmetric(self.padding), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON,
                     name="bn")(x)
    return nn.relu(x)


def _conv(module: nn.Module, name: str, features: int, kernel: Pair = (1, 1),
          strides: Pair = (1, 1), padding: Pair = (0, 0)) -> BasicConv2d:
  return BasicConv2d(features, kernel, strides, padding,
                     precision=module.precision, name=name)


class FIDInceptionA(nn.Module):
  """35x35 block (Mixed_5b-d); its average pool ignores the padding."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b1 = _conv(self, "branch1x1", 64)(x)
    b5 = _conv(self, "branch5x5_1", 48)(x)
    b5 = _conv(self, "branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
    b3 = _conv(self, "branch3x3dbl_1", 64)(x)
    b3 = _conv(self, "branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = _conv(self, "branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = _conv(self, "branch_pool", self.pool_features)(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = _conv(self, "branch3x3", 384, (3, 3), strides=(2, 2))(x)
    bd = _conv(self, "branch3x3dbl_1", 64)(x)
    bd = _conv(self, "branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = _conv(self, "branch3x3dbl_3", 96, (3, 3), strides=(2, 2))(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_down(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """17x17 block with factorised 7x7 convs (Mixed_6b-e)."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = _conv(self, "branch1x1", 192)(x)
    b7 = _conv(self, "branch7x7_1", c7)(x)
    b7 = _conv(self, "branch7x7_2", c7, row[0], padding=row[1])(b7)
    b7 = _conv(self, "branch7x7_3", 192, col[0], padding=col[1])(b7)
    bd = _conv(self, "branch7x7dbl_1", c7)(x)
    bd = _conv(self, "branch7x7dbl_2", c7, col[0], padding=col[1])(bd)
    bd = _conv(self, "branch7x7dbl_3", c7, row[0], padding=row[1])(bd)
    bd = _conv(self, "branch7x7dbl_4", c7, col[0], padding=col[1])(bd)
    bd = _conv(self, "branch7x7dbl_5", 192, row[0], padding=row[1])(bd)
    bp = _conv(self, "branch_pool", 192)(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = _conv(self, "branch3x3_1", 192)(x)
    b3 = _conv(self, "branch3x3_2", 320, (3, 3), strides=(2, 2))(b3)
    b7 = _conv(self, "branch7x7x3_1", 192)(x)
    b7 = _conv(self, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = _conv(self, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = _conv(self, "branch7x7x3_4", 192, (3, 3), strides=(2, 2))(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_down(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 heads (Mixed_7b and Mixed_7c).

  `pool` is the graph's quirk: Mixed_7b (FIDInceptionE_1) averages without
  the padding, Mixed_7c (FIDInceptionE_2) takes a max instead.
  """
  pool: Callable[[jnp.ndarray], jnp.ndarray] = avg_pool_3x3_same
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    def split(y: jnp.ndarray, prefix: str) -> jnp.ndarray:
      a = _conv(self, prefix + "a", 384, (1, 3), padding=(0, 1))(y)
      b = _conv(self, prefix + "b", 384, (3, 1), padding=(1, 0))(y)
      return jnp.concatenate([a, b], axis=-1)

    b1 = _conv(self, "branch1x1", 320)(x)
    b3 = split(_conv(self, "branch3x3_1", 384)(x), "branch3x3_2")
    bd = _conv(self, "branch3x3dbl_1", 448)(x)
    bd = _conv(self, "branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = split(bd, "branch3x3dbl_3")
    bp = _conv(self, "branch_pool", 192)(self.pool(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


FIDInceptionE_1 = functools.partial(FIDInceptionE, pool=avg_pool_3x3_same)
FIDInceptionE_2 = functools.partial(FIDInceptionE, pool=max_pool_3x3_same)


class InceptionV3(nn.Module):
  """[-1, 1] float [B, 299, 299, 3] -> (pool [B, 2048], logits [B, 1008]).

  The logits are pool @ fc weight with no bias: Inception Score uses them
  unbiased (as torch-fidelity's `logits_unbiased`). Convolutions and the
  classifier run at HIGHEST precision so that TPUs (bf16 passes) and GPUs
  (TF32) compute the same features as the float32 reference.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    p = dict(precision=self.precision)
    x = _conv(self, "Conv2d_1a_3x3", 32, (3, 3), strides=(2, 2))(x)
    x = _conv(self, "Conv2d_2a_3x3", 32, (3, 3))(x)
    x = _conv(self, "Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)
    x = max_pool_3x3_down(x)
    x = _conv(self, "Conv2d_3b_1x1", 80)(x)
    x = _conv(self, "Conv2d_4a_3x3", 192, (3, 3))(x)
    x = max_pool_3x3_down(x)
    x = FIDInceptionA(32, **p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, **p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, **p, name="Mixed_5d")(x)
    x = InceptionB(**p, name="Mixed_6a")(x)
    x = FIDInceptionC(128, **p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, **p, name="Mixed_6c")(x)
    x = FIDInceptionC(160, **p, name="Mixed_6d")(x)
    x = FIDInceptionC(192, **p, name="Mixed_6e")(x)
    x = InceptionD(**p, name="Mixed_7a")(x)
    x = FIDInceptionE_1(**p, name="Mixed_7b")(x)
    x = FIDInceptionE_2(**p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, use_bias=False, precision=self.precision,
                      name="fc")(pool)
    return pool, logits


# ---------------------------------------------------------------- features


def check_images(images: Any) -> None:
  """Raises ValueError unless `images` is uint8 [B, H, W, 3]."""
  shape, dtype = np.shape(images), getattr(images, "dtype", None)
  if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3]) < 1:
    raise ValueError(f"Inception features expect uint8 images [B, H, W, 3], "
                     f"got shape {shape}.")
  if dtype != np.uint8:
    raise ValueError(f"Inception features expect uint8 images (0..255), got "
                     f"dtype {dtype}; quantise first, e.g. "
                     f"np.clip(np.round(x * 255), 0, 255).astype(np.uint8).")


@jax.jit
def features(params: Variables,
             images: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """uint8 [B, H, W, 3] -> (pool [B, 2048], unbiased logits [B, 1008]).

  `params` are the variables from `load_inception_params`. Any image size
  works; the resize to 299 happens here, so it compiles once per shape.
  """
  check_images(images)
  return InceptionV3().apply(params, preprocess(images))


# ------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  shapes = jax.eval_shape(
      InceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return tuple((key, tuple(leaf.shape))
               for key, leaf in flatten(shapes).items())


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
  """Flat 'collection/module/.../name' -> shape of every model variable
  (traced once per process, without allocating any weights)."""
  return dict(_expected_shapes())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    path = prefix + key
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + SEP))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Variables:
  """{'a/b/c': leaf} -> nested dicts."""
  tree: Variables = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def check_params(flat: Mapping[str, np.ndarray], source: str) -> None:
  """Raises ValueError naming missing, unexpected or misshapen variables."""
  expected = expected_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(f"{k}: {tuple(np.shape(flat[k]))} (expected {expected[k]})"
                 for k in set(expected) & set(flat)
                 if tuple(np.shape(flat[k])) != expected[k])
  if missing or extra or wrong:
    raise ValueError(
        f"{source} does not hold the FID InceptionV3 variables: "
        f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected "
        f"{extra[:5]}, {len(wrong)} misshapen {wrong[:5]}. Rewrite it with "
        f"`{convert_command()}`.")


def load_inception_params(path: str) -> Variables:
  """Variables for `features` from the .npz that convert_inception writes.

  The file is plain arrays (np.load with allow_pickle=False): nothing in it
  is ever executed.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights not found: {path!r}. Download "
        f"{TORCH_WEIGHTS_FILE} (the file pytorch-fid and torch-fidelity "
        f"use, from {TORCH_WEIGHTS_URL}) and convert it once with "
        f"`{convert_command(path)}` (needs PyTorch, only for that step).")
  with np.load(path, allow_pickle=False) as data:
    flat = {key: np.asarray(data[key], np.float32) for key in data.files}
  check_params(flat, repr(path))
  return unflatten(flat)


# ------------------------------------------------- torch state-dict mapping

# Torch BatchNorm buffers/params -> (collection, our variable name).
_BN_NAMES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}
# Bookkeeping in the torch file with no counterpart in the forward pass:
# BN's step counter, and the classifier bias (the logits are unbiased).
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_KEYS = ("fc.bias",)


def torch_key_to_path(key: str) -> Optional[Tuple[str, Callable[[np.ndarray],
                                                                np.ndarray]]]:
  """Torch state-dict key -> (our flat variable path, array transform).

  None for keys that have no counterpart (see _IGNORED_*). Torch convs are
  [out, in, kh, kw] and linears [out, in]; Flax wants [kh, kw, in, out] and
  [in, out]. Module names are the same on both sides.
  """
  if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES):
    return None
  *modules, leaf = key.split(".")
  if key == "fc.weight":
    return SEP.join(("params", "fc", "kernel")), np.transpose
  if len(modules) >= 2 and modules[-1] == "conv" and leaf == "weight":
    path = SEP.join(("params", *modules, "kernel"))
    return path, lambda w: np.transpose(w, (2, 3, 1, 0))
  if len(modules) >= 2 and modules[-1] == "bn" and leaf in _BN_NAMES:
    collection, name = _BN_NAMES[leaf]
    return SEP.join((collection, *modules, name)), np.asarray
  raise ValueError(f"Unknown key {key!r} in the torch state dict: not a "
                   f"parameter of the FID InceptionV3 ({TORCH_WEIGHTS_FILE}).")


def params_from_torch(
    state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Torch FID InceptionV3 state dict (as numpy) -> flat float32 variables.

  The one mapping used by convert_inception and the parity test; the result
  is checked against the model's variables, so a wrong file fails here.
  """
  flat = {}
  for key, value in state_dict.items():
    mapped = torch_key_to_path(key)
    if mapped is not None:
      path, transform = mapped
      flat[path] = np.ascontiguousarray(transform(np.asarray(value)),
                                        dtype=np.float32)
  check_params(flat, "The torch state dict")
  return flat


def save_params(flat: Mapping[str, np.ndarray], path: str) -> None:
  """Writes flat variables as a plain .npz (uncompressed: floats barely
  compress, and loading stays fast)."""
  with open(path, "wb") as f:
    np.savez(f, **dict(flat))
