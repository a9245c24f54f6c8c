"""An image folder (one sub-folder per class) as a TFDS builder.

Layout: `root/<class name>/**/<image>`. Class ids are the sorted sub-folder
names (0, 1, ...); hidden entries (names starting with ".") are ignored, and
images may sit in nested folders below their class folder. Files are read with
PIL, so any format it decodes works.

Splits: "train" holds every image, unless `validation_fraction` > 0, in
which case "validation" holds a fixed pseudo-random part of about that
fraction and "train" the rest. An image's split depends only on its path
relative to `root` (a hash of it), so adding files never moves the old ones
from one split to the other. For a separate validation folder, build it as a
second image folder instead.

Unreadable images (corrupt, truncated, not images): by default each is logged
with its path and skipped, and the dataset's metadata records them
(`info.metadata["skipped_files"]`, relative paths); with
`skip_corrupt_images=False` the build fails on the first one, naming it.

Each (root, validation_fraction) pair is its own TFDS config, so several
folders can share one data_dir. The build is a snapshot: after changing the
folder, delete `<data_dir>/maskgit_image_folder/<config>` to rebuild.

Examples are {"image": uint8 [h, w, 3], "label": int}; RGB JPEGs are stored
as they are, every other image is converted to RGB and stored as PNG.
"""

import dataclasses
import hashlib
import io
import os
import re
from typing import Iterator, List, Sequence, Tuple

from absl import logging
import PIL.Image
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif",
                    ".tiff", ".webp")

# What PIL raises for files it cannot decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError,
                  PIL.Image.DecompressionBombError)


def list_classes(root: str) -> List[str]:
  """Sorted class sub-folder names of `root`; errors name the folder."""
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"Image folder {root!r} does not exist (expected "
        f"{root}/<class>/<image>).")
  classes = sorted(entry.name for entry in os.scandir(root)
                   if entry.is_dir() and not entry.name.startswith("."))
  if not classes:
    raise ValueError(
        f"Image folder {root!r} has no class sub-folders; expected one folder "
        f"per class holding images: {root}/<class>/<image>.")
  return classes


def list_images(root: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
  """(path relative to root, class id) of every image file, sorted by path."""
  found = []
  for label, name in enumerate(classes):
    for folder, subfolders, files in os.walk(os.path.join(root, name)):
      subfolders[:] = [d for d in subfolders if not d.startswith(".")]
      for file in files:
        if not file.startswith(".") and file.lower().endswith(IMAGE_EXTENSIONS):
          path = os.path.join(folder, file)
          found.append((os.path.relpath(path, root), label))
  if not found:
    raise ValueError(
        f"Image folder {root!r} has class folders {list(classes)[:5]}... but "
        f"no image files in them (extensions {', '.join(IMAGE_EXTENSIONS)}).")
  return sorted(found)


def in_validation(relative_path: str, fraction: float) -> bool:
  """Whether an image belongs to the held-out split (stable across runs)."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def encode_image(path: str) -> bytes:
  """Fully decodes `path` (so corrupt files fail here) and returns RGB bytes."""
  with open(path, "rb") as f:
    data = f.read()
  with PIL.Image.open(io.BytesIO(data)) as image:
    image.load()
    if image.format == "JPEG" and image.mode == "RGB":
      return data
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
  return buffer.getvalue()


def config_name(root: str, validation_fraction: float) -> str:
  """A readable, unique TFDS config name for one folder and split choice."""
  key = f"{os.path.abspath(root)}|{validation_fraction!r}"
  digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
  stem = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(
      os.path.abspath(root)).lower()).strip("_") or "root"
  return f"{stem[:40]}_{digest}"


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
  source_dir: str = ""
  validation_fraction: float = 0.0
  skip_corrupt_images: bool = True


class MaskgitImageFolder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Images in `root/<class>/` with class ids from sorted folder names."""

  name = "maskgit_image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Image folder snapshot."}

  def __init__(self, *, source_dir: str, validation_fraction: float = 0.0,
               skip_corrupt_images: bool = True, **kwargs):
    if not source_dir:
      raise ValueError("image_folder needs data.source_dir: the folder that "
                       "holds one sub-folder per class.")
    if not 0.0 <= validation_fraction < 1.0:
      raise ValueError(f"validation_fraction={validation_fraction} must be in "
                       "[0, 1).")
    root = os.path.abspath(os.path.expanduser(source_dir))
    self._classes = list_classes(root)
    self.skipped_files: List[str] = []
    config = ImageFolderConfig(
        name=config_name(root, validation_fraction),
        description=f"Images of {root}",
        source_dir=root,
        validation_fraction=validation_fraction,
        skip_corrupt_images=skip_corrupt_images)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"Class-labelled images from {self.builder_config.source_dir}."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=None),
            "label": tfds.features.ClassLabel(names=self._classes),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    images = list_images(config.source_dir, self._classes)
    fraction = config.validation_fraction
    if fraction == 0:
      splits = {"train": images}
    else:
      held_out = [in_validation(path, fraction) for path, _ in images]
      splits = {
          "train": [im for im, v in zip(images, held_out) if not v],
          "validation": [im for im, v in zip(images, held_out) if v],
      }
    for split, items in splits.items():
      if not items:
        raise ValueError(
            f"validation_fraction={fraction} leaves split {split!r} of "
            f"{config.source_dir!r} empty ({len(images)} images in all).")
    self.skipped_files = []
    self.info.metadata["skipped_files"] = self.skipped_files
    return {split: self._generate_examples(items)
            for split, items in splits.items()}

  def _generate_examples(self, items: Sequence[Tuple[str, int]]) -> Iterator:
    config = self.builder_config
    skipped_before = len(self.skipped_files)
    for relative_path, label in items:
      path = os.path.join(config.source_dir, relative_path)
      try:
        image = encode_image(path)
      except _DECODE_ERRORS as e:
        if not config.skip_corrupt_images:
          raise ValueError(
              f"Unreadable image {path}: {e!r}. Remove or fix it, or set "
              "data.skip_corrupt_images=True to skip such files.") from e
        logging.warning("Skipping unreadable image %s: %r", path, e)
        self.skipped_files.append(relative_path)
        continue
      yield relative_path, {"image": image, "label": label}
    skipped = len(self.skipped_files) - skipped_before
    if skipped:
      logging.warning("Skipped %d unreadable image(s) of %d in %s.", skipped,
                      len(items), config.source_dir)
