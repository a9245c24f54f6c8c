"""What the stage and CLI tests share: tiny data, tiny configs, `main` runs.

The trained workdirs themselves are session fixtures in conftest.py.
Nothing here imports jax (conftest imports this before the device setup
matters, and the configs must stay importable without jax).
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np

from maskgit_jax import config_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 48, 16  # images in the tiny idx dataset's splits
TOKENIZER_CONFIG = "configs/vqgan_fashion_mnist.py:tiny"
TRANSFORMER_CONFIG = "configs/maskgit_fashion_mnist.py:tiny"


def load_config(name, arg="tiny"):
  return config_base.from_file(os.path.join(REPO, "configs", f"{name}.py"),
                               arg)


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def garments(n, seed):
  """Class-dependent stripes plus noise: learnable, like a toy Fashion-MNIST."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 10
  rows = np.arange(28)[None, :, None]
  stripes = ((rows // (labels[:, None, None] % 4 + 2)) % 2) * 200
  images = stripes + rng.integers(0, 40, (n, 28, 28))
  return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_garments(root):
  """The tiny Fashion-MNIST-shaped idx files (train and t10k) in `root`."""
  for prefix, (n, seed) in {"train": (NUM_TRAIN, 0),
                            "t10k": (NUM_TEST, 1)}.items():
    images, labels = garments(n, seed)
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def garment_batch(n=8, seed=3):
  """{"image": float32 [n, 32, 32, 3]}: garments padded to the tiny size."""
  images = garments(n, seed)[0][..., None].repeat(3, -1) / 255.0
  return {"image": np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))
                          ).astype(np.float32)}


def tokenizer_config(data_dirs):
  config = load_config("vqgan_fashion_mnist")
  config.data.source_dir, config.data.data_dir = data_dirs
  return config


def transformer_config(tokenizer_workdir):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_rows(workdir):
  """The metrics rows of training steps (not of evaluations)."""
  return [row for row in read_metrics(workdir) if "loss" in row]


def committed_steps(workdir):
  return sorted(int(name) for name in
                os.listdir(os.path.join(workdir, "checkpoints"))
                if name.isdigit())


def file_bytes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def one_device_env():
  """os.environ for a child process on one CPU device: XLA_FLAGS without
  conftest's 8 fake devices (its other flags kept)."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  return dict(os.environ, XLA_FLAGS=" ".join(flags))


def run_main(*args):
  """`python -m maskgit_jax.main ARGS` in a fresh process on one device."""
  return subprocess.run([sys.executable, "-m", "maskgit_jax.main", *args],
                        capture_output=True, text=True, cwd=REPO,
                        env=one_device_env())
