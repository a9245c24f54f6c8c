"""Masks, boxes and canvas extension for inpainting and outpainting.

Host-side numpy geometry around `Pipeline.edit`, following the official
MaskGIT demo: a pixel mask becomes the token mask to regenerate (grown by a
token each way, so the edit blends into its surroundings), and the decoded
images are pasted back through that token mask upsampled and Gaussian-
blurred with a radius that scales with the image (image side / 16 - 1).
"""

from typing import Optional, Sequence, Tuple

import numpy as np

EXTEND_SIDES = {"right": (2, -1), "left": (2, 1), "bottom": (1, -1),
                "top": (1, 1)}


def _check_count(name: str, value, minimum: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < minimum):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def box_mask(size: Sequence[int], top: int, left: int, height: int,
             width: int) -> np.ndarray:
  """bool [H, W], True inside the box: what `edit` regenerates."""
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"size must be (height, width), got {size!r}.")
  for name, value in (("height", height), ("width", width)):
    _check_count(name, value, minimum=1)
  if not (0 <= top < size[0] and 0 <= left < size[1]):
    raise ValueError(f"box corner (top={top}, left={left}) must lie inside "
                     f"the {size[0]}x{size[1]} image.")
  mask = np.zeros(size, bool)
  mask[top:top + height, left:left + width] = True
  return mask


def dilate_cells(cells: np.ndarray, steps: int) -> np.ndarray:
  """Grows a bool [B, h, w] grid by `steps` cells each way (rows, then
  columns, so a box grows into a box), clipped at the borders."""
  cells = np.array(cells, bool)
  for _ in range(_check_count("dilate", steps)):
    rows = cells.copy()
    rows[:, 1:] |= cells[:, :-1]
    rows[:, :-1] |= cells[:, 1:]
    cells = rows.copy()
    cells[:, :, 1:] |= rows[:, :, :-1]
    cells[:, :, :-1] |= rows[:, :, 1:]
  return cells


def token_mask(pixel_mask, token_shape: Sequence[int],
               dilate: int = 0) -> np.ndarray:
  """Pixel mask [B, H, W] -> token mask [B, h, w].

  A token is regenerated when any pixel of its patch is (a partly covered
  patch cannot be half kept), then the mask grows by `dilate` tokens each
  way; `Pipeline.edit` grows it by one, as the official demo does.
  """
  pixel_mask = np.asarray(pixel_mask, bool)
  if pixel_mask.ndim != 3:
    raise ValueError(f"pixel_mask must be [B, H, W], got shape "
                     f"{pixel_mask.shape}.")
  b, height, width = pixel_mask.shape
  h, w = token_shape
  if height % h or width % w:
    raise ValueError(f"mask of size {height}x{width} does not tile the "
                     f"{h}x{w} token grid.")
  cells = pixel_mask.reshape(b, h, height // h, w, width // w).any((2, 4))
  return dilate_cells(cells, dilate)


def default_blur_radius(image_side: int) -> int:
  """The official composite's blur radius: image_side // 16 - 1 pixels
  (15 at 256 px, 31 at 512 px), never negative."""
  return max(int(image_side) // 16 - 1, 0)


def soft_mask(cells, size: Sequence[int],
              blur_radius: Optional[int] = None) -> np.ndarray:
  """Token mask [B, h, w] -> float [B, H, W] in [0, 1]: upsampled (nearest)
  and Gaussian-blurred, so the regenerated part fades into the kept image.

  `blur_radius` defaults to `default_blur_radius(H)`, as the official demo.
  """
  from PIL import Image, ImageFilter  # Local: PIL is only needed here.
  cells = np.asarray(cells, bool)
  if cells.ndim != 3:
    raise ValueError(f"cells must be [B, h, w], got shape {cells.shape}.")
  height, width = (int(s) for s in size)
  if blur_radius is None:
    blur_radius = default_blur_radius(height)
  radius = _check_count("blur_radius", blur_radius)
  out = []
  for cell in cells:
    image = Image.fromarray(cell.astype(np.uint8) * 255).resize(
        (width, height), Image.NEAREST)
    out.append(np.asarray(image.filter(ImageFilter.GaussianBlur(radius)),
                          np.float32) / 255.0)
  return np.stack(out)


def composite(edited: np.ndarray, images: np.ndarray,
              weight: np.ndarray) -> np.ndarray:
  """uint8 edited [B, H, W, C] pasted over float images in [0, 1] through
  weight [B, H, W] (1 = edited): uint8 [B, H, W, C]."""
  original = np.round(np.clip(images, 0.0, 1.0) * 255)
  weight = np.asarray(weight, np.float32)[..., None]
  return np.round(edited * weight + original * (1 - weight)).astype(np.uint8)


def extend_canvas(images, pixels: int,
                  side: str = "right") -> Tuple[np.ndarray, np.ndarray]:
  """Outpainting inputs: shifts `images` [B, H, W, C] by `pixels` away from
  `side` and returns (canvas, mask) with mask True on the new strip, which
  is blank (0) in the canvas."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
  if side not in EXTEND_SIDES:
    raise ValueError(f"side must be one of {sorted(EXTEND_SIDES)}, got "
                     f"{side!r}.")
  axis, direction = EXTEND_SIDES[side]
  if not 0 < pixels < images.shape[axis]:
    raise ValueError(f"pixels must be in (0, {images.shape[axis]}), got "
                     f"{pixels}.")
  canvas = np.roll(images, direction * pixels, axis=axis)
  mask = np.zeros(images.shape[:3], bool)
  index = [slice(None)] * 3
  index[axis] = slice(-pixels, None) if direction < 0 else slice(0, pixels)
  mask[tuple(index)] = True
  canvas[mask] = 0.0
  return canvas, mask
