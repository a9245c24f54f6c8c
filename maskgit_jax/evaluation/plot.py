"""A small line plot as PNG with PIL only (no plotting dependency)."""

import os
from typing import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 420, 60


def line_plot(xs: Sequence[float], ys: Sequence[float], path: str, *,
              xlabel: str, ylabel: str) -> str:
  """Plots ys against xs (points joined in x order) with labelled extremes;
  writes the PNG atomically and returns its path."""
  if len(xs) != len(ys) or not xs:
    raise ValueError(f"need as many ys as xs, at least one: {xs}, {ys}")
  points = sorted(zip(map(float, xs), map(float, ys)))
  x_lo, x_hi = points[0][0], points[-1][0]
  y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
  x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0
  to_px = lambda x, y: (
      MARGIN + (x - x_lo) / x_span * (WIDTH - 2 * MARGIN),
      HEIGHT - MARGIN - (y - y_lo) / y_span * (HEIGHT - 2 * MARGIN))
  image = Image.new("RGB", (WIDTH, HEIGHT), "white")
  draw = ImageDraw.Draw(image)
  draw.line([(MARGIN, MARGIN), (MARGIN, HEIGHT - MARGIN),
             (WIDTH - MARGIN, HEIGHT - MARGIN)], fill="black")
  pixels = [to_px(x, y) for x, y in points]
  if len(pixels) > 1:
    draw.line(pixels, fill=(31, 119, 180), width=2)
  for (x, y), (px, py) in zip(points, pixels):
    draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
    draw.text((px - 10, HEIGHT - MARGIN + 6), f"{x:g}", fill="black")
    draw.text((px + 5, py - 14), f"{y:.3g}", fill="black")
  draw.text((WIDTH // 2 - 20, HEIGHT - 24), xlabel, fill="black")
  draw.text((6, 8), ylabel, fill="black")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  image.save(tmp)
  os.replace(tmp, path)
  return path
