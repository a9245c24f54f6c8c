"""Input data: TFDS sources (Fashion-MNIST idx, image folders, catalogue),
grain image pipelines and the stage-2 token cache."""
