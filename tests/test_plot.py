"""The PNG line plots the eval jobs and the schedule experiment write."""

import numpy as np
import pytest
from PIL import Image

from maskgit_jax.evaluation import plot


def colour_pixels(path, colour):
  pixels = np.asarray(Image.open(path).convert("RGB"))
  return int(np.all(pixels == colour, axis=-1).sum())


def test_each_series_is_drawn_in_its_own_colour(tmp_path):
  path = str(tmp_path / "two.png")
  plot.multi_line_plot({"cosine": ([2, 4, 8], [30.0, 20.0, 25.0]),
                        "linear": ([2, 4, 8], [40.0, 35.0, 33.0])}, path,
                       xlabel="iterations", ylabel="FID")
  assert Image.open(path).size == (plot.WIDTH, plot.HEIGHT)
  assert colour_pixels(path, plot.COLOURS[0]) > 50
  assert colour_pixels(path, plot.COLOURS[1]) > 50
  assert colour_pixels(path, plot.COLOURS[2]) == 0
  assert not list(tmp_path.glob("*.tmp.png"))


def test_single_line_plot_handles_a_constant_series(tmp_path):
  path = plot.line_plot([1, 2], [5.0, 5.0], str(tmp_path / "flat.png"),
                        xlabel="x", ylabel="y")
  assert colour_pixels(path, plot.COLOURS[0]) > 50


@pytest.mark.parametrize("series", [{}, {"a": ([1, 2], [1.0])},
                                    {"a": ([], [])}])
def test_bad_series_are_refused(series, tmp_path):
  with pytest.raises(ValueError, match="series|ys"):
    plot.multi_line_plot(series, str(tmp_path / "x.png"), xlabel="x",
                         ylabel="y")
