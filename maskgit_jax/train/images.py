"""PNG grids: reconstructions next to originals, samples per class."""

import jax
import numpy as np

from maskgit_jax import files
from maskgit_jax.data.input_pipeline import to_uint8


def grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """[rows * cols, H, W, C] -> one uint8 image, row-major, white padding."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = -(-n // rows)
  canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255,
                   np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    canvas[top:top + h, left:left + w] = image
  return canvas


def save_png(image: np.ndarray, path: str) -> str:
  """Writes the PNG (a local path or a URL) on process 0 only: every
  process of a job draws the same grid."""
  if jax.process_index() == 0:
    files.write_png(path, to_uint8(image))
  return path


def save_pairs(originals: np.ndarray, reconstructions: np.ndarray,
               path: str) -> str:
  """Two rows: originals on top, their reconstructions below."""
  both = np.concatenate([to_uint8(originals), to_uint8(reconstructions)])
  return save_png(grid(both, rows=2), path)


def sample_grid(pipe, config, path: str) -> dict:
  """One row per class, `sampling.samples_per_class` samples in each,
  generated in batches of `eval_batch_size` (an ImageNet grid of 1,000
  classes never sits in one call), shared by the processes of a job."""
  from maskgit_jax.evaluation import generation
  s = config.sampling
  classes = np.repeat(np.arange(pipe.num_classes), s.samples_per_class)
  # eval_batch_size even for a smaller grid: the eval job's program.
  images = generation.generate_all(
      pipe, classes, batch_size=config.eval_batch_size, seed=config.seed,
      sampling=dict(num_iter=s.num_iter,
                    choice_temperature=s.choice_temperature,
                    guidance_scale=s.guidance_scale,
                    temperature=s.temperature))
  save_png(grid(images, rows=pipe.num_classes), path)
  return {}
