import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import initialize
from maskgit_jax.models import discriminator as disc_lib
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(module, *inputs, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs,
                                            **kwargs))["params"]


def jit_init(module, *inputs, seed=0):
  """module.init as one compiled program: run eagerly, each of its ops
  compiles on its own (seconds for a tiny VQGAN)."""
  return initialize(lambda key: module.init(key, *inputs), seed)


def jit_apply(module, variables, *inputs, **kwargs):
  """module.apply as one compiled program; `kwargs` are fixed at trace."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *inputs)


# --- transformer -----------------------------------------------------------

def tiny_transformer(**overrides):
  kwargs = dict(codebook_size=16, num_classes=3, num_tokens=8, hidden_size=32,
                num_layers=2, num_heads=4, mlp_dim=64)
  kwargs.update(overrides)
  return transformer_lib.MaskGITTransformer(**kwargs)


def bert_parameter_count(vocab, seq, hidden, layers, mlp):
  embeddings = vocab * hidden + seq * hidden + 2 * hidden
  attention = 4 * (hidden * hidden + hidden) + 2 * hidden
  feed_forward = 2 * hidden * mlp + mlp + hidden + 2 * hidden
  head = hidden * hidden + hidden + 2 * hidden + vocab
  return embeddings + layers * (attention + feed_forward) + head


def test_official_imagenet256_transformer_size():
  model = transformer_lib.MaskGITTransformer(
      codebook_size=1024, num_classes=1000, num_tokens=256)
  params = abstract_params(model, jnp.zeros((1, 257), jnp.int32))
  assert model.vocab_size == 2025
  assert count(params) == bert_parameter_count(2025, 257, 768, 24, 3072)
  assert 172e6 < count(params) < 173e6
  layer = params["layer_0"]["attention"]
  assert layer["qkv_kernel"].shape == (768, 3, 16, 48)
  assert layer["out_kernel"].shape == (16, 48, 768)


def test_transformer_logits_shape_and_dtype():
  model = tiny_transformer()
  tokens = jnp.full((2, 9), -1, jnp.int32).at[:, 0].set(16 + 2)
  params = jit_init(model, tokens)
  logits = jit_apply(model, params, tokens)
  assert logits.shape == (2, 9, 16 + 3 + 1) and logits.dtype == jnp.float32


def test_codes_only_returns_the_image_code_logits():
  model = tiny_transformer()
  tokens = jnp.array([[16, -1, 3, -1, 5, -1, -1, 0, 15]] * 2, jnp.int32)
  params = jit_init(model, tokens)
  full = jit_apply(model, params, tokens)
  codes = jit_apply(model, params, tokens, codes_only=True)
  assert codes.shape == (2, 9, 16)
  np.testing.assert_allclose(codes, full[..., :16], rtol=1e-6, atol=1e-6)


def test_mask_id_minus_one_is_the_last_embedding_row():
  model = tiny_transformer()
  tokens = jnp.array([[17, -1, 3, -1, 5, 0, -1, 2, 1]], jnp.int32)
  params = jit_init(model, tokens)
  explicit = jnp.where(tokens == -1, model.vocab_size - 1, tokens)
  np.testing.assert_array_equal(jit_apply(model, params, tokens),
                                jit_apply(model, params, explicit))


def test_output_head_is_tied_to_token_embedding():
  model = tiny_transformer()
  tokens = jnp.zeros((1, 9), jnp.int32)
  params = jit_init(model, tokens)["params"]
  assert set(params) >= {"token_embedding", "position_embedding", "head_bias"}
  assert "head_kernel" not in params and "embedding_ln" in params
  perturbed = jax.tree.map(lambda x: x, params)
  perturbed["token_embedding"] = params["token_embedding"].at[7].add(1.0)
  a = jit_apply(model, {"params": params}, tokens)
  b = jit_apply(model, {"params": perturbed}, tokens)
  # Token 7 is not in the input, so only its output logit can change.
  changed = np.any(np.asarray(a != b), axis=(0, 1))
  assert changed.tolist() == [i == 7 for i in range(model.vocab_size)]


def test_bidirectional_every_position_sees_every_other():
  model = tiny_transformer()
  tokens = jnp.zeros((1, 9), jnp.int32)
  params = jit_init(model, tokens)
  a = jit_apply(model, params, tokens)
  b = jit_apply(model, params, tokens.at[0, 8].set(4))
  assert np.all(np.any(np.asarray(a[0, :8] != b[0, :8]), axis=-1))


def textbook_attention(params, x, num_heads):
  """softmax(q k^T / sqrt(d)) v per head, from SelfAttention's parameters."""
  qkv = jnp.einsum("bsh,hcnd->cbnsd", x, params["qkv_kernel"])
  qkv = qkv + params["qkv_bias"][:, None, :, None, :]
  q, k, v = qkv
  weights = jax.nn.softmax(
      jnp.einsum("bnqd,bnkd->bnqk", q, k) / math.sqrt(q.shape[-1]), axis=-1)
  context = jnp.einsum("bnqk,bnkd->bnqd", weights, v)
  return jnp.einsum("bnsd,ndh->bsh", context,
                    params["out_kernel"]) + params["out_bias"]


