"""--mode=eval on a tokenizer workdir: how well the EMA tokenizer rebuilds.

Over the whole evaluation split (config.data: the model comes from the
workdir, the data from this run's config, so an imported official tokenizer
is evaluated on whatever data is given): reconstruction FID under the
configured feature network (against the real split's cached reference),
PSNR, LPIPS (over the first `eval.lpips_images` images: VGG16 dominates
the cost on a CPU), and the codebook usage and perplexity of the codes the split
is encoded to. Written to eval/<name>.json ("reconstruction" by default).
"""

import functools
import sys
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from maskgit_jax import files
from maskgit_jax import losses
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.evaluation import features as features_lib
from maskgit_jax.evaluation import frechet
from maskgit_jax.evaluation import statistics
from maskgit_jax.models import vqgan


def reconstruct_and_score(model, params, images):
  """(reconstructions in [0, 1], PSNR [B], code counts)."""
  recon, indices, _ = vqgan.apply_in_streams(model, params, images)
  recon = jnp.clip(recon, 0.0, 1.0)
  counts = jnp.bincount(indices.reshape(-1), length=model.codebook_size)
  return recon, losses.psnr(recon, images), counts


def lpips_distance(lpips_params, x, y):
  from maskgit_jax.models import perceptual
  return perceptual.LPIPS().apply({"params": lpips_params}, x, y)


def evaluate_tokenizer(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Runs the eval job; returns what it writes to eval/<name>.json."""
  from maskgit_jax.data import input_pipeline
  from maskgit_jax.models import perceptual
  start = time.time()
  run = workdir_lib.Workdir(workdir)
  net = features_lib.from_config(config.eval)  # weights checked first
  _, model, params = run.load_tokenizer()
  lpips_params = perceptual.load_lpips_params()
  score = jax.jit(functools.partial(reconstruct_and_score, model))
  lpips_fn = jax.jit(lpips_distance)
  lpips_limit = int(config.eval.lpips_images)
  reference = (features_lib.reference_stats(
      net, config.eval, config.data, batch_size=config.eval_batch_size,
      seed=config.seed) if net is not None else None)
  iterator = input_pipeline.eval_batches(
      config.data, split=config.data.eval_split,
      batch_size=int(config.eval_batch_size))
  stats = statistics.FeatureStats()
  psnr, lpips = [], []
  counts = np.zeros(model.codebook_size, np.int64)
  for batch in tqdm.tqdm(iterator, desc="eval", unit="batch"):
    recon, batch_psnr, batch_counts = score(params, batch["image"])
    psnr.append(np.asarray(batch_psnr))
    if sum(map(len, lpips)) < lpips_limit:  # VGG16 is the slow part on CPU
      lpips.append(np.asarray(lpips_fn(lpips_params, recon, batch["image"])))
    counts += np.asarray(batch_counts)
    if net is not None:
      stats.update(net.outputs(input_pipeline.to_uint8(np.asarray(recon)))[0])
  result = {
      "psnr": float(np.mean(np.concatenate(psnr))),
      "lpips": float(np.mean(np.concatenate(lpips))) if lpips else None,
      "lpips_images": int(sum(map(len, lpips))),
      "codebook_usage": float(losses.usage_from_counts(counts)),
      "codebook_perplexity": float(losses.perplexity_from_counts(counts)),
      "num_images": int(sum(map(len, psnr))),
      "step": run.latest_step(),
      "dataset": config.data.name, "split": config.data.eval_split}
  if net is not None:
    result["fid"] = frechet.frechet_distance(stats.mu, stats.sigma,
                                             reference.mu, reference.sigma)
    result["feature_network"] = net.name
  result["seconds"] = round(time.time() - start, 1)
  if jax.process_index() == 0:
    files.write_json(run.eval_result(config.eval.name or "reconstruction"),
                     result)
    print(f"Reconstruction PSNR {result['psnr']:.2f} dB, LPIPS "
          f"{result['lpips']}" + (f", rFID {result['fid']:.3f}"
                                      if "fid" in result else ""),
          file=sys.stderr, flush=True)
  return result
