"""The FID InceptionV3: parity with the reference port, resizing, loading.

Parity without the real weights. tests/fixtures/inception/reference.npz
holds the weight seed, the image seed and the reference outputs (float32
pool features [4, 2048] and unbiased logits [4, 1008]) for
`inception_parity.random_images(image_seed)` (four 256x256 uint8 images)
through a network whose weights are `inception_parity.random_state_dict(
seed)`. They were computed once, outside the repo, by a throwaway script
that ran in its own virtualenv (torch 2.14.1, torchvision 0.29.1,
torch-fidelity 0.4.0 and pytorch-fid 0.3.0, none of them a dependency):

1. in the repo's environment, save `random_state_dict(0)` and
   `random_images(1)` to an .npz;
2. in the throwaway environment, `torch.save` those arrays, build
   torch-fidelity's `FeatureExtractorInceptionV3(..., ["2048",
   "logits_unbiased"], feature_extractor_weights_path=<that file>)` (a
   strict load_state_dict, so every key and shape of ours is also the
   reference's), move it to float64 (its 'float64' option silently maps to
   float32 in 0.4.0, so the module and its internal dtype were set by hand),
   and run it on the NCHW images; store its outputs as float32.
   As a cross-check the same weights went through pytorch-fid's
   `fid_inception_v3()` (torchvision's Inception3 with the FID blocks) on
   torch-fidelity's resized input: it agreed to 5e-8, and torch-fidelity in
   float32 agreed with float64 to 7e-7.

Tolerance measure, for each output array: max|ours - ref| / max|ref| must
be <= 1e-4 (an elementwise ratio is meaningless for logits that cancel to
near zero). Measured on CPU: 7.0e-7 (pool) and 7.8e-7 (logits).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inception_parity
from maskgit_jax.models import inception
from maskgit_jax.tools import convert_inception

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception",
                       "reference.npz")
TOLERANCE = 1e-4


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE, allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def state_dict(reference):
  return inception_parity.random_state_dict(int(reference["seed"]))


@pytest.fixture(scope="module")
def params(state_dict, tmp_path_factory):
  """The seeded weights, through the converter's file and the loader."""
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  convert_inception.convert_state_dict(state_dict, path)
  return inception.load_inception_params(path)


def test_matches_reference_port(reference, params, state_dict):
  images = inception_parity.random_images(int(reference["image_seed"]))
  assert images.shape == tuple(reference["image_shape"])
  pool, logits = inception.features(params, images)
  assert pool.dtype == logits.dtype == jnp.float32
  assert relative_error(pool, reference["pool"]) <= TOLERANCE
  assert relative_error(logits, reference["logits"]) <= TOLERANCE
  # Unbiased: the logits are the pool features times the weight, no bias.
  unbiased = np.asarray(pool, np.float64) @ state_dict["fc.weight"].T
  assert relative_error(logits, unbiased) <= TOLERANCE


@pytest.mark.parametrize("height,width", [(64, 64), (384, 512)])
def test_other_image_sizes_run(params, height, width):
  images = inception_parity.random_images(2, count=1, height=height,
                                          width=width)
  pool, logits = inception.features(params, images)
  assert pool.shape == (1, inception.POOL_DIM)
  assert logits.shape == (1, inception.NUM_LOGITS)
  assert np.isfinite(pool).all() and np.isfinite(logits).all()
  assert float(np.abs(pool).max()) > 0


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 4)),
                                          ((13, 10), (6, 10)),
                                          ((3, 3), (299, 2))])
def test_resize_matches_tf1_bilinear(in_hw, out_hw):
  image = np.random.default_rng(3).integers(0, 256, (*in_hw, 3), np.uint8)
  ours = inception.resize_bilinear_tf1(image[None], out_hw)[0]
  expected = inception_parity.tf1_resize_reference(image, *out_hw)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-4)


def test_resize_to_own_size_is_identity():
  image = np.random.default_rng(4).integers(0, 256, (1, 9, 6, 3), np.uint8)
  ours = inception.resize_bilinear_tf1(image, (9, 6))
  np.testing.assert_array_equal(np.asarray(ours), image.astype(np.float32))


def test_missing_weights_say_what_to_get(tmp_path):
  path = str(tmp_path / "inception_fid.npz")
  with pytest.raises(FileNotFoundError) as error:
    inception.load_inception_params(path)
  message = str(error.value)
  assert inception.TORCH_WEIGHTS_FILE in message
  assert path in message
  assert ("python -m maskgit_jax.tools.convert_inception --src "
          f"pt_inception-2015-12-05-6726825d.pth --out {path}") in message


def test_wrong_npz_names_the_missing_variable(tmp_path):
  path = str(tmp_path / "partial.npz")
  np.savez(path, **{"params/fc/kernel": np.zeros((2048, 1008), np.float32)})
  with pytest.raises(ValueError, match="Conv2d_1a_3x3"):
    inception.load_inception_params(path)


def test_unknown_torch_key_is_named(state_dict):
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    inception.params_from_torch({**state_dict,
                                 "AuxLogits.fc.weight": np.zeros((1, 1))})


def test_mapping_transposes_kernels(state_dict):
  flat = inception.params_from_torch(state_dict)
  conv = state_dict["Mixed_6b.branch7x7_2.conv.weight"]      # [O, I, 1, 7]
  kernel = flat["params/Mixed_6b/branch7x7_2/conv/kernel"]   # [1, 7, I, O]
  assert kernel.shape == (1, 7, conv.shape[1], conv.shape[0])
  assert kernel[0, 5, 3, 2] == conv[2, 3, 0, 5]
  np.testing.assert_array_equal(flat["params/fc/kernel"],
                                state_dict["fc.weight"].T)
  np.testing.assert_array_equal(
      flat["batch_stats/Mixed_7c/branch_pool/bn/var"],
      state_dict["Mixed_7c.branch_pool.bn.running_var"])


@pytest.mark.parametrize("images,match", [
    (np.zeros((1, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((1, 32, 32, 1), np.uint8), "shape"),
    (np.zeros((32, 32, 3), np.uint8), "shape")])
def test_bad_images_are_rejected(params, images, match):
  with pytest.raises(ValueError, match=match):
    inception.features(params, images)


def test_converter_without_torch_says_so(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  code = convert_inception.main(["--src", str(tmp_path / "x.pth"),
                                 "--out", str(tmp_path / "x.npz")])
  assert code == 1
  assert "PyTorch" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x.npz")


def test_converter_reads_a_torch_file(state_dict, tmp_path):
  """Only where torch happens to be installed (it is no dependency)."""
  torch = pytest.importorskip("torch")
  src, out = str(tmp_path / "w.pth"), str(tmp_path / "w.npz")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, src)
  assert convert_inception.main(["--src", src, "--out", out]) == 0
  loaded = inception.load_inception_params(out)
  expected = inception.unflatten(inception.params_from_torch(state_dict))
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