@pytest.mark.parametrize("length", [9, 257])  # 257: in query blocks
def test_attention_and_its_gradients_are_textbook_softmax_attention(length):
  """The fused attention (row-max shift without a gradient, division after
  the value matmul, query blocks) computes softmax attention, and so do its
  gradients with respect to the input and every parameter."""
  module = transformer_lib.SelfAttention(num_heads=4)
  x = jax.random.normal(jax.random.key(0), (2, length, 32)) * 3.0
  params = initialize(lambda key: module.init(key, x, True))["params"]
  np.testing.assert_allclose(
      jit_apply(module, {"params": params}, x, deterministic=True),
      textbook_attention(params, x, 4), rtol=1e-5, atol=1e-5)
  probe = jax.random.normal(jax.random.key(1), (2, length, 32))
  ours = jax.jit(jax.grad(lambda p, x: jnp.sum(probe * module.apply(
      {"params": p}, x, True)), argnums=(0, 1)))(params, x)
  want = jax.grad(lambda p, x: jnp.sum(
      probe * textbook_attention(p, x, 4)), argnums=(0, 1))(params, x)
  for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want),
                           strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("length, backend, blocks", [
    (257, "cpu", [(0, 1), (1, 257)]),       # class token + 16x16 tokens
    (401, "cpu", [(0, 145), (145, 401)]),
    (512, "cpu", [(0, 256), (256, 512)]),
    (256, "cpu", [(0, 256)]),
    (65, "cpu", [(0, 65)]),
    (1025, "cpu", [(0, 1025)]),
    (257, "gpu", [(0, 257)]),
    (257, "tpu", [(0, 257)])])
def test_query_blocks(length, backend, blocks):
  assert transformer_lib.query_blocks(length, backend) == blocks


def test_attention_in_query_blocks_drops_what_the_whole_attention_drops(
    monkeypatch):
  """With dropout, attention in query blocks gives the outputs and
  gradients of the same attention over all rows at once: each block
  takes its own rows of one dropout mask."""
  module = transformer_lib.SelfAttention(num_heads=2, dropout_rate=0.3)
  x = jax.random.normal(jax.random.key(0), (1, 257, 16))
  params = initialize(lambda key: module.init(key, x, True))["params"]
  rngs = {"dropout": jax.random.key(2)}

  def train_output_and_gradient():
    run = lambda p, x: module.apply({"params": p}, x, False, rngs=rngs)
    return jax.jit(run)(params, x), jax.jit(jax.grad(
        lambda p, x: jnp.sum(jnp.sin(run(p, x))), argnums=(0, 1)))(params, x)

  assert len(transformer_lib.query_blocks(257)) == 2
  blocked = train_output_and_gradient()
  monkeypatch.setattr(transformer_lib, "query_blocks",
                      lambda length, backend=None: [(0, length)])
  whole = train_output_and_gradient()
  undropped = jit_apply(module, {"params": params}, x, deterministic=True)
  assert (np.max(np.abs(blocked[0] - undropped))
          > 0.1 * np.max(np.abs(undropped)))
  for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(want))))


