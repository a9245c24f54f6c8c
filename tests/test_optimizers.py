"""Optimizers from config: which parameters weight decay reaches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskgit_jax.models.transformer import MaskGITTransformer
from maskgit_jax.train import optimizers


def transformer_params():
  model = MaskGITTransformer(codebook_size=16, num_classes=3, num_tokens=4,
                             hidden_size=8, num_layers=1, num_heads=2,
                             mlp_dim=16)
  # Jitted: run eagerly, init compiles each of its ops on its own.
  return jax.jit(model.init)(jax.random.key(0),
                             jnp.zeros((1, 5), jnp.int32))["params"]


def flat(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_takes_matrices_and_kernels_not_biases_or_norms():
  mask = flat(optimizers.decay_mask(transformer_params()))
  decayed = sorted(name for name, on in mask.items() if on)
  assert decayed == sorted([
      "layer_0/attention/qkv_kernel", "layer_0/attention/out_kernel",
      "layer_0/mlp_in/kernel", "layer_0/mlp_out/kernel", "head_dense/kernel",
      "token_embedding", "position_embedding"]), decayed
  # The fused QKV bias has 3 dims and is still a bias.
  assert not mask["layer_0/attention/qkv_bias"]
  assert mask["layer_0/attention/qkv_bias"] is False


def test_adamw_leaves_undecayed_parameters_alone():
  """With zero gradients only weight decay moves parameters."""
  params = transformer_params()
  params = jax.tree.map(lambda p: p + 1.0, params)  # biases non-zero too
  opt = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=0.1, b1=0.9, b2=0.99, weight_decay=0.5,
      warmup_steps=0, schedule="constant", grad_clip_norm=0.0))
  tx = optimizers.create_optimizer(opt, num_train_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zeros,
                                                                 params)
  moved = {name: bool(np.any(np.asarray(u) != 0))
           for name, u in flat(updates).items()}
  mask = flat(optimizers.decay_mask(params))
  assert moved == {name: bool(on) for name, on in mask.items()}
