"""`python -m maskgit_jax.tools.plan`: per-device memory of a config's train
step on a mesh, from a CPU compile on virtual devices.

The ImageNet plans run in-process on the 8 devices conftest.py made; the
command line (which sets its own device count before JAX starts) runs in a
subprocess on the tiny config.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, load_config
from maskgit_jax import parallel
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.tools import plan


def run_plan(*args):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", "maskgit_jax.tools.plan",
                         *args], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=600)


@pytest.fixture(scope="module")
def imagenet_config(tmp_path_factory):
  config = load_config("maskgit_imagenet256", "")
  # No tokenizer there: the ImageNet-256 token grid is the default.
  config.tokenizer_workdir = str(tmp_path_factory.mktemp("none") / "vqgan")
  return config


@pytest.mark.slow  # a 2-layer compile: ~10 s
# Two and one of the 24 layers: every layer has the same parameters and
# sharding rules, and the compile grows with the layers (the 24-layer step
# takes about a minute on 2 cores).
@pytest.mark.parametrize("mesh_sizes, num_layers", [
    ({"fsdp": 8}, 2),
    ({"data": 2, "fsdp": 2, "model": 2}, 1)])
def test_imagenet_transformer_plans_on_eight_devices(imagenet_config,
                                                     mesh_sizes, num_layers):
  config = imagenet_config.copy_and_resolve_references()
  config.transformer.num_layers = num_layers
  report = plan.plan_memory(config, mesh_sizes)
  assert report["tokens"]["codebook_size"] == 1024
  assert report["tokens"]["num_tokens"] == 256
  assert "defaults" in report["tokens"]["source"]
  compiled = report["compiled_bytes"]
  assert min(compiled[k] for k in ("arguments", "outputs", "temporaries",
                                   "total")) > 0
  state = report["state_bytes"]
  # Each layer of 768 (MLP 3072) holds 7.08M float32 parameters; the
  # embeddings and the output head over 2,025 tokens add about 3.6M.
  layers = num_layers * 4 * (4 * 768**2 + 2 * 768 * 3072)
  assert layers < state["params"]["total"] < layers + 4 * 4.5e6
  assert state["params"]["per_device"] < state["params"]["total"] / 3
  assert state["opt_state"]["per_device"] < state["opt_state"]["total"] / 3
  # The compiled step holds the sharded state (and the batch) as arguments.
  held = sum(state[k]["per_device"] for k in state)
  assert held <= compiled["arguments"] < held + 2**24
  assert "MiB/device" in plan.format_report({"config": "x", **report})


def test_token_grid_reads_a_tokenizer_workdir(tmp_path):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = str(tmp_path)
  cache = os.fspath(workdir_lib.Workdir(tmp_path).token_cache)
  tokens_lib.write_token_dataset(cache, np.zeros((2, 1, 4, 6), np.int32),
                                 np.zeros(2, np.int32),
                                 metadata={"codebook_size": 77})
  codes, length, source = plan.token_grid(config)
  assert (codes, length) == (77, 24) and "token cache" in source
  codes, length, source = plan.token_grid(config, num_tokens=9)
  assert (codes, length) == (77, 9)
  assert "num_tokens from --num_tokens" in source


@pytest.mark.parametrize("mesh, message", [
    ("data=2,fdsp=2", r"unknown axis 'fdsp'"),
    ("data=2,fsdp=two", r"the size of 'fsdp' is 'two', not an integer"),
    ("data=2,fsdp", r"'fsdp' is not axis=size"),
    ("data=2,data=4", r"axis 'data' is given twice"),
    ("data=-1", r"every size >= 1"),
])
def test_bad_mesh_strings_are_errors(mesh, message):
  with pytest.raises(ValueError, match=message):
    plan.parse_mesh(mesh)


def test_a_mesh_of_another_device_count_is_an_error():
  assert plan.MESH_AXES == parallel.AXIS_NAMES
  with pytest.raises(ValueError, match=r"needs 4 devices, but 8"):
    plan.plan_memory(load_config("maskgit_fashion_mnist"),
                     {"data": 2, "fsdp": 2}, 16, 16)


def test_command_line_plans_on_its_own_virtual_devices(tmp_path):
  """A 4-device mesh although the tests' XLA_FLAGS ask for 8: the tool sets
  its device count before JAX starts."""
  out = tmp_path / "plan.json"
  result = run_plan("--config=configs/maskgit_fashion_mnist.py:tiny",
                    "--mesh=data=2,model=2", "--codebook_size=16",
                    "--num_tokens=16", f"--json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["num_devices"] == 4
  assert report["mesh"] == {"data": 2, "model": 2}
  assert report["tokens"]["codebook_size"] == 16
  assert report["compiled_bytes"]["total"] > 0
  assert "optimizer state" in result.stdout
  assert "codebook_size from --codebook_size, num_tokens from --num_tokens" \
      in result.stdout
  bad = run_plan("--config=configs/maskgit_fashion_mnist.py:tiny",
                 "--mesh=data=2,fdsp=2")
  assert bad.returncode != 0 and "unknown axis 'fdsp'" in bad.stderr
