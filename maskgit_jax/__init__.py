"""maskgit_jax: train and sample MaskGIT (arXiv 2202.04200) in JAX/Flax."""

__version__ = "0.1.0"

from maskgit_jax.pipeline import Pipeline  # noqa: E402  (the notebook API)
