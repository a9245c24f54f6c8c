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


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs:// routed to a local folder; the test runs in an empty cwd so a
  stray local `gs:` folder would show."""
  from helpers import install_fake_gcs
  root = tmp_path / "object_store"
  root.mkdir()
  uninstall = install_fake_gcs(root)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  uninstall()
  assert not os.listdir(cwd), os.listdir(cwd)


def test_a_gs_workdir_goes_through_the_path_layer(fake_bucket):
  import json
  import ml_collections
  import numpy as np
  from maskgit_jax import files
  from maskgit_jax import workdir as workdir_lib
  from maskgit_jax.evaluation import plot
  from maskgit_jax.train import images, metrics_writer

  run = workdir_lib.Workdir("gs://bucket/runs/a")
  run.write_config(ml_collections.ConfigDict({"stage": "tokenizer"}))
  writer = metrics_writer.MetricsWriter(run)
  writer.write_scalars(1, {"loss": 2.0})
  writer.write_scalars(2, {"loss": 1.5})
  writer.close()
  images.save_png(np.zeros((8, 8, 3), np.uint8),
                  run.images / "samples.png")
  files.write_json(run.eval_result("demo"), {"fid": 1.0})
  plot.line_plot([1, 2], [3.0, 4.0], run.eval_result("demo", ".png"),
                 xlabel="x", ylabel="y")

  local = fake_bucket / "bucket" / "runs" / "a"
  assert run.load_config().stage == "tokenizer"
  assert [json.loads(line)["step"] for line in
          (local / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  assert os.listdir(local / "tensorboard")  # event files copied up
  assert (local / "images" / "samples.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((local / "eval" / "demo.json").read_text()) == {
      "fid": 1.0}
  assert (local / "eval" / "demo.png").exists()
  # A writer reopened on the same run appends to what is there.
  again = metrics_writer.MetricsWriter(run)
  again.write_scalars(3, {"loss": 1.0})
  again.close()
  assert len((local / "metrics.jsonl").read_text().splitlines()) == 3


def test_local_writes_leave_no_temporary_files(tmp_path):
  from maskgit_jax import files
  target = tmp_path / "deep" / "result.json"
  files.write_json(target, {"a": 1})
  files.write_json(target, {"a": 2})
  assert os.listdir(tmp_path / "deep") == ["result.json"]
  assert files.is_local(str(target)) and files.is_local("file:///x")
  assert not files.is_local("gs://bucket/x")
