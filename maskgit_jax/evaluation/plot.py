"""Small line plots as PNG with PIL only (no plotting dependency)."""

from typing import Dict, Sequence, Tuple

from PIL import Image, ImageDraw

from maskgit_jax import files

WIDTH, HEIGHT, MARGIN = 640, 420, 60
LEGEND_WIDTH = 100
# Distinguishable colours (the tab10 palette) for up to ten series.
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
           (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
           (188, 189, 34), (23, 190, 207))

Series = Tuple[Sequence[float], Sequence[float]]


def line_plot(xs: Sequence[float], ys: Sequence[float], path: files.PathLike, *,
              xlabel: str, ylabel: str) -> str:
  """Plots ys against xs (points joined in x order) with labelled values;
  writes the PNG atomically and returns its path."""
  return multi_line_plot({"": (xs, ys)}, path, xlabel=xlabel, ylabel=ylabel,
                         label_points=True)


def multi_line_plot(series: Dict[str, Series], path: files.PathLike, *, xlabel: str,
                    ylabel: str, label_points: bool = False) -> str:
  """One line per named series on shared axes, with a legend when the
  series have names; writes the PNG (a local path or a URL) and returns
  its path."""
  if not series or len(series) > len(COLOURS):
    raise ValueError(f"need 1 to {len(COLOURS)} series, got {len(series)}.")
  curves = {}
  for name, (xs, ys) in series.items():
    if len(xs) != len(ys) or not xs:
      raise ValueError(f"series {name!r}: need as many ys as xs, at least "
                       f"one: {xs}, {ys}")
    curves[name] = sorted(zip(map(float, xs), map(float, ys)))
  points = [p for curve in curves.values() for p in curve]
  # Named series get a legend column to the right of the plot area.
  right = MARGIN + (LEGEND_WIDTH if any(curves) else 0)
  x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
  y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
  x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0
  to_px = lambda x, y: (
      MARGIN + (x - x_lo) / x_span * (WIDTH - MARGIN - right),
      HEIGHT - MARGIN - (y - y_lo) / y_span * (HEIGHT - 2 * MARGIN))
  image = Image.new("RGB", (WIDTH, HEIGHT), "white")
  draw = ImageDraw.Draw(image)
  draw.line([(MARGIN, MARGIN), (MARGIN, HEIGHT - MARGIN),
             (WIDTH - right, HEIGHT - MARGIN)], fill="black")
  for x in sorted({p[0] for p in points}):
    px = to_px(x, y_lo)[0]
    draw.text((px - 6, HEIGHT - MARGIN + 6), f"{x:g}", fill="black")
  for value in (y_lo, y_hi):
    draw.text((4, to_px(x_lo, value)[1] - 6), f"{value:.3g}", fill="black")
  for index, (name, curve) in enumerate(curves.items()):
    colour = COLOURS[index]
    pixels = [to_px(x, y) for x, y in curve]
    if len(pixels) > 1:
      draw.line(pixels, fill=colour, width=2)
    for (_, y), (px, py) in zip(curve, pixels):
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
      if label_points:
        draw.text((px + 5, py - 14), f"{y:.3g}", fill="black")
    if name:
      top, left = MARGIN + 16 * index, WIDTH - right + 20
      draw.line([(left, top + 6), (left + 20, top + 6)], fill=colour,
                width=3)
      draw.text((left + 26, top), name, fill="black")
  draw.text((WIDTH // 2 - 20, HEIGHT - 24), xlabel, fill="black")
  draw.text((6, 8), ylabel, fill="black")
  files.write_png(path, image)
  return str(path)