def test_dropout_only_in_training_and_bfloat16_compute():
  model = tiny_transformer(dtype=jnp.bfloat16)
  tokens = jnp.zeros((2, 9), jnp.int32)
  params = jit_init(model, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  eval_logits = jit_apply(model, params, tokens)
  assert eval_logits.dtype == jnp.float32
  np.testing.assert_array_equal(eval_logits, jit_apply(model, params, tokens))
  train_logits = jit_apply(model, params, tokens, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train_logits, eval_logits)
  f32 = jit_apply(tiny_transformer(), params, tokens)
  np.testing.assert_allclose(eval_logits, f32, atol=0.1, rtol=0.05)


def test_wrong_sequence_length_is_rejected():
  model = tiny_transformer()
  with pytest.raises(ValueError, match="9 tokens"):
    jit_init(model, jnp.zeros((1, 8), jnp.int32))


def test_with_class_token():
  tokens = transformer_lib.with_class_token(
      jnp.full((2, 4), -1), jnp.array([0, 2]), codebook_size=16)
  assert tokens.tolist() == [[16, -1, -1, -1, -1], [18, -1, -1, -1, -1]]


# --- tokenizer -------------------------------------------------------------

def tiny_vqgan(**overrides):
  kwargs = dict(filters=8, channel_multipliers=(1, 2), num_res_blocks=1,
                embedding_dim=4, codebook_size=32, num_groups=4)
  kwargs.update(overrides)
  return vqgan_lib.VQGAN(**kwargs)


def test_official_imagenet256_tokenizer_shapes():
  model = vqgan_lib.VQGAN()
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  indices = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x,
                               method=model.encode_to_indices), params, images)
  assert indices.shape == (1, 16, 16) and indices.dtype == jnp.int32
  assert params["quantizer"]["codebook"].shape == (1024, 256)
  # No attention anywhere: only convolutions, norms and the codebook.
  names = {k for path, _ in jax.tree_util.tree_leaves_with_path(params)
           for k in map(str, path)}
  assert not any("attn" in n or "attention" in n for n in names)
  assert 40e6 < count(params) < 80e6


def vqgan_parameter_count(filters, mults, blocks, emb, codebook, channels=3):
  def res(cin, cout):
    n = 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
    return n + (cout * cout if cin != cout else 0)  # quirky shortcut on h
  enc = 9 * channels * filters
  c = filters
  for m in mults:
    for _ in range(blocks):
      enc += res(c, filters * m)
      c = filters * m
  enc += blocks * res(c, c) + 2 * c + c * emb + emb
  c = filters * mults[-1]
  dec = 9 * emb * c + c + blocks * res(c, c)
  for level in reversed(range(len(mults))):
    for _ in range(blocks):
      dec += res(c, filters * mults[level])
      c = filters * mults[level]
    if level > 0:
      dec += 9 * c * c + c
  dec += 2 * c + 9 * c * channels + channels
  return enc + dec + codebook * emb


def test_tokenizer_parameter_count_matches_architecture():
  model = tiny_vqgan(channel_multipliers=(1, 2, 2), num_res_blocks=2)
  params = abstract_params(model, jnp.zeros((1, 16, 16, 3)))
  assert count(params) == vqgan_parameter_count(8, (1, 2, 2), 2, 4, 32)


def test_tokenizer_round_trip_shapes_and_losses():
  model = tiny_vqgan()
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  variables = jit_init(model, images)
  recon, indices, losses = jit_apply(model, variables, images, train=True)
  assert recon.shape == images.shape and indices.shape == (2, 8, 8)
  assert set(losses) == {"commitment_loss", "codebook_loss", "entropy_loss",
                         "quantizer_loss"}
  total = sum(v for k, v in losses.items() if k != "quantizer_loss")
  np.testing.assert_allclose(losses["quantizer_loss"], total, rtol=1e-5)
  from_indices = jit_apply(model, variables, indices,
                             method=model.decode_from_indices)
  np.testing.assert_allclose(from_indices, recon, atol=1e-5)
  encoded = jit_apply(model, variables, images, method=model.encode_to_indices)
  np.testing.assert_array_equal(encoded, indices)


def test_indices_are_nearest_codebook_entries():
  model = tiny_vqgan()
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  variables = jit_init(model, images)
  latents = jit_apply(model, variables, images,
                        method=lambda m, x: m.encoder(x))
  codebook = variables["params"]["quantizer"]["codebook"]
  d = ((np.asarray(latents)[..., None, :] - np.asarray(codebook)) ** 2).sum(-1)
  indices = jit_apply(model, variables, images, method=model.encode_to_indices)
  np.testing.assert_array_equal(indices, d.argmin(-1))


