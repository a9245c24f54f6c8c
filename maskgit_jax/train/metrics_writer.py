"""Metrics to a JSON-lines file and TensorBoard event files (no TensorFlow).

Only process 0 writes. `metrics.jsonl` holds one object per logged step, so
runs can be compared with a few lines of Python; TensorBoard reads the
`tensorboard/` folder.
"""

import json
import os
from typing import Mapping

import jax
import numpy as np

from maskgit_jax import workdir as workdir_lib


class MetricsWriter:

  def __init__(self, workdir: workdir_lib.Workdir):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    workdir.path.mkdir(parents=True, exist_ok=True)
    self._jsonl = workdir.metrics_file.open("a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.fspath(workdir.tensorboard))
    except ImportError:  # Optional: the JSON-lines file is always written.
      self._tb = None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in clean.items():
        self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image, int(step), dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
