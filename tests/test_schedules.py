import math

import numpy as np
import pytest

from maskgit_jax import schedules

R = np.linspace(0.0, 1.0, 101)
N = 256

CLOSED_FORMS = {
    "cosine": lambda r: np.cos(math.pi / 2 * r),
    "arccos": lambda r: np.arccos(r) * 2 / math.pi,
    "linear": lambda r: 1 - r,
    "uniform": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "cubic": lambda r: 1 - r**3,
    "sqrt": lambda r: 1 - np.sqrt(r),
    "pow2.5": lambda r: 1 - r**2.5,
    "pow0.5": lambda r: 1 - r**0.5,
    "log": lambda r: -np.log2(np.maximum(r, 1e-30)) / np.log2(N),
    "exp": lambda r: 1 - 2.0**(-np.log2(N) * (1 - r)),
}


@pytest.mark.parametrize("method", sorted(CLOSED_FORMS))
def test_values_match_closed_form_clipped(method):
  got = np.asarray(schedules.mask_ratio(R, method, num_tokens=N))
  want = np.clip(CLOSED_FORMS[method](R), 1e-6, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(CLOSED_FORMS))
def test_monotone_and_in_range(method):
  got = np.asarray(schedules.mask_ratio(R, method, num_tokens=N))
  assert np.all(np.diff(got) <= 1e-7), got
  assert got.min() >= 1e-6 and got.max() <= 1.0
  # Fully masked at the start (up to 1/N for exp), almost nothing at the end.
  assert got[0] >= 1 - 1 / N - 1e-6
  assert got[-1] == pytest.approx(1e-6, abs=1e-6)


def test_concave_vs_convex_ordering_at_midpoint():
  """The paper's families: concave schedules mask more than linear mid-way."""
  at = lambda m: float(schedules.mask_ratio(0.5, m, num_tokens=N))
  assert at("exp") > at("cubic") > at("square") > at("cosine") > at("linear")
  assert at("linear") > at("sqrt") and at("linear") > at("log")


def test_scalar_input_and_per_example_num_tokens():
  assert float(schedules.mask_ratio(0.0)) == 1.0
  got = schedules.mask_ratio(0.5, "log", num_tokens=np.array([4.0, 256.0]))
  np.testing.assert_allclose(got, [0.5, 1 / 8], rtol=1e-6)


@pytest.mark.parametrize("bad", ["cosin", "pow", "powx", "pow-1", "", "LINEAR"])
def test_unknown_name_lists_valid_ones(bad):
  with pytest.raises(ValueError) as err:
    schedules.mask_ratio(0.5, bad)
  message = str(err.value)
  assert repr(bad) in message
  for name in ("cosine", "linear", "square", "cubic", "sqrt", "log", "exp",
               "pow<k>", "arccos"):
    assert name in message


@pytest.mark.parametrize("method", ["log", "exp"])
def test_log_and_exp_need_num_tokens(method):
  with pytest.raises(ValueError, match="num_tokens"):
    schedules.mask_ratio(0.5, method)
