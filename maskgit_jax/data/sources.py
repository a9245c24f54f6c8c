"""Random-access image sources (TFDS array_record) for the grain pipelines.

`build_source(data_config, split)` picks the source from `data_config.name`:

* "fashion_mnist": `FashionMnistIdx` over the idx files in
  `data_config.source_dir` (default /usr/share/datasets/fashion-mnist, from
  `apt-get install dataset-fashion-mnist`), built into `data_config.data_dir`
  on first use (seconds), reused afterwards. Splits: train, test.
* "image_folder": `MaskgitImageFolder` over `data_config.source_dir`
  (`root/<class>/<image>`), built on first use. Splits: train, plus
  validation when `data_config.validation_fraction` > 0.
* any other name is read from the TFDS catalogue (e.g. "imagenet2012",
  "imagenet2012:5.1.0", "cifar10"), which must already be prepared in
  `data_config.data_dir` in the array_record format; nothing is downloaded
  at run time. ImageNet needs its tar files downloaded by hand first:

      tfds build imagenet2012 --file_format=array_record \
          --data_dir=DATA_DIR --manual_dir=DIR_WITH_ILSVRC2012_TARS

  (that step may need TensorFlow installed; reading afterwards does not).

With `data.in_memory` a split is read and decoded once per process and
then served from memory (`in_memory.InMemorySource`): the same records in
the same order, for small datasets such as Fashion-MNIST.

The local datasets are built under a file lock in the data_dir, so the
processes of a multi-process job build one once (the others wait for it).
"""

import os
from typing import Optional

import tensorflow_datasets as tfds
from ml_collections import config_dict

from maskgit_jax.data import fashion_mnist
from maskgit_jax.data import image_folder
from maskgit_jax.data import in_memory

LOCAL_SOURCES = ("fashion_mnist", "image_folder")


def _data_dir(data_config: config_dict.ConfigDict) -> Optional[str]:
  data_dir = data_config.get("data_dir")
  return os.path.expanduser(data_dir) if data_dir else None


def make_builder(
    data_config: config_dict.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `data_config.name` (not yet prepared)."""
  name = data_config.name
  data_dir = _data_dir(data_config)
  if name == "fashion_mnist":
    return fashion_mnist.FashionMnistIdx(
        source_dir=data_config.get("source_dir"), data_dir=data_dir,
        file_format="array_record")
  if name == "image_folder":
    return image_folder.MaskgitImageFolder(
        source_dir=data_config.get("source_dir"),
        validation_fraction=data_config.get("validation_fraction", 0.0),
        skip_corrupt_images=data_config.get("skip_corrupt_images", True),
        data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"Unknown dataset name {name!r}. Valid names: "
        f"{', '.join(LOCAL_SOURCES)}, or a TFDS catalogue name prepared as "
        "array_record (e.g. 'imagenet2012').") from None


def prepare(data_config: config_dict.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the local datasets if needed; checks catalogue ones are there."""
  builder = make_builder(data_config)
  if builder.is_prepared():
    return builder
  if data_config.name in LOCAL_SOURCES:
    return _build_once(data_config, builder)
  name = data_config.name
  raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}. "
      f"Build it once as array_record, e.g.: tfds build {name} "
      f"--file_format=array_record --data_dir={builder.data_dir_root} "
      "[--manual_dir=DIR for datasets whose files must be downloaded by hand, "
      "such as imagenet2012].")


def _build_once(data_config: config_dict.ConfigDict,
                builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds a local dataset under a file lock in its data_dir, so that the
  processes of one machine (or of several sharing a disk) build it once:
  the first builds, the others wait and then read it."""
  import fcntl  # POSIX only, like the rest of the local pipelines.
  root = os.fspath(builder.data_dir_root)
  os.makedirs(root, exist_ok=True)
  lock_file = os.path.join(root, f".{data_config.name}.build.lock")
  with open(lock_file, "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = make_builder(data_config)  # Another may have built it.
      if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return make_builder(data_config)


def build_source(data_config: config_dict.ConfigDict, split: str):
  """A grain-compatible random-access source of {"image", "label", ...} dicts.

  Args:
    data_config: the data config (see `data_config.default_data_config`).
    split: a split name of that dataset ("train", "test", "validation"), or a
      TFDS slice such as "train[:90%]".
  """
  builder = prepare(data_config)
  formats = [builder.info.file_format] + list(
      builder.info.alternative_file_formats or ())
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise ValueError(
        f"Dataset {data_config.name!r} in {builder.data_dir!r} is stored as "
        f"{[str(f.value) for f in formats if f]}; the pipelines need "
        "array_record. Rebuild it with --file_format=array_record.")
  names = [part.split("[")[0].strip() for part in split.split("+")]
  if any(name not in builder.info.splits for name in names):
    raise ValueError(f"Dataset {data_config.name!r} has no split {split!r}; "
                     f"valid splits: {sorted(builder.info.splits)}.")
  source = builder.as_data_source(
      split=split, file_format=tfds.core.FileFormat.ARRAY_RECORD)
  if data_config.get("in_memory", False):
    return in_memory.load(source, key=(os.fspath(builder.data_dir), split),
                          name=f"{data_config.name} {split}")
  return source


def num_classes(data_config: config_dict.ConfigDict) -> int:
  """Number of label values of the (prepared) dataset."""
  return prepare(data_config).info.features["label"].num_classes
