"""Metrics to a JSON-lines file and TensorBoard event files (no TensorFlow).

Only process 0 writes. `metrics.jsonl` holds one object per logged step, so
runs can be compared with a few lines of Python; TensorBoard reads the
`tensorboard/` folder. Both go through the path layer: on an object store
(objects cannot be appended to) the JSON lines are rewritten whole at each
write and the event files are written locally and copied up at each flush.
"""

import json
import os
import shutil
import tempfile
from typing import Mapping

import jax
import numpy as np

from maskgit_jax import files
from maskgit_jax import workdir as workdir_lib


class MetricsWriter:

  def __init__(self, workdir: workdir_lib.Workdir):
    self.enabled = jax.process_index() == 0
    self._run = workdir
    self._local = files.is_local(workdir.path)
    self._jsonl = None
    self._lines = ""  # What an object store's metrics.jsonl holds.
    self._tb = None
    self._tb_dir = None
    if not self.enabled:
      return
    workdir.path.mkdir(parents=True, exist_ok=True)
    if self._local:
      self._jsonl = workdir.metrics_file.open("a")
      self._tb_dir = os.fspath(workdir.tensorboard)
    else:
      if workdir.metrics_file.exists():
        self._lines = workdir.metrics_file.read_text()
      self._tb_dir = tempfile.mkdtemp(prefix="maskgit_jax_tensorboard_")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._tb_dir)
    except ImportError:  # Optional: the JSON-lines file is always written.
      self._tb = None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._local:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines += line
      files.write_text(self._run.metrics_file, self._lines)
    if self._tb is not None:
      for name, value in clean.items():
        self._tb.add_scalar(name, value, int(step))
      self._flush_tensorboard()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image, int(step), dataformats="HWC")
      self._flush_tensorboard()

  def _flush_tensorboard(self) -> None:
    self._tb.flush()
    self._copy_tensorboard()

  def _copy_tensorboard(self) -> None:
    """Object stores: the local event files, copied up whole."""
    if self._local:
      return
    for name in os.listdir(self._tb_dir):
      with open(os.path.join(self._tb_dir, name), "rb") as f:
        files.write_bytes(self._run.tensorboard / name, f.read())

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._copy_tensorboard()
      if not self._local:
        shutil.rmtree(self._tb_dir, ignore_errors=True)
