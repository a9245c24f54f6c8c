"""Feature networks, and the real data's reference statistics under them.

The eval jobs measure images through one feature network named by
`config.eval.feature_network`: the FID InceptionV3 (ImageNet), a small
in-project classifier (Fashion-MNIST, where Inception is the wrong network),
or none (pixel metrics only). Its weights are checked before any sampling
starts, so a missing file fails in seconds, not after an hour of decoding.

The reference (the real images' mean, covariance and a feature subset for
precision/recall) is computed once per dataset, split, network and size and
cached as npz, or read from a given npz (ours or an ADM reference batch).
"""

import os
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import jax
import ml_collections
import numpy as np
import tqdm

from maskgit_jax.evaluation import reference as reference_lib
from maskgit_jax.evaluation import statistics

FEATURE_NETWORKS = ("inception", "classifier", "none")
Outputs = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


class FeatureNetwork(NamedTuple):
  """`outputs` maps uint8 images [B, H, W, 3] to (features [B, D], logits
  [B, C]) as float32 numpy arrays. `is_classifier`: the logits are over the
  dataset's own classes (so its accuracy on samples means something)."""
  name: str
  outputs: Outputs
  is_classifier: bool


def from_config(eval_config: ml_collections.ConfigDict
                ) -> Optional[FeatureNetwork]:
  """The configured network, its weights loaded (None for "none")."""
  kind = eval_config.feature_network
  if kind not in FEATURE_NETWORKS:
    raise ValueError(f"config.eval.feature_network={kind!r}; valid: "
                     f"{FEATURE_NETWORKS}.")
  if kind == "none":
    return None
  if kind == "inception":
    from maskgit_jax.models import inception
    variables = inception.load_inception_params(
        os.path.expanduser(eval_config.inception_weights))
    def outputs(images):
      pool, logits = inception.features(variables, images)
      return np.asarray(pool, np.float32), np.asarray(logits, np.float32)
    return FeatureNetwork("inception", outputs, is_classifier=False)
  if not eval_config.classifier:
    raise ValueError(
        "config.eval.feature_network='classifier' needs config.eval."
        "classifier: the npz of a classifier trained on the real training "
        "set (maskgit_jax.evaluation.classifier; `make demo` trains one).")
  from maskgit_jax.evaluation import classifier
  params, _ = classifier.load_classifier(
      os.path.expanduser(eval_config.classifier))
  def classify(images):
    return classifier.classifier_outputs(params, images)
  return FeatureNetwork("classifier", classify, is_classifier=True)


def real_batches(data_config: ml_collections.ConfigDict, *, split: str,
                 batch_size: int, limit: int
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(uint8 images, labels) of the first `limit` records of a split, with
  the evaluation preprocessing (centre crop at data.image_size)."""
  from maskgit_jax.data import input_pipeline
  taken = 0
  for batch in input_pipeline.eval_batches(data_config, split=split,
                                           batch_size=batch_size, uint8=True):
    if taken >= limit:
      break
    images = batch["image"][:limit - taken]
    taken += len(images)
    yield images, np.asarray(batch["label"])[:len(images)]


def reference_stats(net: FeatureNetwork,
                    eval_config: ml_collections.ConfigDict,
                    data_config: ml_collections.ConfigDict, *,
                    batch_size: int, seed: int
                    ) -> reference_lib.ReferenceStats:
  """The real data's statistics under `net`: from `eval.reference` when
  given, else from the cache, else computed (and cached by process 0)."""
  keep = int(eval_config.precision_recall_samples)
  if eval_config.reference:
    return _given_reference(net, os.path.expanduser(eval_config.reference),
                            batch_size)
  path = reference_lib.reference_cache_path(
      os.path.expanduser(eval_config.reference_cache_dir), data_config.name,
      data_config.eval_split,
      variant=f"{net.name}-{data_config.image_size}px-"
              f"{int(eval_config.num_reference)}-keep{keep}-seed{seed}")
  if path.exists():
    return reference_lib.load_reference(path)
  stats = statistics.FeatureStats(keep=keep, seed=seed)
  for images, _ in tqdm.tqdm(
      real_batches(data_config, split=data_config.eval_split,
                   batch_size=batch_size,
                   limit=int(eval_config.num_reference)),
      desc="reference", unit="batch", disable=jax.process_index() != 0):
    stats.update(net.outputs(images)[0])
  reference = reference_lib.ReferenceStats.from_feature_stats(stats)
  if jax.process_index() == 0:
    reference_lib.save_reference(path, reference)
  return reference


def _given_reference(net: FeatureNetwork, path: str,
                     batch_size: int) -> reference_lib.ReferenceStats:
  with np.load(path, allow_pickle=False) as data:
    is_adm = "arr_0" in data.files
  if not is_adm:
    return reference_lib.load_reference(path)
  batch = reference_lib.read_adm_reference(path)
  if not batch.holds_images:
    return batch.to_reference()
  features = [net.outputs(images)[0] for images in tqdm.tqdm(
      batch.batches(batch_size), desc="reference", unit="batch")]
  return batch.to_reference(np.concatenate(features))
