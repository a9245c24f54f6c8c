r"""The embedded demo: both stages on Fashion-MNIST, on a CPU, in minutes.

  python -m maskgit_jax.demo --out demo_output     (what `make demo` runs)

Trains the tokenizer (configs/vqgan_fashion_mnist.py), writes its token
cache, trains the transformer (configs/maskgit_fashion_mnist.py), then
writes into --out:

  samples.png          one row per class, class-conditional samples
  reconstructions.png  test images (top) and their reconstructions (below)
  metrics.json         reconstruction PSNR, codebook usage, final losses

Workdirs live under --out/workdirs, so re-running resumes (or, when done,
only redraws the pictures).
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging

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


def main(argv):
  del argv
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
  psnr = jobs.run("eval", tokenizer, vqgan_dir)["psnr"]

  k_metrics, t_metrics = last_metrics(vqgan_dir), last_metrics(maskgit_dir)
  summary = {
      "reconstruction_psnr_db": psnr,
      "codebook_usage": k_metrics["codebook_usage"],
      "codebook_perplexity": k_metrics["codebook_perplexity"],
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
