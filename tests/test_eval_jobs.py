"""--mode=eval end to end on the session's tiny trained runs: the keys the
results hold, sweeps, and the errors that come before any sampling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (REPO, TOKENIZER_CONFIG, TRANSFORMER_CONFIG, free_port,
                     garment_batch, load_config, one_device_env, run_main)
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.train import jobs

pytestmark = pytest.mark.slow  # reads the session's trained workdirs


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
  """A (barely) trained classifier on the tiny garments, as the feature
  network Fashion-MNIST evaluations use."""
  from maskgit_jax.evaluation import classifier
  from helpers import garments
  images, labels = garments(48, 0)
  batch = garment_batch(48, 0)["image"]
  params = classifier.train_classifier(
      np.round(batch * 255).astype(np.uint8), labels.astype(np.int32),
      num_classes=10, num_steps=10, batch_size=16, progress=False)
  path = str(tmp_path_factory.mktemp("classifier") / "classifier.npz")
  classifier.save_classifier(path, params, {"num_classes": 10})
  return path


def eval_flags(classifier_file, cache_dir):
  return ["--mode=eval", "--config.eval.feature_network=classifier",
          f"--config.eval.classifier={classifier_file}",
          f"--config.eval.reference_cache_dir={cache_dir}",
          "--config.eval.num_reference=16",
          "--config.eval.precision_recall_samples=64"]


def test_transformer_eval_through_main(transformer_run, tokenizer_workdir,
                                       classifier_file, tmp_path):
  result = run_main(
      f"--config={TRANSFORMER_CONFIG}", f"--workdir={transformer_run.workdir}",
      f"--config.tokenizer_workdir={tokenizer_workdir}",
      *eval_flags(classifier_file, tmp_path), "--config.eval.num_samples=200",
      "--config.eval.seeds=2", "--config.eval_batch_size=40",
      "--config.eval.cas=True", "--config.eval.cas_train_steps=5",
      "--config.eval.name=tiny")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(workdir_lib.Workdir(transformer_run.workdir)
                      .eval_result("tiny").read_text())
  for key in ("fid", "inception_score", "precision", "recall", "cas",
              "classifier_accuracy"):
    assert np.isfinite(report[key]), key
    assert np.isfinite(report[f"{key}_std"]), key
  assert len(report["results"][0]["per_seed"]) == 2
  assert report["fid"] >= 0 and 1 <= report["inception_score"] <= 10
  assert 0 <= report["precision"] <= 1 and 0 <= report["cas"] <= 1
  assert report["step"] == 4 and report["num_samples"] == 200
  assert report["settings"]["num_iter"] == 4  # the tiny config's sampling
  assert report["seconds"] > 0
  assert os.listdir(tmp_path)  # the reference was cached


def test_sweep_writes_one_result_per_value_and_a_plot(
    transformer_run, tokenizer_workdir, classifier_file, tmp_path):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.eval_batch_size = 20
  config.eval.update(feature_network="classifier", classifier=classifier_file,
                     reference_cache_dir=str(tmp_path), num_reference=16,
                     precision_recall_samples=32, num_samples=40, seeds=1,
                     cas=False)  # CAS trains a classifier: the main test has it
  config.eval.sweep.num_iter = (2, 4)
  config.eval.step = 3  # the tiny run keeps steps 2 and 4
  with pytest.raises(ValueError, match=r"config.eval.step=3.*\[2, 4\]"):
    jobs.run("eval", config, transformer_run.workdir)
  config.eval.step = 2  # an older checkpoint than the newest
  report = jobs.run("eval", config, transformer_run.workdir)
  assert report["swept"] == "num_iter" and report["step"] == 2
  assert [r["settings"]["num_iter"] for r in report["results"]] == [2, 4]
  run = workdir_lib.Workdir(transformer_run.workdir)
  assert run.eval_result("sweep_num_iter", ".png").exists()
  config.eval.sweep.guidance_scale = (0.0, 1.0)
  with pytest.raises(ValueError, match="one of"):
    jobs.run("eval", config, transformer_run.workdir)
  config.eval.sweep.update(num_iter=(), guidance_scale=(),
                           temperature=(1.0, 0.0))
  with pytest.raises(ValueError, match=r"temperature=0\.0.*> 0"):
    jobs.run("eval", config, transformer_run.workdir)
  # The token temperature is a traced knob: a sweep reuses one program, and
  # a near-zero temperature (argmax draws) gives other samples than 1.
  config.eval.sweep.temperature = (1.0, 0.01)
  report = jobs.run("eval", config, transformer_run.workdir)
  assert [r["settings"]["temperature"] for r in report["results"]] == [
      1.0, 0.01]
  assert report["results"][0]["fid"] != report["results"][1]["fid"]


def test_tokenizer_eval_through_main(tokenizer_run, classifier_file,
                                     data_dirs, tmp_path):
  result = run_main(
      f"--config={TOKENIZER_CONFIG}", f"--workdir={tokenizer_run.workdir}",
      f"--config.data.source_dir={data_dirs[0]}",
      f"--config.data.data_dir={data_dirs[1]}",
      *eval_flags(classifier_file, tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(workdir_lib.Workdir(tokenizer_run.workdir)
                      .eval_result("reconstruction").read_text())
  for key in ("fid", "psnr", "lpips", "codebook_usage",
              "codebook_perplexity"):
    assert np.isfinite(report[key]), key
  assert report["num_images"] == 16 and report["step"] == 4


def test_missing_inception_weights_fail_before_sampling(
    transformer_run, tokenizer_workdir, tmp_path):
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = tokenizer_workdir
  config.eval.update(feature_network="inception",
                     inception_weights=str(tmp_path / "absent.npz"))
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    jobs.run("eval", config, transformer_run.workdir)
  config.eval.feature_network = "classifier"
  with pytest.raises(ValueError, match="config.eval.classifier"):
    jobs.run("eval", config, transformer_run.workdir)


def test_schedule_experiment_writes_points_table_and_plots(
    transformer_run, tokenizer_workdir, classifier_file, tmp_path):
  out, table = tmp_path / "experiment.json", tmp_path / "table.md"
  command = [
      sys.executable, os.path.join(REPO, "benchmarks",
                                   "schedule_experiment.py"),
      f"--workdir={transformer_run.workdir}",
      f"--tokenizer_workdir={tokenizer_workdir}",
      f"--classifier={classifier_file}", "--schedules=cosine,sqrt",
      "--iterations=2,3", "--num_samples=20", "--seeds=2",
      "--cas_train_steps=0", "--eval_batch_size=20", "--num_reference=16",
      f"--out={out}", f"--table={table}", f"--plot_dir={tmp_path}"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(out.read_text())
  assert {(p["schedule"], p["num_iter"]) for p in summary["points"]} == {
      ("cosine", 2), ("cosine", 3), ("sqrt", 2), ("sqrt", 3)}
  for point in summary["points"]:
    assert np.isfinite(point["fid"]) and point["fid_std"] >= 0
  findings = summary["findings"]
  assert set(findings["mean_fid_by_shape"]) == {"concave", "convex"}
  assert findings["best_num_iter"]["cosine"]["num_iter"] in (2, 3)
  assert "| cosine (concave) |" in table.read_text()
  assert (tmp_path / "schedule_experiment_fid.png").exists()
  # A second run reuses the results the first left in the workdir.
  again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("reusing") == 2
  assert json.loads(out.read_text())["points"] == summary["points"]


def test_two_processes_evaluate_like_one(transformer_run, tokenizer_workdir,
                                         classifier_file, tmp_path):
  """2 processes x 1 device share the batches (3 batches: 2 + 1) and reach
  the numbers of one process; only process 0 reports progress."""
  common = [
      sys.executable, "-m", "maskgit_jax.main",
      f"--config={TRANSFORMER_CONFIG}",
      f"--workdir={transformer_run.workdir}",
      f"--config.tokenizer_workdir={tokenizer_workdir}",
      *eval_flags(classifier_file, tmp_path), "--config.eval.num_samples=60",
      "--config.eval.seeds=1", "--config.eval_batch_size=20",
      "--config.eval.cas=True", "--config.eval.cas_train_steps=5"]
  env = one_device_env()
  single = subprocess.run([*common, "--config.eval.name=one_process"],
                          capture_output=True, text=True, cwd=REPO, env=env)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  processes = [subprocess.Popen(
      [*common, "--config.eval.name=two_processes"], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  run = workdir_lib.Workdir(transformer_run.workdir)
  one = json.loads(run.eval_result("one_process").read_text())
  two = json.loads(run.eval_result("two_processes").read_text())
  np.testing.assert_allclose(two["fid"], one["fid"], rtol=1e-6)
  np.testing.assert_allclose(two["inception_score"], one["inception_score"],
                             rtol=1e-6)
  for key in ("precision", "recall", "classifier_accuracy", "cas"):
    assert two[key] == one[key], key
  assert two["num_samples"] == 60
  # Process 0 shows the progress bars (of generation and of CAS's training).
  for bar in ("eval seed 0", "CAS classifier"):
    assert bar in outputs[0][1], bar
    assert bar not in outputs[1][1], bar
