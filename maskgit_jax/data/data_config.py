"""The data config: what every stage config holds under `config.data`.

Kept apart from the pipelines so that configs import it without loading
JAX or grain.

`default_data_config()` returns an ml_collections ConfigDict with:

  name: "fashion_mnist", "image_folder", or a TFDS catalogue name prepared as
    array_record such as "imagenet2012" (see `sources`).
  data_dir: where TFDS datasets are built and read; "~" is expanded; None
    means the TFDS default (~/tensorflow_datasets).
  source_dir: the raw files: the idx directory for fashion_mnist (None means
    /usr/share/datasets/fashion-mnist), the class-folder root for
    image_folder; unused for catalogue datasets.
  validation_fraction: image_folder only: part of the images held out as the
    "validation" split (0 means only "train").
  skip_corrupt_images: image_folder only: skip (and log) unreadable images
    rather than fail the build.
  train_split, eval_split: the split names the trainers and evaluators read
    (fashion_mnist: train/test; imagenet2012: train/validation).
  image_size: S, the side of the square output images.
  random_resized_crop_scale: (lo, hi) area fraction of a training crop,
    relative to the largest crop of the drawn aspect ratio that fits.
  random_resized_crop_ratio: (lo, hi) aspect ratio (width / height) of a
    training crop, drawn log-uniformly; (1, 1) keeps crops square, so
    objects are never stretched.
  random_flip: flip training images left-right with probability 1/2.
  in_memory: read each split once, decode it, and serve it from memory
    (`in_memory.InMemorySource`; the same records, order and values). For
    small datasets whose images share one shape (Fashion-MNIST: 47 MiB);
    it saves a record decode (0.3-0.5 ms) on every read after the first.
  worker_count: grain worker processes (0: all in this process). More than 0
    needs absl flags parsed first (absl.app.run does it).
  worker_buffer_size: batches each worker prepares ahead.
  read_threads: threads reading and decoding records.
  prefetch_buffer_size: records read ahead by those threads.
"""

from ml_collections import config_dict


def default_data_config() -> config_dict.ConfigDict:
  """Fashion-MNIST at 32x32; every key is described in the module docstring."""
  config = config_dict.ConfigDict()
  config.name = "fashion_mnist"
  config.data_dir = "~/.cache/maskgit_jax/tfds"
  config.source_dir = config_dict.placeholder(str)
  config.validation_fraction = 0.0
  config.skip_corrupt_images = True
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 32
  config.random_resized_crop_scale = (0.8, 1.0)
  config.random_resized_crop_ratio = (1.0, 1.0)
  config.random_flip = True
  config.in_memory = False
  config.worker_count = 0
  config.worker_buffer_size = 2
  config.read_threads = 4
  config.prefetch_buffer_size = 64
  return config
