"""Fashion-MNIST from local idx files, as a TFDS builder (no download).

The idx files come from the Debian package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist) or any directory holding the same four
files, gzipped or not:

  train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   -> split "train"
  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    -> split "test"

Examples are {"image": uint8 [28, 28, 1] (PNG in the records), "label": int}.
The builder is not registered in the TFDS catalogue, so its name
`fashion_mnist_idx` never shadows the catalogue's `fashion_mnist`.
A prepared copy in `data_dir` is reused as is: use another `data_dir` to
rebuild from other idx files.
"""

import gzip
import os
from typing import Iterator, Optional, Tuple

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_HINT = "apt-get install dataset-fashion-mnist"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")

# split -> (images file, labels file), without the optional ".gz".
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_UBYTE = 0x08


def find_idx_file(source_dir: str, name: str) -> str:
  """Path of `name.gz` or else `name` in `source_dir`; FileNotFoundError."""
  for candidate in (name + ".gz", name):
    path = os.path.join(source_dir, candidate)
    if os.path.isfile(path):
      return path
  expected = sorted(f"{n}[.gz]" for pair in SPLIT_FILES.values() for n in pair)
  raise FileNotFoundError(
      f"Fashion-MNIST file {name}[.gz] not found in {source_dir!r}. That "
      f"directory must hold {', '.join(expected)}. On Debian/Ubuntu "
      f"`{APT_HINT}` installs them in {DEFAULT_SOURCE_DIR}; otherwise set "
      "data.source_dir to the directory that has them.")


def read_idx(path: str) -> np.ndarray:
  """Reads an unsigned-byte idx file (gzipped if its name ends in .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an idx file (bad magic number).")
  if data[2] != _IDX_UBYTE:
    raise ValueError(f"{path} holds idx type {data[2]:#04x}; only unsigned "
                     f"bytes ({_IDX_UBYTE:#04x}) are supported.")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
  values = np.frombuffer(data, np.uint8, offset=header)
  if values.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} ({np.prod(shape)} "
                     f"values) but the file holds {values.size}.")
  return values.reshape(shape)


def read_split(source_dir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """Returns uint8 images [n, 28, 28] and labels [n] of one split."""
  images_name, labels_name = SPLIT_FILES[split]
  images = read_idx(find_idx_file(source_dir, images_name))
  labels = read_idx(find_idx_file(source_dir, labels_name))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split} files in {source_dir!r} disagree: "
                     f"images {images.shape}, labels {labels.shape}.")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"Fashion-MNIST {split} labels in {source_dir!r} go up "
                     f"to {labels.max()}; valid labels are "
                     f"0..{len(CLASS_NAMES) - 1}.")
  return images, labels


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Fashion-MNIST read from local idx files."""

  name = "fashion_mnist_idx"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from local idx files."}

  def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
    self._source_dir = os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs would read README and
    # citation files from this package's directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST (Zalando) from local idx files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # Read everything up front so that a missing file fails before writing.
    splits = {name: read_split(self._source_dir, name) for name in SPLIT_FILES}
    return {name: self._generate_examples(*arrays)
            for name, arrays in splits.items()}

  def _generate_examples(self, images: np.ndarray,
                         labels: np.ndarray) -> Iterator:
    # PIL images, not numpy: TFDS encodes numpy images with TensorFlow.
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": PIL.Image.fromarray(image),
                "label": int(label)}
