"""maskgit_jax: train and sample MaskGIT (arXiv 2202.04200) in JAX/Flax.

Importing the package is light (configs import it): `Pipeline`, the
notebook API, loads JAX and the models on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "Pipeline":
    from maskgit_jax.pipeline import Pipeline
    return Pipeline
  raise AttributeError(f"module 'maskgit_jax' has no attribute {name!r}")
