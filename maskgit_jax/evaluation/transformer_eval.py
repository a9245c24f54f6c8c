"""--mode=eval on a transformer workdir: FID, IS, precision/recall, CAS.

For each sampling setting (config.sampling, or each value of the one
non-empty list in config.eval.sweep) and each of config.eval.seeds seeds,
config.eval.num_samples class-balanced samples are generated in batches of
eval_batch_size over all devices (each process takes its share of the
batches), their features stream into float64 running sums, and only the
feature subset precision/recall needs is kept: the images themselves are
never all held (except the samples CAS trains on, when asked). Results, with
mean and spread over seeds, the settings, the checkpoint step and the time,
go to eval/<name>.json in the workdir; a sweep also plots FID against the
swept value (eval/<name>.png).
"""

import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
import tqdm

from maskgit_jax import evaluation
from maskgit_jax import files
from maskgit_jax import workdir as workdir_lib
from maskgit_jax.evaluation import cas as cas_lib
from maskgit_jax.evaluation import distributed
from maskgit_jax.evaluation import features as features_lib
from maskgit_jax.evaluation import frechet
from maskgit_jax.evaluation import generation
from maskgit_jax.evaluation import plot
from maskgit_jax.evaluation import statistics

SWEEPABLE = ("num_iter", "mask_schedule", "choice_temperature",
             "guidance_scale", "temperature")
METRICS = ("fid", "inception_score", "precision", "recall",
           "classifier_accuracy", "cas")


def sampling_settings(config: ml_collections.ConfigDict
                      ) -> Tuple[Optional[str], List[Dict[str, Any]]]:
  """(swept key or None, the list of settings to evaluate)."""
  base = {"num_iter": int(config.sampling.num_iter),
          "mask_schedule": config.mask_schedule,
          "choice_temperature": float(config.sampling.choice_temperature),
          "guidance_scale": float(config.sampling.guidance_scale),
          "temperature": float(config.sampling.temperature)}
  swept = [k for k in SWEEPABLE if tuple(config.eval.sweep.get(k, ()))]
  if len(swept) > 1:
    raise ValueError(f"config.eval.sweep sweeps {swept}; sweep one of "
                     f"{SWEEPABLE} at a time.")
  if not swept:
    return None, [base]
  key = swept[0]
  return key, [{**base, key: value} for value in config.eval.sweep[key]]