def test_straight_through_gradient_reaches_the_encoder():
  model = tiny_vqgan()
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  params = jit_init(model, images)["params"]

  def loss(p):
    recon, _, losses = model.apply({"params": p}, images, train=True)
    return jnp.mean((recon - images) ** 2) + losses["quantizer_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  for part in ("encoder", "decoder", "quantizer"):
    assert float(sum(jnp.abs(g).sum() for g in
                     jax.tree.leaves(grads[part]))) > 0, part


@pytest.mark.parametrize("train", [False, True])
def test_tokenizer_in_streams_is_the_whole_batch_call(train):
  """Slicing the encoder and decoder leaves every output and gradient as
  the plain call's, the batch statistic of the entropy loss included."""
  model = tiny_vqgan()
  images = jax.random.uniform(jax.random.key(2), (8, 16, 16, 3))
  params = jit_init(model, images)["params"]

  def loss(p, streamed):
    recon, _, losses = (
        vqgan_lib.apply_in_streams(model, p, images, train, num_streams=4)
        if streamed else model.apply({"params": p}, images, train=train))
    return jnp.mean((recon - images) ** 2) + sum(losses.values(), 0.0)

  want = jax.jit(lambda p: model.apply({"params": p}, images, train=train))(
      params)
  got = jax.jit(lambda p: vqgan_lib.apply_in_streams(
      model, p, images, train, num_streams=4))(params)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_array_equal(got[1], want[1])
  assert got[2].keys() == want[2].keys()
  for key in want[2]:
    np.testing.assert_allclose(got[2][key], want[2][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  if train:
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    for g, w in zip(jax.tree.leaves(grad(params, True)),
                    jax.tree.leaves(grad(params, False))):
      scale = float(jnp.max(jnp.abs(w)))
      np.testing.assert_allclose(g, w, atol=1e-3 * scale + 1e-8)


def test_shortcut_projects_the_block_output():
  """The official quirk: out = h + conv1x1(h) when channels change."""
  block = vqgan_lib.ResBlock(filters=8, num_groups=4)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  variables = jit_init(block, x, seed=1)
  out = jit_apply(block, variables, x)
  p = variables["params"]
  no_shortcut = dict(p, shortcut={"kernel": jnp.zeros_like(
      p["shortcut"]["kernel"])})
  h = jit_apply(block, {"params": no_shortcut}, x)
  kernel = p["shortcut"]["kernel"][0, 0]
  np.testing.assert_allclose(out, h + h @ kernel, atol=1e-5)


@pytest.mark.parametrize("height, width", [(4, 4), (5, 7)])
def test_upsample_conv_equals_conv_of_the_upsampled_input(height, width):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2, height, width, 6))
  module = vqgan_lib.UpsampleConv(5)
  params = jit_init(module, x, seed=1)
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
      params)  # a non-zero bias too
  expected = jit_apply(nn.Conv(5, (3, 3)), params,
                       vqgan_lib.upsample_nearest_2x(x))
  got = jit_apply(module, params, x)
  assert got.shape == (2, 2 * height, 2 * width, 5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_average_pool_and_upsample():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  pooled = vqgan_lib.average_pool_2x2(x)
  np.testing.assert_allclose(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  odd = vqgan_lib.average_pool_2x2(jnp.ones((1, 3, 3, 1)))
  np.testing.assert_allclose(odd, jnp.ones((1, 2, 2, 1)))
  up = vqgan_lib.upsample_nearest_2x(pooled)
  np.testing.assert_allclose(up[0, :2, :2, 0], [[2.5, 2.5], [2.5, 2.5]])
  assert up.shape == (1, 4, 4, 1)


# --- discriminator ---------------------------------------------------------

def test_discriminator_shapes_and_stylegan_widths():
  model = disc_lib.Discriminator(image_size=256)
  params = abstract_params(model, jnp.zeros((1, 256, 256, 3)))
  assert params["conv_in"]["kernel"].shape == (3, 3, 3, 64)
  assert params["block_128"]["conv2"]["kernel"].shape == (3, 3, 64, 128)
  assert params["block_4"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
  assert params["dense"]["kernel"].shape == (4 * 4 * 512, 512)
  small = disc_lib.Discriminator(image_size=32, max_filters=32)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  variables = jit_init(small, x, seed=1)
  logits = jit_apply(small, variables, x)
  assert logits.shape == (3, 1) and logits.dtype == jnp.float32
  # Examples are independent (no batch statistics), as R1 requires.
  other = jit_apply(small, variables, x.at[1:].set(0.0))
  np.testing.assert_allclose(other[0], logits[0], rtol=1e-5)


def test_blur_downsample_preserves_constants():
  out = disc_lib.blur_downsample(jnp.ones((1, 8, 8, 2)))
  assert out.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(out[0, 1:3, 1:3], 1.0, rtol=1e-6)


@pytest.mark.parametrize("size", [6, 48, 4])
def test_discriminator_rejects_bad_sizes(size):
  with pytest.raises(ValueError, match="power of two"):
    disc_lib.Discriminator(image_size=size).init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)))
