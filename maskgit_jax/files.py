"""Writing a run's files through one path layer (`etils.epath`).

A workdir may be a local folder or an object store URL (gs://...); the
framework writes both the same way through these helpers, so a URL is
never mistaken for a local folder named `gs:`. Local files are replaced
atomically (temporary file, then rename), so a crash never leaves half a
file; an object store commits a whole object at once, so it is written in
one call.
"""

import io
import json
import os
from typing import Any, Union

import numpy as np
from etils import epath

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """True for a path on this machine's file system (no URL scheme, or
  file://); False for gs://, s3://, ... URLs."""
  text = os.fspath(path)
  return "://" not in text or text.startswith("file://")


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `path` whole (parents created); returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    path.write_bytes(data)
    return path
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(os.fspath(tmp), os.fspath(path))
  return path


def write_text(path: PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any) -> epath.Path:
  return write_text(path, json.dumps(value, indent=2))


def write_png(path: PathLike, image: Any) -> epath.Path:
  """A uint8 [H, W, C] array or a PIL image as PNG."""
  from PIL import Image
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return write_bytes(path, buffer.getvalue())
