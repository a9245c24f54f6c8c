r"""The embedded demo: both stages on Fashion-MNIST, on a CPU, in minutes.

  python -m maskgit_jax.demo --out demo_output     (what `make demo` runs)

Trains the tokenizer (configs/vqgan_fashion_mnist.py), writes its token
cache, trains the transformer (configs/maskgit_fashion_mnist.py), then
writes into --out:

  samples.png          one row per class, class-conditional samples
  reconstructions.png  test images (top) and their reconstructions (below)
  metrics.json         sample quality (FID, precision/recall, the real-data
                       classifier's accuracy on samples and CAS, each next
                       to the real-data ceiling), reconstruction PSNR,
                       LPIPS and rFID, codebook usage, final losses

Workdirs live under --out/workdirs, so re-running resumes (or, when done,
only redraws the pictures).
"""

import json
import os
import time

import numpy as np

from absl import app
from absl import flags
from absl import logging

from maskgit_jax import host_memory

_OUT = flags.DEFINE_string("out", "demo_output", "Output folder.")
_SOURCE_DIR = flags.DEFINE_string(
    "fashion_mnist_dir", None, "Folder of the Fashion-MNIST idx files "
    "(default: /usr/share/datasets/fashion-mnist).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load_config(name: str):
  from maskgit_jax import config_base
  return config_base.from_file(os.path.join(REPO, "configs", f"{name}.py"))


def last_metrics(workdir: str) -> dict:
  """The newest value of every metric in a run's metrics.jsonl."""
  merged = {}
  from maskgit_jax import workdir as workdir_lib
  text = workdir_lib.Workdir(workdir).metrics_file.read_text()
  for line in text.splitlines():
    merged.update(json.loads(line))
  return merged


def train_feature_classifier(data, path: str) -> float:
  """Trains the evaluation classifier on the real training set once (kept
  at `path`); returns its accuracy on the real test set."""
  from maskgit_jax.evaluation import classifier
  from maskgit_jax.evaluation import features
  load = lambda split: [np.concatenate(part) for part in zip(
      *features.real_batches(data, split=split, batch_size=1000,
                             limit=10**9))]
  test_images, test_labels = load(data.eval_split)
  if os.path.exists(path):
    params, _ = classifier.load_classifier(path)
  else:
    print("[demo]     training the feature classifier on the real "
          "training set", flush=True)
    images, labels = load(data.train_split)
    # 800 steps (about 40 s here) of the default 1500: within the demo's
    # 20 minutes, about a point of test accuracy less.
    params = classifier.train_classifier(images, labels, num_classes=10,
                                         num_steps=800)
    classifier.save_classifier(path, params, {"dataset": data.name})
  return classifier.accuracy(params, test_images, test_labels)


def measure_ceiling(tokenizer, transformer) -> dict:
  """The same metrics for real training images instead of samples."""
  from maskgit_jax.evaluation import features
  from maskgit_jax.evaluation import transformer_eval
  data, e = tokenizer.data, transformer.eval
  net = features.from_config(e)
  # The eval job's reference (its seed), read back from the cache.
  reference = features.reference_stats(net, e, data, batch_size=500,
                                       seed=transformer.seed)
  take = lambda split, n: [np.concatenate(part) for part in zip(
      *features.real_batches(data, split=split, batch_size=1000,
                             limit=n))]
  return transformer_eval.real_ceiling(
      net, reference, take(data.train_split, int(e.num_samples)),
      take(data.eval_split, int(e.num_reference)), num_classes=10,
      cas_train_steps=int(e.cas_train_steps),
      precision_recall_samples=int(e.precision_recall_samples))


def print_quality(quality: dict) -> None:
  print("[demo] sample quality (feature classifier's space), samples vs "
        "real training images (the ceiling):", flush=True)
  for key, pair in quality.items():
    print(f"[demo]   {key:20s} {pair['samples']:8.4f}   "
          f"(real data {pair['real_data']:.4f})", flush=True)


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # Before XLA starts its threads.
  from maskgit_jax import Pipeline
  from maskgit_jax.data import input_pipeline
  from maskgit_jax.train import images as images_lib
  from maskgit_jax.train import jobs

  start = time.time()
  out = os.path.abspath(_OUT.value)
  vqgan_dir = os.path.join(out, "workdirs", "vqgan_fashion_mnist")
  maskgit_dir = os.path.join(out, "workdirs", "maskgit_fashion_mnist")

  tokenizer = load_config("vqgan_fashion_mnist")
  if _SOURCE_DIR.value:
    tokenizer.data.source_dir = _SOURCE_DIR.value
  print(f"[demo] 1/4 training the tokenizer in {vqgan_dir}", flush=True)
  jobs.run("train", tokenizer, vqgan_dir)
  print("[demo] 2/4 tokenizing the training set", flush=True)
  jobs.run("tokenize", tokenizer, vqgan_dir)
  transformer = load_config("maskgit_fashion_mnist")
  transformer.tokenizer_workdir = vqgan_dir
  print(f"[demo] 3/4 training the transformer in {maskgit_dir}", flush=True)
  jobs.run("train", transformer, maskgit_dir)

  print("[demo] 4/4 sampling and evaluating", flush=True)
  pipe = Pipeline.from_workdirs(vqgan_dir, maskgit_dir)
  images_lib.sample_grid(pipe, transformer, os.path.join(out, "samples.png"))
  test = next(input_pipeline.make_image_iterator(
      tokenizer.data, split=tokenizer.data.eval_split, global_batch_size=16,
      seed=0, train=False, process_index=0, process_count=1))["image"]
  recon = pipe.detokenize(pipe.tokenize(test))
  images_lib.save_pairs(test, recon, os.path.join(out, "reconstructions.png"))

  classifier_path = os.path.join(out, "workdirs", "classifier.npz")
  real_accuracy = train_feature_classifier(tokenizer.data, classifier_path)
  for config in (tokenizer, transformer):
    config.eval.classifier = classifier_path
    config.eval.reference_cache_dir = os.path.join(out, "workdirs",
                                                   "reference")
  tokenizer.eval.name = "demo"
  k_eval = jobs.run("eval", tokenizer, vqgan_dir)
  transformer.eval.name = "demo"
  t_eval = jobs.run("eval", transformer, maskgit_dir)
  ceiling = measure_ceiling(tokenizer, transformer)
  quality = {key: {"samples": t_eval[key], "real_data": ceiling[key]}
             for key in ("fid", "precision", "recall", "classifier_accuracy",
                         "cas") if key in ceiling}
  print_quality(quality)

  k_metrics, t_metrics = last_metrics(vqgan_dir), last_metrics(maskgit_dir)
  summary = {
      "sample_quality": quality,
      "sample_settings": t_eval["settings"],
      "num_samples": t_eval["num_samples"],
      "feature_classifier_test_accuracy": real_accuracy,
      "reconstruction_psnr_db": k_eval["psnr"],
      "reconstruction_lpips": k_eval["lpips"],
      "reconstruction_fid": k_eval["fid"],
      # Of the EMA tokenizer on the test set (not the last training window).
      "codebook_usage": k_eval["codebook_usage"],
      "codebook_perplexity": k_eval["codebook_perplexity"],
      "tokenizer_final_losses": {k: v for k, v in k_metrics.items()
                                 if k.endswith("loss")},
      "transformer_final_loss": t_metrics["loss"],
      "transformer_masked_accuracy": t_metrics["masked_accuracy"],
      "sample_rows": list(CLASS_NAMES),
      "seconds": round(time.time() - start, 1),
  }
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=2))
  print(f"[demo] done in {summary['seconds']:.0f} s; results in {out}:\n"
        f"  {out}/samples.png\n  {out}/reconstructions.png\n"
        f"  {out}/metrics.json", flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
