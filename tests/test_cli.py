"""The entry point: each stage once end to end through `python -m
maskgit_jax.main` (the session's shared runs, see conftest.py), what `main`
prints for a full disk, and the errors a bad command or config gives before
anything is compiled.
"""

import errno
import os

import numpy as np
import pytest

from helpers import (REPO, TRANSFORMER_CONFIG, committed_steps, load_config,
                     main_exit, run_main, tokenizer_config, train_rows,
                     transformer_config)
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import jobs

# ------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tokenizer_trains_and_tokenizes_through_main(tokenizer_run):
  """`main` trains the tiny tokenizer (4 steps, checkpoints every 2) with
  every loss term logged and finite, writes reconstructions, TensorBoard
  events and the resolved config; `--mode=tokenize` writes the cache."""
  workdir = tokenizer_run.workdir
  assert committed_steps(workdir) == [2, 4]
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("reconstruction_loss", "perceptual_loss", "codebook_loss",
              "commitment_loss", "entropy_loss", "generator_adversarial_loss",
              "discriminator_loss", "r1_penalty", "psnr", "codebook_usage",
              "codebook_perplexity"):
    assert np.isfinite(rows[-1][key]), key
  # The tiny config really plays the GAN and LPIPS from step 2 on.
  assert rows[-1]["perceptual_loss"] > 0 and rows[-1]["r1_penalty"] > 0
  assert 0 < rows[-1]["codebook_usage"] <= 1
  images = os.listdir(os.path.join(workdir, "images"))
  assert "reconstructions_00000004.png" in images
  saved = workdir_lib.Workdir(workdir).load_config()
  assert saved.vqgan.codebook_size == 16 and saved.stage == "tokenizer"
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert "Resumed" not in tokenizer_run.train.stderr
  cache = os.fspath(workdir_lib.Workdir(workdir).token_cache)
  assert tokens_lib.is_token_dataset(cache)


@pytest.mark.slow
def test_transformer_trains_through_main(transformer_run):
  """`main` trains the tiny transformer on the tokenizer's cache: 4 logged
  steps, checkpoints 2 and 4, a sample grid at the last step."""
  workdir = transformer_run.workdir
  assert committed_steps(workdir) == [2, 4]
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert all(0 <= r["masked_accuracy"] <= 1 for r in rows)
  assert "samples_00000004.png" in os.listdir(os.path.join(workdir, "images"))
  saved = workdir_lib.Workdir(workdir).load_config()
  assert saved.stage == "transformer"


# ------------------------------------------------------- main's messages


def test_main_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
  """A DiskFullError from the job ends `main` with exit status 1 and one
  line `Error: No space left ...` (sys.exit with the message), no trace.
  What the message says is the loop's (tests/test_loop.py)."""
  from maskgit_jax import checkpoints
  workdir = tmp_path / "run"
  directory = workdir / "checkpoints"
  (directory / "2").mkdir(parents=True)
  cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                  str(directory / "4"))
  calls = []

  def full_disk(mode, config, path):
    calls.append((mode, config.stage, path))
    try:
      raise cause
    except OSError as error:
      raise checkpoints.disk_full_error(str(directory), error, []) from error

  monkeypatch.setattr(jobs, "run", full_disk)
  message = main_exit(f"--config={REPO}/{TRANSFORMER_CONFIG}",
                      f"--workdir={workdir}")
  assert calls == [("train", "transformer", str(workdir))]
  # A str exit code: Python prints it to stderr once and exits with 1.
  assert isinstance(message, str), message
  assert "\n" not in message
  assert message.startswith("Error: No space left on the device")
  assert f"step 2 in {directory}, is intact" in message
  assert "re-run the same command" in message


def test_cli_missing_token_cache_names_the_command(tmp_path):
  result = run_main(f"--config={TRANSFORMER_CONFIG}",
                    f"--workdir={tmp_path / 'run'}",
                    f"--config.tokenizer_workdir={tmp_path / 'nothing'}")
  assert result.returncode != 0
  assert "--mode=tokenize" in result.stderr
  assert str(tmp_path / "nothing") in result.stderr


