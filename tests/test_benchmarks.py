"""The throughput benchmarks run end to end on tiny configs and write JSON.

Only the record is checked (keys present, numbers finite and positive,
utilisation plausible), never a speed: speed targets live in benchmarks/.
Each script runs as a subprocess on one CPU device, with one round and
tiny matmuls for the peak, as a user would launch it.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

import helpers

REPO = helpers.REPO
COMMON = ["--rounds=1", "--repeats=1", "--peak_sizes=256,512",
          "--peak_repeats=1"]
TRAIN_KEYS = ("batch_size", "steps_per_s", "examples_per_s", "tokens_per_s",
              "model_flops_per_step", "xla_flops_per_step",
              "achieved_flops_per_s", "peak_matmul_flops_per_s",
              "flop_utilization")
SAMPLE_KEYS = ("batch_size", "images_per_s", "tokens_per_s",
               "transformer_flops_per_call", "decoder_flops_per_call",
               "model_flops_per_call", "achieved_flops_per_s",
               "peak_matmul_flops_per_s", "flop_utilization")
MACHINE_KEYS = ("cpu", "processor", "uname", "cpu_count", "jax_version",
                "backend")

# A stand-in for the PyTorch peer's MaskTransformer with its constructor and
# call signature, used when no checkout is given (MASKGIT_PYTORCH_DIR).
STAND_IN_PEER = '''
import torch
from torch import nn


class MaskTransformer(nn.Module):

  def __init__(self, img_size=256, hidden_dim=768, codebook_size=1024,
               depth=24, heads=8, mlp_dim=3072, dropout=0.1, nclass=1000):
    super().__init__()
    self.codebook_size, self.nclass = codebook_size, nclass
    self.tok_emb = nn.Embedding(codebook_size + nclass + 2, hidden_dim)
    self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(),
                             nn.Dropout(dropout),
                             nn.Linear(mlp_dim, codebook_size + 1))

  def forward(self, img_token, y=None, drop_label=None):
    cls = y.view(-1, 1) + self.codebook_size + 1
    cls[drop_label] = self.codebook_size + 1 + self.nclass
    tokens = torch.cat([img_token.flatten(1), cls], -1)
    return self.mlp(self.tok_emb(tokens))[:, :-1]
'''


def run_benchmark(script, *args, tmp_path):
  """Runs benchmarks/<script> ARGS --out=...; returns its JSON record."""
  out = tmp_path / f"{script}.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", script), *args,
       *COMMON, f"--out={out}"],
      capture_output=True, text=True, cwd=REPO, env=helpers.one_device_env())
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


def assert_record(record, keys):
  for key in keys:
    value = record[key]
    assert isinstance(value, (int, float)) and math.isfinite(value), key
    assert value > 0, (key, value)
  assert 0 < record["flop_utilization"] < 1.5
  for key in MACHINE_KEYS:
    assert key in record["machine"], key
  assert record["machine"]["cpu_count"] >= 1
  assert "date" in record and "git_commit" in record


def test_train_throughput_transformer(tmp_path):
  record = run_benchmark(
      "train_throughput.py", "--config=configs/maskgit_fashion_mnist.py:tiny",
      "--set", "transformer.hidden_size=32", "--set=batch_size=4",
      "--codebook_size=16", "--num_tokens=16", "--steps=2", tmp_path=tmp_path)
  assert_record(record, TRAIN_KEYS)
  assert record["overrides"] == ["transformer.hidden_size=32", "batch_size=4"]
  assert record["model"]["hidden_size"] == 32 and record["batch_size"] == 4
  assert record["tokens_per_s"] == pytest.approx(
      record["examples_per_s"] * 17)
  assert record["flops_source"].startswith("analytic")
  assert record["non_embedding_params"] > 0
  # A float32 step is judged against float32 matmuls; a CPU has no
  # datasheet peak, so no MFU unless --nominal_peak gives one.
  assert record["peak_matmul_dtype"] == "float32"
  assert record["mfu"] is None and record["nominal_peak_flops_per_s"] is None
  assert "--nominal_peak" in record["nominal_peak_source"]
  floor = record["matmul_floor"]
  assert floor["seconds_per_step"] > 0 and floor["streams"] == 2
  assert floor["examples_per_s"] == pytest.approx(
      4 / floor["seconds_per_step"])
  assert floor["step_over_floor"] == pytest.approx(
      record["seconds_per_step"] / floor["seconds_per_step"])
  # The tiny config: 1 layer, MLP 32, 2 heads; 16 + 1 tokens, 16 codes.
  assert floor["flops_per_step"] == step_matmul_flops(
      batch=4, seq=17, hidden=32, mlp=32, layers=1, codes=16)


def test_train_throughput_in_bfloat16_against_bfloat16_matmuls(tmp_path):
  record = run_benchmark(
      "train_throughput.py", "--config=configs/maskgit_fashion_mnist.py:tiny",
      "--set=dtype=bfloat16", "--set=batch_size=2", "--codebook_size=16",
      "--num_tokens=4", "--steps=1", "--nominal_peak=2e12",
      tmp_path=tmp_path)
  assert record["dtype"] == "bfloat16"
  assert record["peak_matmul_dtype"] == "bfloat16"
  assert "matmul_floor" not in record  # float32 products only
  assert record["nominal_peak_source"] == "--nominal_peak"
  assert record["mfu"] == pytest.approx(record["achieved_flops_per_s"] / 2e12)


def test_sample_throughput(tmp_path):
  record = run_benchmark(
      "sample_throughput.py", "--config=configs/maskgit_fashion_mnist.py:tiny",
      "--batch_size=2", "--nominal_peak=1e12", tmp_path=tmp_path)
  assert_record(record, SAMPLE_KEYS)
  assert record["peak_matmul_dtype"] == "float32"
  assert record["mfu"] == pytest.approx(record["achieved_flops_per_s"] / 1e12)
  assert record["tokenizer_config"] == "configs/vqgan_fashion_mnist.py:tiny"
  assert record["sampling"]["guidance_scale"] > 0  # the config's setting
  assert record["transformer_rows_per_forward"] == 4  # guided: 2 x batch
  assert record["images_per_s"] * record["num_tokens"] == pytest.approx(
      record["tokens_per_s"])


@pytest.mark.slow
def test_train_throughput_tokenizer_with_lpips(tmp_path):
  # LPIPS stays on (its weights are the step's constants); the GAN is off,
  # which halves the compile time (its R1 penalty is a second derivative).
  record = run_benchmark(
      "train_throughput.py", "--config=configs/vqgan_fashion_mnist.py:tiny",
      "--set=batch_size=2", "--set=losses.generator_adversarial_weight=0.0",
      "--steps=1", tmp_path=tmp_path)
  assert_record(record, TRAIN_KEYS)
  assert record["stage"] == "tokenizer"
  assert record["model"]["losses"]["perceptual_weight"] > 0
  assert record["flops_source"] == "xla_cost_analysis"
  assert record["model_flops_per_step"] == record["xla_flops_per_step"]
  assert "timed_from_step" not in record  # no discriminator to wait for


@pytest.fixture
def peer_dir(tmp_path):
  """A checkout of the PyTorch peer, else a stand-in with its interface."""
  given = os.environ.get("MASKGIT_PYTORCH_DIR")
  if given:
    return given
  root = tmp_path / "peer"
  for part in ("Network", "Trainer"):
    (root / part).mkdir(parents=True)
  (root / "Network" / "transformer.py").write_text(STAND_IN_PEER)
  (root / "Trainer" / "vit.py").write_text("# the training loop\n")
  return str(root)


@pytest.mark.slow
def test_train_throughput_against_peer(tmp_path, peer_dir):
  pytest.importorskip("torch")
  record = run_benchmark(
      "train_throughput.py", "--config=configs/maskgit_fashion_mnist.py:tiny",
      "--codebook_size=16", "--num_tokens=16", "--steps=1",
      f"--peer_dir={peer_dir}", "--peer_threads=1", tmp_path=tmp_path)
  assert_record(record, TRAIN_KEYS)
  ratio = record["examples_per_s_ours_over_peer"]
  assert math.isfinite(ratio) and ratio > 0
  assert ratio == pytest.approx(record["examples_per_s"] /
                                record["peer"]["examples_per_s"])
  assert record["peer"]["sizes"]["side"] == 4
  assert record["peer"]["threads"] == 1
  assert record["peer_notes"]
  assert record["matmul_floor"]["examples_per_s_over_peer"] == pytest.approx(
      record["matmul_floor"]["examples_per_s"] /
      record["peer"]["examples_per_s"])


def step_matmul_flops(batch, seq, hidden, mlp, layers, codes):
  """Matmul FLOPs of a train step in closed form: 6 x weights x rows for
  the dense layers (QKV, output, MLP; the head's dense and its tied
  logits), 12 L S^2 D B for attention."""
  weights = layers * (4 * hidden**2 + 2 * hidden * mlp) + hidden**2
  return (6 * (weights + hidden * codes) * batch * seq +
          12 * layers * seq**2 * hidden * batch)


def benchmark_module(name: str):
  """A module of benchmarks/ (scripts there import each other by name)."""
  folder = os.path.join(REPO, "benchmarks")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(name)


@pytest.mark.parametrize("sizes", [
    dict(batch=32, seq=65, hidden=256, mlp=1024, layers=4, heads=8,
         codes=512),
    dict(batch=3, seq=5, hidden=12, mlp=20, layers=2, heads=3, codes=7)])
def test_matmul_floor_counts_the_steps_matmuls(sizes):
  matmul_floor = benchmark_module("matmul_floor")
  matmuls = matmul_floor.step_matmuls(
      sizes["batch"], seq_len=sizes["seq"], hidden=sizes["hidden"],
      mlp_dim=sizes["mlp"], num_layers=sizes["layers"],
      num_heads=sizes["heads"], codebook_size=sizes["codes"])
  expected = step_matmul_flops(**{k: v for k, v in sizes.items()
                                  if k != "heads"})
  assert matmul_floor.flops(matmuls) == expected
  # Each layer: three products per dense layer (4 of them), six for
  # attention; the head: two dense layers.
  assert len(matmuls) == sizes["layers"] * 18 + 6


@pytest.mark.parametrize("kind, dtype, want", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989.4e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v4", "bfloat16", 275e12),
    ("NVIDIA H100 80GB HBM3", "float32", None),
    ("cpu", "bfloat16", None)])
def test_nominal_peak_of_known_chips(kind, dtype, want):
  assert benchmark_module("harness").nominal_peak(kind, dtype) == want


def test_utilization_against_measured_and_datasheet_peaks():
  harness = benchmark_module("harness")
  peak = {"flops_per_s": 500e12, "by_size": {"4096": 500e12},
          "dtype": "bfloat16"}
  fields = harness.utilization(400e12, peak, "NVIDIA H100 80GB HBM3")
  assert fields["flop_utilization"] == pytest.approx(0.8)
  assert fields["mfu"] == pytest.approx(400 / 989.4)
  assert "H100" in fields["nominal_peak_source"]
  override = harness.utilization(400e12, peak, "NVIDIA H100 80GB HBM3",
                                 nominal_override=800e12)
  assert override["mfu"] == pytest.approx(0.5)
  assert override["nominal_peak_source"] == "--nominal_peak"
  unknown = harness.utilization(1e9, dict(peak, dtype="float32"), "cpu")
  assert unknown["mfu"] is None


def test_nominal_peak_flag_must_be_positive():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"),
       "--config=configs/maskgit_fashion_mnist.py:tiny", "--nominal_peak=0"],
      capture_output=True, text=True, cwd=REPO, env=helpers.one_device_env())
  assert result.returncode != 0
  assert "--nominal_peak=0.0: must be > 0" in result.stderr


def test_matmul_floor_rejects_a_batch_it_cannot_slice():
  matmul_floor = benchmark_module("matmul_floor")
  with pytest.raises(ValueError, match="batch 5 .* 2 streams"):
    matmul_floor.build(5, 2, seq_len=3, hidden=4, mlp_dim=4, num_layers=1,
                       num_heads=2, codebook_size=3)


def test_config_overrides_keep_types_and_name_bad_keys():
  harness = benchmark_module("harness")
  spec = os.path.join(REPO, "configs", "maskgit_fashion_mnist.py:tiny")
  config = harness.load_config(spec, [
      "batch_size=32", "transformer.hidden_size=256", "mask_schedule=linear",
      "optimizer.learning_rate=1"])
  assert config.batch_size == 32 and config.transformer.hidden_size == 256
  assert config.mask_schedule == "linear"
  assert isinstance(config.optimizer.learning_rate, float)
  with pytest.raises(ValueError, match="has no key 'hiden_size'.*mlp_dim"):
    harness.load_config(spec, ["transformer.hiden_size=256"])
  with pytest.raises(ValueError, match="transformer.hidden_size=2.5"):
    harness.load_config(spec, ["transformer.hidden_size=2.5"])
  with pytest.raises(ValueError, match="not key.path=value"):
    harness.load_config(spec, ["batch_size"])
