"""Metrics and feature statistics for evaluating generated images.

  frechet.py          frechet_distance: FID from two (mu, sigma) pairs
  inception_score.py  inception_score: IS over 10 splits of logits
  precision_recall.py precision_recall: improved precision and recall
  statistics.py       FeatureStats: streaming mean and covariance
  reservoir.py        Reservoir: a bounded uniform subset of features
  distributed.py      merge_across_processes: every process's statistics
  reference.py        reference npz cache, ADM reference batches
  cas.py              classification_accuracy_score (CAS)

The package attributes `inception_score` and `precision_recall` are the
functions (imported here, so they shadow their modules for good); import
the modules by their full dotted path for anything else they hold.
"""

from maskgit_jax.evaluation.cas import classification_accuracy_score
from maskgit_jax.evaluation.cas import classifier_accuracy
from maskgit_jax.evaluation.distributed import host_allgather
from maskgit_jax.evaluation.distributed import local_rows
from maskgit_jax.evaluation.distributed import merge_across_processes
from maskgit_jax.evaluation.frechet import frechet_distance
from maskgit_jax.evaluation.inception_score import InceptionScore
from maskgit_jax.evaluation.inception_score import inception_score
from maskgit_jax.evaluation.precision_recall import coverage
from maskgit_jax.evaluation.precision_recall import manifold_radii
from maskgit_jax.evaluation.precision_recall import precision_recall
from maskgit_jax.evaluation.precision_recall import PrecisionRecall
from maskgit_jax.evaluation.reference import AdmReferenceBatch
from maskgit_jax.evaluation.reference import iter_npz_batches
from maskgit_jax.evaluation.reference import load_reference
from maskgit_jax.evaluation.reference import read_adm_reference
from maskgit_jax.evaluation.reference import reference_cache_path
from maskgit_jax.evaluation.reference import ReferenceStats
from maskgit_jax.evaluation.reference import save_reference
from maskgit_jax.evaluation.reservoir import Reservoir
from maskgit_jax.evaluation.statistics import FeatureStats

__all__ = [
    "AdmReferenceBatch",
    "classification_accuracy_score",
    "classifier_accuracy",
    "coverage",
    "FeatureStats",
    "frechet_distance",
    "host_allgather",
    "inception_score",
    "InceptionScore",
    "iter_npz_batches",
    "load_reference",
    "local_rows",
    "manifold_radii",
    "merge_across_processes",
    "precision_recall",
    "PrecisionRecall",
    "read_adm_reference",
    "reference_cache_path",
    "ReferenceStats",
    "Reservoir",
    "save_reference",
]
