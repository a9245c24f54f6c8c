"""Every shipped config loads and validates; bad combinations are refused
before anything is built."""

import os

import pytest

from maskgit_jax import config_base
from maskgit_jax.train import jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py"))


def load(name, arg=""):
  return config_base.from_file(os.path.join(REPO, "configs", name), arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
  jobs.validate(load(name))


def test_guidance_without_label_dropout_is_refused():
  config = load("maskgit_fashion_mnist.py")
  config.sampling.guidance_scale = 2.0
  jobs.validate(config)  # trained with label dropout: fine
  config.label_dropout = 0.0
  with pytest.raises(ValueError, match=r"guidance_scale=2\.0.*label_dropout"):
    jobs.validate(config)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_dropout_out_of_range_is_refused(value):
  config = load("maskgit_fashion_mnist.py")
  config.label_dropout = value
  with pytest.raises(ValueError, match="label_dropout"):
    jobs.validate(config)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_sampling_temperature_must_be_positive(value):
  config = load("maskgit_fashion_mnist.py")
  config.sampling.temperature = value
  with pytest.raises(ValueError, match=r"sampling\.temperature="):
    jobs.validate(config)


def test_codebook_usage_window_must_be_positive():
  config = load("vqgan_fashion_mnist.py")
  config.codebook_usage_window = 0
  with pytest.raises(ValueError, match="codebook_usage_window"):
    jobs.validate(config)
