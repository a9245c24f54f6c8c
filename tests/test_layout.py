"""The package's shape: light to import, inference apart from training, and
one module that knows the workdir layout."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "maskgit_jax")


def loaded_modules(code: str) -> set:
  """Module names loaded after running `code` in a fresh interpreter."""
  out = subprocess.run(
      [sys.executable, "-c",
       code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
      capture_output=True, text=True, check=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO})
  return set(out.stdout.split())


def test_configs_import_without_jax():
  """Configs import maskgit_jax; that must not start JAX or grain."""
  modules = loaded_modules(
      "from maskgit_jax import config_base\n"
      "config_base.from_file('configs/maskgit_fashion_mnist.py')\n"
      "config_base.from_file('configs/vqgan_imagenet256.py')")
  assert not {"jax", "grain", "flax", "orbax"} & modules, sorted(
      {"jax", "grain", "flax", "orbax"} & modules)


def test_inference_never_imports_training():
  modules = loaded_modules(
      "from maskgit_jax import Pipeline, workdir, sampling, editing\n"
      "from maskgit_jax.models import build")
  assert "maskgit_jax.pipeline" in modules
  assert not [m for m in modules if m.startswith("maskgit_jax.train")]


@pytest.mark.parametrize("name", [
    "config.json", "checkpoints", "checkpoints_damaged", "metrics.jsonl",
    "tensorboard", "images", "eval"])
def test_workdir_paths_are_spelled_in_one_module(name):
  """Only maskgit_jax/workdir.py spells the workdir's file names."""
  quoted = r"[\"']" + re.escape(name) + r"[\"']"
  if "." not in name and "_" not in name:  # a common word: only as a path
    quoted = r"(?:join\([^)]*|/\s*)" + quoted
  pattern = re.compile(quoted)
  spelled = []
  for root, _, files in os.walk(PACKAGE):
    for file in files:
      path = os.path.join(root, file)
      if file.endswith(".py") and pattern.search(open(path).read()):
        spelled.append(os.path.relpath(path, REPO))
  assert spelled == [os.path.join("maskgit_jax", "workdir.py")], spelled
