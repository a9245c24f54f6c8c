"""Bidirectional transformer for masked visual token modeling (BERT form).

Structure of the official MaskGIT transformer, so its checkpoints map onto
this module by renaming and stacking arrays (no numerical change):

  token + position embedding -> LayerNorm -> dropout
  L x [self-attention -> dropout -> add -> LayerNorm,
       Dense -> GELU(tanh) -> Dense -> dropout -> add -> LayerNorm]   (post-LN)
  Dense -> GELU(tanh) -> LayerNorm -> logits = h @ token_embedding.T + bias

All LayerNorms use epsilon 1e-12 (BERT). Sequence layout: position 0 holds
the class token (codebook_size + label), positions 1..N the image tokens, and
`mask_token_id` (-1) the unknown ones. Id -1 selects the last embedding row,
exactly as indexing the official embedding with -1 does, so the vocabulary is
codebook_size + num_classes + 1 with the mask token last. The unconditional
input for classifier-free guidance puts the mask token in the class slot.

Attention is written heads-first with one fused QKV projection: on XLA:CPU
that layout runs its matmuls on all cores (flax's MultiHeadDotProductAttention
as the official model uses it ran them on one); the parameters keep the
official shapes ([H, heads, head_dim] per projection, stacked on axis 1).
"""

from typing import Any, Callable, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskgit_jax.models.dropout import Dropout

LAYERNORM_EPSILON = 1e-12
MASK_TOKEN_ID = -1

Dtype = Any


