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


def free_port():
  """A TCP port free on localhost (for a jax.distributed coordinator)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(argv_of, timeout=120):
  """Runs `argv_of(0)` and `argv_of(1)` side by side on one CPU device each
  (no fake devices) and returns each one's JSON `RESULT ...` line, parsed,
  keyed by its "process"; a process that fails fails the test."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  processes = [subprocess.Popen(argv_of(i), env=env, text=True,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for i in range(2)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=timeout))
  finally:
    for process in processes:
      process.kill()
  results = {}
  for process, (out, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    results[result["process"]] = dict(result, err=err)
  return results


def main_exit(*flag_args):
  """Runs maskgit_jax.main's `main` in this process with `flag_args` and
  returns the code of the SystemExit it must end with."""
  import pytest
  from absl import flags
  from maskgit_jax import main as main_lib
  flags.FLAGS(["main", *flag_args])
  try:
    with pytest.raises(SystemExit) as stopped:
      main_lib.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
  return stopped.value.code


def install_fake_gcs(root):
  """Routes gs:// paths (etils.epath, through fsspec, as on a machine
  without TensorFlow) to folders under `root`: a local stand-in for an
  object store. Returns a function that undoes it."""
  import fsspec
  from fsspec.implementations.local import LocalFileSystem
  root = os.fspath(root)

  class FakeGcs(LocalFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      del finalize_on_close  # A gcsfs option epath passes.
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for scheme in ("gs://", "gcs://"):
        if path.startswith(scheme):
          path = path[len(scheme):]
      return path if path.startswith(root) else os.path.join(root, path)

    def unstrip_protocol(self, name):
      return "gs://" + os.path.relpath(name, root)

  registry = fsspec.registry
  before = {p: registry.get(p) for p in FakeGcs.protocol}
  for protocol in FakeGcs.protocol:
    fsspec.register_implementation(protocol, FakeGcs, clobber=True)
  _forget_epath_filesystems()

  def uninstall():
    # fsspec.registry is a read-only view; the module holds the dict.
    registered = getattr(sys.modules["fsspec.registry"], "_registry")
    for protocol, cls in before.items():
      registered.pop(protocol, None)
      if cls is not None:
        fsspec.register_implementation(protocol, cls, clobber=True)
    FakeGcs.clear_instance_cache()
    _forget_epath_filesystems()
  return uninstall


def _forget_epath_filesystems():
  """etils.epath caches the fsspec file system it made per scheme."""
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()


def initialize(init_fn, seed=0):
  """init_fn(key) compiled as the training loop compiles it."""
  import jax  # pylint: disable=g-import-not-at-top
  from maskgit_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.initialize(init_fn, jax.random.key(seed))


def leaf(tree, suffix):
  """The one leaf whose "/"-joined key path is or ends in "/" + `suffix`."""
  import jax  # pylint: disable=g-import-not-at-top
  from maskgit_jax import sharding  # pylint: disable=g-import-not-at-top
  found = [x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if ("/" + sharding.path_string(path)).endswith("/" + suffix)]
  assert len(found) == 1, (suffix, len(found))
  return found[0]


def assert_close_at_scale(got, want, scale_tol=2e-6):
  """Every element of `got` within scale_tol x max|want| of `want`: what
  float rounding allows two algorithms for the same sums."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=scale_tol * float(np.max(np.abs(want))))


def assert_conv3x3_gradients_are_xlas(conv3x3, input_shape, features):
  """conv3x3(x, kernel)'s input and kernel gradients (of its sum against a
  random probe) are XLA's convolution's, to float rounding."""
  import jax
  import jax.numpy as jnp
  from maskgit_jax.models import conv
  x = jax.random.normal(jax.random.key(0), input_shape)
  kernel = jax.random.normal(jax.random.key(1),
                             (3, 3, input_shape[-1], features))
  probe = jax.random.normal(jax.random.key(2), input_shape[:3] + (features,))
  grad = lambda fn: jax.jit(jax.grad(
      lambda x, k: jnp.sum(probe * fn(x, k)), argnums=(0, 1)))(x, kernel)
  for got, want in zip(grad(conv3x3), grad(conv.xla_conv3x3), strict=True):
    assert_close_at_scale(got, want, 1e-5)