def _check(config: ml_collections.ConfigDict, has_unconditional: bool,
           settings: List[Dict[str, Any]]) -> None:
  from maskgit_jax import schedules
  e = config.eval
  for key in ("num_samples", "seeds", "num_reference",
              "precision_recall_samples"):
    if int(e[key]) < 1:
      raise ValueError(f"config.eval.{key} must be >= 1, got {e[key]}.")
  for setting in settings:
    schedules.validate(setting["mask_schedule"])
    if not setting["temperature"] > 0:
      raise ValueError(f"temperature={setting['temperature']}: the token "
                       "sampling temperature must be > 0.")
    if setting["guidance_scale"] > 0 and not has_unconditional:
      raise ValueError(
          f"guidance_scale={setting['guidance_scale']} needs a transformer "
          "trained with label dropout; this run has none. Evaluate with "
          "guidance_scale=0 or fine-tune with --config.label_dropout=0.1.")
  batches = -(-int(e.num_samples) // int(config.eval_batch_size))
  if batches < jax.process_count():
    raise ValueError(
        f"config.eval.num_samples={e.num_samples} makes {batches} batch(es) "
        f"of eval_batch_size={config.eval_batch_size}, fewer than the "
        f"{jax.process_count()} processes: every process needs at least "
        "one; sample more or use a smaller eval_batch_size.")
  if e.cas and e.feature_network == "none":
    raise ValueError("config.eval.cas needs real held-out images and a "
                     "feature network; feature_network='none' has neither.")


def evaluate_transformer(config: ml_collections.ConfigDict,
                         workdir: str) -> Dict[str, Any]:
  """Runs the eval job; returns what it writes to eval/<name>.json."""
  from maskgit_jax.pipeline import Pipeline
  start = time.time()
  run = workdir_lib.Workdir(workdir)
  tokenizer_run = workdir_lib.Workdir(config.tokenizer_workdir)
  data = tokenizer_run.load_config().data  # the data the tokens came from
  swept, settings = sampling_settings(config)
  has_unconditional = workdir_lib.has_unconditional(run.load_config())
  _check(config, has_unconditional, settings)
  net = features_lib.from_config(config.eval)  # weights checked first
  if net is None:
    raise ValueError("A transformer's eval needs a feature network: set "
                     "config.eval.feature_network to 'inception' or "
                     "'classifier'.")
  step = int(config.eval.get("step", 0)) or None
  if step is not None and step not in run.all_steps():
    raise ValueError(f"config.eval.step={step}: {workdir} has checkpoints at "
                     f"steps {run.all_steps()} (0 = the newest).")
  pipe = Pipeline.from_workdirs(config.tokenizer_workdir, workdir, step)
  batch = int(config.eval_batch_size)
  reference = features_lib.reference_stats(net, config.eval, data,
                                           batch_size=batch, seed=config.seed)
  real = _real_held_out(config, data) if config.eval.cas else None

  results = []
  for setting in settings:
    per_seed = [_one_seed(pipe, net, reference, real, config, setting, seed)
                for seed in range(int(config.eval.seeds))]
    results.append({"settings": setting, **summarize(per_seed),
                    "per_seed": per_seed})
  name = config.eval.name or _default_name(swept, settings)
  report = {"name": name, "step": step or run.latest_step(),
            "num_samples": int(config.eval.num_samples),
            "seeds": int(config.eval.seeds),
            "feature_network": net.name, "swept": swept,
            "results": results, **({} if swept else _flat(results[0])),
            "seconds": round(time.time() - start, 1)}
  if jax.process_index() == 0:
    files.write_json(run.eval_result(name), report)
    if swept and all(isinstance(s[swept], (int, float)) for s in settings):
      plot.line_plot([s[swept] for s in settings],
                     [r["fid"] for r in results],
                     run.eval_result(name, ".png"),
                     xlabel=swept, ylabel=f"FID ({net.name})")
  return report


def _one_seed(pipe, net, reference, real, config, setting: Dict[str, Any],
              seed: int) -> Dict[str, float]:
  """Metrics of one seed's samples under one setting."""
  e = config.eval
  class_ids = generation.balanced_class_ids(int(e.num_samples),
                                            pipe.num_classes, seed)
  mine = generation.process_share(len(class_ids),
                                 int(config.eval_batch_size))
  stats = statistics.FeatureStats(keep=int(e.precision_recall_samples),
                                  seed=seed)
  logits, correct, kept_images = [], 0, []
  batches = generation.generate_in_batches(
      pipe, class_ids[mine], batch_size=int(config.eval_batch_size),
      seed=seed, first_batch=jax.process_index(),
      batch_stride=jax.process_count(),
      sampling=dict(num_iter=setting["num_iter"],
                    schedule=setting["mask_schedule"],
                    choice_temperature=setting["choice_temperature"],
                    guidance_scale=setting["guidance_scale"],
                    temperature=setting["temperature"]))
  total = -(-len(mine) // int(config.eval_batch_size))
  for images, labels in tqdm.tqdm(batches, total=total, unit="batch",
                                  desc=f"eval seed {seed}",
                                  disable=jax.process_index() != 0):
    features, batch_logits = net.outputs(images)
    stats.update(features)
    logits.append(batch_logits)
    correct += int(np.sum(np.argmax(batch_logits, -1) == labels))
    if real is not None:
      kept_images.append(images)
  merged = distributed.merge_across_processes(stats)
  # Rows of every process, back in the order one process would have made.
  order = np.argsort(generation.gather_rows(mine))
  all_logits = generation.gather_rows(np.concatenate(logits))[order]
  precision, recall = evaluation.precision_recall(
      reference.features, merged.features)
  metrics = {
      "fid": frechet.frechet_distance(merged.mu, merged.sigma, reference.mu,
                                      reference.sigma),
      "inception_score": float(
          evaluation.inception_score(all_logits).mean),
      "precision": float(precision), "recall": float(recall)}
  if net.is_classifier:
    metrics["classifier_accuracy"] = _sum_over_processes(correct) / len(
        class_ids)
  if real is not None:
    # Every process trains the same classifier on all the samples.
    images = generation.gather_rows(np.concatenate(kept_images))[order]
    metrics["cas"] = cas_score(images, class_ids, *real,
                               num_classes=pipe.num_classes, seed=seed,
                               num_steps=int(e.cas_train_steps))
  return metrics


def cas_score(images: np.ndarray, labels: np.ndarray,
              real_images: np.ndarray, real_labels: np.ndarray, *,
              num_classes: int, seed: int, num_steps: int) -> float:
  """CAS with the project's small classifier, trained on `images` only
  (a minute or so on CPU: process 0 shows its progress)."""
  from maskgit_jax.evaluation import classifier

  def train(train_images, train_labels):
    params = classifier.train_classifier(
        train_images, train_labels, num_classes=num_classes, seed=seed,
        num_steps=num_steps, progress=jax.process_index() == 0,
        description="CAS classifier")
    return lambda batch: classifier.classifier_outputs(params, batch)[1]

  return cas_lib.classification_accuracy_score(train, images, labels,
                                               real_images, real_labels)


def _real_held_out(config, data) -> Tuple[np.ndarray, np.ndarray]:
  """The eval split's images and labels (what CAS is tested on)."""
  parts = list(features_lib.real_batches(
      data, split=data.eval_split, batch_size=int(config.eval_batch_size),
      limit=int(config.eval.num_reference)))
  return (np.concatenate([images for images, _ in parts]),
          np.concatenate([labels for _, labels in parts]))


def _sum_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def summarize(per_seed: List[Dict[str, float]]) -> Dict[str, float]:
  """Mean over seeds of each metric, and its spread as `<metric>_std`."""
  out = {}
  for key in METRICS:
    values = [m[key] for m in per_seed if key in m]
    if values:
      out[key] = float(np.mean(values))
      out[f"{key}_std"] = float(np.std(values))
  return out


def _flat(result: Dict[str, Any]) -> Dict[str, Any]:
  """The top-level keys of a single-setting report (fid, ..., settings)."""
  return {k: v for k, v in result.items() if k != "per_seed"}


def _default_name(swept: Optional[str], settings: List[Dict[str, Any]]) -> str:
  if swept:
    return f"sweep_{swept}"
  s = settings[0]
  name = (f"iter{s['num_iter']}_{s['mask_schedule']}_"
          f"t{s['choice_temperature']:g}_g{s['guidance_scale']:g}")
  # Runs at the default temperature keep the names they always had.
  return name + (f"_T{s['temperature']:g}" if s["temperature"] != 1 else "")


def real_ceiling(net, reference, train: Tuple[np.ndarray, np.ndarray],
                 test: Tuple[np.ndarray, np.ndarray], *, num_classes: int,
                 cas_train_steps: int, precision_recall_samples: int,
                 seed: int = 0) -> Dict[str, float]:
  """The metrics of real training images in place of samples: what a
  perfect generator would score (FID and precision/recall against the
  test reference, the feature classifier's accuracy on real test images,
  and CAS of a classifier trained on the real training images)."""
  stats = statistics.FeatureStats(keep=precision_recall_samples, seed=seed)
  images, labels = train
  for start in range(0, len(images), 500):
    stats.update(net.outputs(images[start:start + 500])[0])
  precision, recall = evaluation.precision_recall(reference.features,
                                                  stats.features)
  out = {"fid": frechet.frechet_distance(stats.mu, stats.sigma,
                                         reference.mu, reference.sigma),
         "precision": float(precision), "recall": float(recall)}
  if net.is_classifier:
    test_logits = np.concatenate([net.outputs(test[0][s:s + 500])[1]
                                  for s in range(0, len(test[0]), 500)])
    out["classifier_accuracy"] = float(
        np.mean(np.argmax(test_logits, -1) == test[1]))
  out["cas"] = cas_score(images, labels, *test, num_classes=num_classes,
                         seed=seed, num_steps=cas_train_steps)
  return out