def truncated_normal(stddev: float) -> Callable:
  """BERT's initializer: normal truncated at two standard deviations."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * stddev
  return init


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """GELU with the tanh approximation, as BERT and the official model use."""
  return jax.nn.gelu(x, approximate=True)


# XLA:CPU fuses each head's scores, softmax and weighted sum into one
# kernel. With more than 256 query rows it slowed down sharply: over 257-450
# positions (2 CPU cores, head size 32) the same attention ran 1.2-2.3x
# faster in blocks of at most 256 query rows (8 x 257: 11.4 -> 5.6 ms);
# with 513 or more positions blocks gained nothing (benchmarks/RESULTS.md).
MAX_QUERY_ROWS = 256
MAX_BLOCKED_LENGTH = 512


def query_blocks(length: int, backend: Optional[str] = None
                 ) -> List[Tuple[int, int]]:
  """[start, stop) ranges of query rows that attention computes apart: on
  CPU, for sequences of MAX_QUERY_ROWS to MAX_BLOCKED_LENGTH positions,
  a short leading block (MaskGIT's class token and any remainder) and then
  blocks of MAX_QUERY_ROWS; elsewhere all rows at once."""
  if ((backend or jax.default_backend()) != "cpu"
      or not MAX_QUERY_ROWS < length <= MAX_BLOCKED_LENGTH):
    return [(0, length)]
  starts = list(range(length % MAX_QUERY_ROWS or MAX_QUERY_ROWS, length,
                      MAX_QUERY_ROWS))
  return list(zip([0] + starts, starts + [length]))


def attend(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
           keep: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """softmax(query key^T) value per example and head, [B, heads, rows, D],
  with the attention weights multiplied by `keep` (dropout's mask) if given.

  The division by the softmax's sum comes after the value matmul: the same
  numbers up to rounding, with rows * D divisions instead of rows * S, and
  dropout commutes with it. The shift by the row maximum only keeps exp in
  range: the result does not depend on it, so no gradient flows through it
  (the backward pass skips the maximum's compare-and-select over the
  scores).
  """
  logits = jnp.einsum("bnqd,bnkd->bnqk", query, key).astype(jnp.float32)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalized = jnp.exp(logits - shift)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  if keep is not None:
    unnormalized = unnormalized * keep
  return jnp.einsum("bnqk,bnkd->bnqd", unnormalized.astype(value.dtype),
                    value) / total.astype(value.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with fused QKV, computed heads-first."""
  num_heads: int
  dropout_rate: float = 0.0
  kernel_init: Callable = truncated_normal(0.02)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(f"hidden size {hidden} is not divisible by num_heads="
                       f"{self.num_heads}.")
    head_dim = hidden // self.num_heads
    qkv_kernel = self.param("qkv_kernel", self.kernel_init,
                            (hidden, 3, self.num_heads, head_dim))
    qkv_bias = self.param("qkv_bias", nn.initializers.zeros,
                          (3, self.num_heads, head_dim))
    out_kernel = self.param("out_kernel", self.kernel_init,
                            (self.num_heads, head_dim, hidden))
    out_bias = self.param("out_bias", nn.initializers.zeros, (hidden,))
    x, qkv_kernel, qkv_bias, out_kernel, out_bias = nn.dtypes.promote_dtype(
        x, qkv_kernel, qkv_bias, out_kernel, out_bias, dtype=self.dtype)

    # One GEMM for Q, K and V over all positions, then heads-first
    # [3, B, heads, S, head_dim], so each (example, head) is one contiguous
    # matrix and the attention matmuls are plain batched GEMMs.
    batch, length, _ = x.shape
    qkv = x.reshape(batch * length, hidden) @ qkv_kernel.reshape(hidden, -1)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim) + qkv_bias
    query, key, value = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    keep = Dropout(self.dropout_rate).keep_scale(
        (batch, self.num_heads, length, length), deterministic)
    context = jnp.concatenate([
        attend(query[:, :, start:stop], key, value,
               None if keep is None else keep[:, :, start:stop])
        for start, stop in query_blocks(length)], axis=2)
    context = jnp.transpose(context, (0, 2, 1, 3)).reshape(
        batch * length, hidden)
    out = context @ out_kernel.reshape(hidden, hidden) + out_bias
    return out.reshape(batch, length, hidden)


class TransformerLayer(nn.Module):
  """Post-LN encoder layer: attention and MLP, each added then normalised."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  kernel_init: Callable
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    hidden = x.shape[-1]
    layer_norm = lambda name: nn.LayerNorm(
        epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name=name)
    dense = lambda features, name: nn.Dense(
        features, kernel_init=self.kernel_init, dtype=self.dtype, name=name)

    attended = SelfAttention(self.num_heads, self.attention_dropout_rate,
                             self.kernel_init, self.dtype,
                             name="attention")(x, deterministic)
    attended = Dropout(self.dropout_rate)(attended, deterministic)
    x = layer_norm("attention_ln")(attended + x)

    h = gelu(dense(self.mlp_dim, "mlp_in")(x))
    h = dense(hidden, "mlp_out")(h)
    h = Dropout(self.dropout_rate)(h, deterministic)
    return layer_norm("mlp_ln")(h + x)


class MaskGITTransformer(nn.Module):
  """Class-conditional bidirectional transformer over image tokens.

  Input: int tokens [B, 1 + num_tokens] (class token first, -1 = mask).
  Output: float32 logits [B, 1 + num_tokens, vocab_size]; image codes are the
  first `codebook_size` entries of the last axis, and `codes_only=True`
  returns just those.
  """
  codebook_size: int
  num_classes: int
  num_tokens: int
  hidden_size: int = 768
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 3072
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32

  @property
  def vocab_size(self) -> int:
    """Image codes, then one id per class, then the mask token."""
    return self.codebook_size + self.num_classes + 1

  @property
  def seq_len(self) -> int:
    return self.num_tokens + 1

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, deterministic: bool = True,
               codes_only: bool = False) -> jnp.ndarray:
    if tokens.shape[-1] != self.seq_len:
      raise ValueError(
          f"expected {self.seq_len} tokens per example (class token + "
          f"{self.num_tokens} image tokens), got shape {tokens.shape}.")
    init = truncated_normal(self.initializer_range)
    token_embedding = self.param("token_embedding", init,
                                 (self.vocab_size, self.hidden_size))
    position_embedding = self.param("position_embedding", init,
                                    (self.seq_len, self.hidden_size))
    # Negative ids index from the end, as in the official model: -1 -> mask.
    tokens = tokens.astype(jnp.int32)
    ids = jnp.where(tokens < 0, tokens + self.vocab_size, tokens)
    x = jnp.take(token_embedding, ids, axis=0) + position_embedding
    x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype,
                     name="embedding_ln")(x)
    x = Dropout(self.dropout_rate)(x, deterministic)

    for i in range(self.num_layers):
      x = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout_rate,
                           self.attention_dropout_rate, init, self.dtype,
                           name=f"layer_{i}")(x, deterministic)

    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype,
                 name="head_dense")(x)
    h = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype,
                     name="head_ln")(gelu(h))
    head_bias = self.param("head_bias", nn.initializers.zeros,
                           (self.vocab_size,))
    if codes_only:  # Sampling needs only these: half the head's work.
      token_embedding = token_embedding[:self.codebook_size]
      head_bias = head_bias[:self.codebook_size]
    logits = jnp.einsum("bsx,vx->bsv", h,
                        token_embedding.astype(self.dtype))
    return logits.astype(jnp.float32) + head_bias


def class_token(labels: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
  """The class token id of each label: codebook_size + label."""
  return jnp.asarray(labels, jnp.int32) + codebook_size


def with_class_token(image_tokens: jnp.ndarray, labels: jnp.ndarray,
                     codebook_size: int) -> jnp.ndarray:
  """Prepends the class token: [B, N] + [B] -> [B, 1 + N]."""
  cls = class_token(labels, codebook_size)[:, None]
  return jnp.concatenate([cls, image_tokens.astype(jnp.int32)], axis=1)
