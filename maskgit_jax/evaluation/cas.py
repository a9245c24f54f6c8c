"""Classification Accuracy Score (Ravuri & Vinyals, 2019).

Train a classifier on generated samples only, labelled with the classes they
were generated for, and measure its accuracy on real held-out data. A model
whose samples lack class detail or diversity trains a poor classifier, even
when FID looks fine. The MaskGIT paper reports it on ImageNet (Table 2)
with a ResNet-50; here the classifier is whatever the caller trains, so the
same function serves that recipe and the demo's small classifier.
"""

from typing import Callable

import numpy as np

# predict(images) -> class ids [n] or class scores [n, num_classes].
Predict = Callable[[np.ndarray], np.ndarray]
# train(images, labels) -> predict, trained only on what it is given.
TrainClassifier = Callable[[np.ndarray, np.ndarray], Predict]


def _check_labelled(name: str, images, labels) -> tuple:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim < 2 or images.shape[0] == 0:
    raise ValueError(f"{name} images must be a non-empty batch [n, ...], got "
                     f"shape {images.shape}.")
  if labels.shape != (images.shape[0],) or not np.issubdtype(
      labels.dtype, np.integer):
    raise ValueError(f"{name} labels must be integers of shape "
                     f"({images.shape[0]},), one per image, got "
                     f"{labels.dtype} {labels.shape}.")
  return images, labels


def _predicted_classes(scores: np.ndarray, n: int) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim == 2 and scores.shape[0] == n:
    return np.argmax(scores, axis=1)
  if scores.shape == (n,):
    return scores
  raise ValueError(f"A classifier must return class ids [{n}] or class "
                   f"scores [{n}, num_classes], got shape {scores.shape}.")


def classifier_accuracy(predict: Predict, images, labels,
                        batch_size: int = 1000) -> float:
  """Fraction of `images` that `predict` assigns their `labels`, in batches
  of `batch_size` (the images may be many)."""
  images, labels = _check_labelled("evaluation", images, labels)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got "
                     f"{batch_size!r}.")
  correct = 0
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    predicted = _predicted_classes(predict(batch), batch.shape[0])
    correct += int(np.sum(predicted == labels[start:start + batch_size]))
  return correct / images.shape[0]


def classification_accuracy_score(train_classifier: TrainClassifier,
                                  generated_images, generated_labels,
                                  real_images, real_labels,
                                  batch_size: int = 1000) -> float:
  """CAS: accuracy on real data of a classifier trained on generated data.

  Args:
    train_classifier: trains a fresh classifier on (images, labels) and
      returns its `predict`; it must see no real data.
    generated_images, generated_labels: samples and the classes they were
      generated for.
    real_images, real_labels: real held-out data (e.g. the test split).
    batch_size: evaluation batch size.
  """
  generated_images, generated_labels = _check_labelled(
      "generated", generated_images, generated_labels)
  real_images, real_labels = _check_labelled("real", real_images,
                                             real_labels)
  if generated_images.shape[1:] != real_images.shape[1:]:
    raise ValueError(f"generated images {generated_images.shape[1:]} and "
                     f"real images {real_images.shape[1:]} must have the "
                     "same shape.")
  predict = train_classifier(generated_images, generated_labels)
  return classifier_accuracy(predict, real_images, real_labels, batch_size)