def test_cli_rejects_unknown_override(tmp_path):
  result = run_main(f"--config={TRANSFORMER_CONFIG}",
                    f"--workdir={tmp_path / 'run'}", "--config.bach_size=3")
  assert result.returncode != 0 and "bach_size" in result.stderr


# ---------------------------------------------- bad configs, before compiling


def test_bad_configs_fail_before_compiling(data_dirs, tmp_path):
  config = tokenizer_config(data_dirs)
  config.data.image_size = 30
  with pytest.raises(ValueError, match="image_size=30"):
    jobs.run("train", config, str(tmp_path / "a"))
  config = load_config("maskgit_fashion_mnist")
  config.mask_schedule = "cosinus"
  with pytest.raises(ValueError, match="cosinus"):
    jobs.run("train", config, str(tmp_path / "b"))


@pytest.mark.slow  # needs the trained tokenizer's token cache
def test_more_bad_configs_fail_before_compiling(data_dirs, tokenizer_workdir,
                                                tmp_path):
  config = transformer_config(tokenizer_workdir)
  config.batch_size = 12   # 8 fake devices
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8"):
    jobs.run("train", config, str(tmp_path / "a"))
  config = transformer_config(tokenizer_workdir)
  config.num_classes = 5
  with pytest.raises(ValueError, match="10 classes but config.num_classes=5"):
    jobs.run("train", config, str(tmp_path / "b"))
  config = transformer_config(tokenizer_workdir)
  config.optimizer.name = "sgdx"
  with pytest.raises(ValueError, match="'sgdx'.*adamw"):
    jobs.run("train", config, str(tmp_path / "c"))
  config = tokenizer_config(data_dirs)
  config.data.name = "no_such_dataset"
  with pytest.raises(ValueError, match="no_such_dataset"):
    jobs.run("train", config, str(tmp_path / "d"))
  config = load_config("maskgit_fashion_mnist")
  config.tokenizer_workdir = str(tmp_path / "empty")
  os.makedirs(config.tokenizer_workdir)
  with pytest.raises(FileNotFoundError, match="--mode=tokenize"):
    jobs.run("train", config, str(tmp_path / "e"))


# --------------------------------------------------------- corrupt images


def image_folder_config(root, data_dir, skip):
  config = load_config("vqgan_fashion_mnist")
  config.data.update(name="image_folder", source_dir=str(root),
                     data_dir=str(data_dir), eval_split="train",
                     skip_corrupt_images=skip)
  config.losses.perceptual_weight = 0.0
  return config


def test_training_skips_or_fails_on_corrupt_images(tmp_path, caplog):
  """A training run on an image folder with one unreadable file: strict, it
  stops naming the file before any step; with data.skip_corrupt_images it
  logs the file and the count and trains on the readable 12.

  The stage is built as `--mode=train` builds it (config check, then the
  dataset is prepared and the evaluation batch read) and its training
  iterator run past an epoch; the data layer's own tests are in
  test_data.py, and compiling the model would add nothing about the files.
  """
  import PIL.Image
  from maskgit_jax.train import tokenizer_stage
  root = tmp_path / "shapes"
  rng = np.random.default_rng(0)
  for label in ("circles", "squares"):
    (root / label).mkdir(parents=True)
    for i in range(6):
      PIL.Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                          ).save(root / label / f"{i}.png")
  broken = root / "squares" / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not a jpeg")

  strict = image_folder_config(root, tmp_path / "tfds_strict", skip=False)
  with pytest.raises(ValueError, match="broken.jpg"):
    jobs.run("train", strict, str(tmp_path / "strict"))
  assert not os.path.exists(tmp_path / "strict" / "checkpoints")

  skipping = image_folder_config(root, tmp_path / "tfds_skipping", skip=True)
  with caplog.at_level("WARNING"):
    jobs.validate(skipping)
    stage = tokenizer_stage.make_stage(skipping, str(tmp_path / "skipping"))
  assert "Skipping unreadable image" in caplog.text
  assert str(broken) in caplog.text
  assert "Skipped 1 unreadable image(s) of 13" in caplog.text
  iterator = stage.make_iterator()
  for _ in range(3):  # 24 images: past the end of the 12 readable ones
    images = next(iterator)["image"]
    assert images.shape == (skipping.batch_size, 32, 32, 3)
    assert np.isfinite(images).all()
