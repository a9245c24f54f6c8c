"""Mask schedules gamma(r): the fraction of tokens still masked at progress r.

gamma is decreasing on [0, 1] with gamma(0) = 1 and gamma(1) ~ 0. Training
draws r ~ U[0, 1) and masks ceil(gamma(r) * N) tokens; decoding iteration t of
T keeps floor(N0 * gamma((t + 1) / T)) tokens masked. The paper (Sec. 3.3,
Fig. 3) compares concave (cosine, square, cubic, exp, pow<k> with k > 1),
linear and convex (sqrt, log) schedules; `arccos` (2 arccos(r) / pi) is a
later variant used by open re-implementations.
`exp` and `log` follow the official code, scaled by log2 of the token count.
"""

import math
from typing import Optional, Union

import jax.numpy as jnp

ArrayLike = Union[float, jnp.ndarray]

# Every value is clipped into [MIN_RATIO, 1], as the official implementation
# does, so that gamma never reaches exactly zero before the last step.
MIN_RATIO = 1e-6

_FIXED = {
    "cosine": lambda r: jnp.cos(0.5 * math.pi * r),
    "arccos": lambda r: jnp.arccos(r) / (0.5 * math.pi),
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r**2,
    "cubic": lambda r: 1.0 - r**3,
    "sqrt": lambda r: 1.0 - jnp.sqrt(r),
}
# `uniform` is the official code's name for the linear schedule.
_ALIASES = {"uniform": "linear"}
_NEEDS_NUM_TOKENS = ("log", "exp")

VALID_METHODS = tuple(_FIXED) + _NEEDS_NUM_TOKENS + ("pow<k>",) + tuple(_ALIASES)


def _pow_exponent(method: str) -> Optional[float]:
  """Returns k for a `pow<k>` name, None for any other name."""
  if not method.startswith("pow"):
    return None
  try:
    exponent = float(method[3:])
  except ValueError:
    return None
  if not math.isfinite(exponent) or exponent <= 0:
    return None
  return exponent


def validate(method: str) -> str:
  """Raises ValueError unless `method` names a schedule; returns it."""
  if not isinstance(method, str) or (
      method not in _FIXED and method not in _ALIASES and
      method not in _NEEDS_NUM_TOKENS and _pow_exponent(method) is None):
    raise ValueError(
        f"Unknown mask schedule {method!r}; valid schedules are "
        f"{', '.join(VALID_METHODS)} (pow<k> with a positive number k, "
        "e.g. 'pow2.5').")
  return method


def mask_ratio(r: ArrayLike, method: str = "cosine",
               num_tokens: Optional[ArrayLike] = None) -> jnp.ndarray:
  """Returns gamma(r) in [1e-6, 1] for progress r in [0, 1].

  Args:
    r: progress, a scalar or array with values in [0, 1].
    method: one of `VALID_METHODS`; `pow<k>` means 1 - r**k.
    num_tokens: number of maskable tokens N, scalar or per-example array;
      required by `log` (-log2(r) / log2(N)) and `exp`
      (1 - 2**(-log2(N) * (1 - r))), ignored by the others.
  """
  validate(method)
  method = _ALIASES.get(method, method)
  r = jnp.asarray(r, jnp.float32)
  if method in _FIXED:
    ratio = _FIXED[method](r)
  elif method in _NEEDS_NUM_TOKENS:
    if num_tokens is None:
      raise ValueError(
          f"Mask schedule {method!r} needs num_tokens (the number of "
          "maskable tokens N), got None.")
    log2_n = jnp.log2(jnp.asarray(num_tokens, jnp.float32))
    if method == "log":
      ratio = -jnp.log2(r) / log2_n
    else:
      ratio = 1.0 - jnp.exp2(-log2_n * (1.0 - r))
  else:
    ratio = 1.0 - r**_pow_exponent(method)
  return jnp.clip(ratio, MIN_RATIO, 1.0)
