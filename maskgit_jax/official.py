"""Import of the released MaskGIT checkpoints (google-research/maskgit).

The official checkpoints are flax msgpack files of
{"params": tree}, with flax's automatic module names (Encoder's `Conv_0`,
`ResBlock_3`, the transformer's `TransformerLayer_7`, ...). This module reads
them with `flax.serialization.msgpack_restore` (plain data, no pickle),
infers every size from the array shapes, and renames the arrays onto our
modules; nothing is recomputed, so our forward pass equals the official one.

Mapping, by creation order in the official modules:
  tokenizer  Encoder: Conv_0 = conv_in, ResBlock_k = level l res i (k =
             l * blocks + i), then the middle blocks, GroupNorm_0 = norm_out,
             last Conv = conv_out (Conv_1..Conv_{L-1} are the 4x4
             downsampling convs when conv_downsample is set).
             Decoder: Conv_0 = conv_in, middle blocks first, then levels
             from the top; Conv_1..Conv_{L-1} the upsampling convs, the
             last Conv = conv_out.
             ResBlock: GroupNorm_0/Conv_0/GroupNorm_1/Conv_1 = norm1/conv1/
             norm2/conv2, Conv_2 = the shortcut.
  transformer Embed_0 word/position embeddings and embeddings_ln,
             TransformerLayer_i/Attention_0/self_attention query/key/value
             (stacked into our fused QKV) and out, attention_output_ln,
             Mlp_0 intermediate_output/layer_output/layer_output_ln,
             MlmLayer_0 mlm_dense/mlm_ln/mlm_bias.
"""

import os
import re
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib

Tree = Dict[str, Any]


class OfficialCheckpointError(ValueError):
  pass


def load_msgpack(path: str) -> Tree:
  """The parameter tree of an official (flax msgpack) checkpoint file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as error:  # msgpack raises several unrelated types.
    raise OfficialCheckpointError(
        f"{path!r} is not a flax msgpack checkpoint ({type(error).__name__}: "
        f"{error}). Expected the files linked from google-research/maskgit, "
        "e.g. maskgit_imagenet256_checkpoint.") from None
  if not isinstance(tree, dict):
    raise OfficialCheckpointError(
        f"{path!r} holds a {type(tree).__name__}, not a parameter tree.")
  return tree.get("params", tree)


class _Reader:
  """Hands out arrays by path and remembers which ones were used."""

  def __init__(self, tree: Tree, what: str):
    self.flat = {"/".join(k): np.asarray(v) for k, v in
                 flax.traverse_util.flatten_dict(tree).items()}
    self.used = set()
    self.what = what

  def has(self, path: str) -> bool:
    return any(k == path or k.startswith(path + "/") for k in self.flat)

  def get(self, path: str) -> np.ndarray:
    if path not in self.flat:
      raise OfficialCheckpointError(
          f"The {self.what} checkpoint is missing parameter {path!r}.")
    self.used.add(path)
    return self.flat[path]

  def subtree(self, path: str) -> Tree:
    keys = [k for k in self.flat if k.startswith(path + "/")]
    if not keys:
      raise OfficialCheckpointError(
          f"The {self.what} checkpoint is missing parameters {path!r}/*.")
    return {k[len(path) + 1:]: self.get(k) for k in keys}

  def count(self, prefix: str, pattern: str) -> int:
    names = {k[len(prefix):].split("/")[0] for k in self.flat
             if k.startswith(prefix)}
    return sum(bool(re.fullmatch(pattern, n)) for n in names)

  def check_all_used(self) -> None:
    extra = sorted(set(self.flat) - self.used)
    if extra:
      raise OfficialCheckpointError(
          f"The {self.what} checkpoint has parameters this model does not "
          f"use: {extra[:10]}{' ...' if len(extra) > 10 else ''}.")


def _unflatten(flat: Dict[str, np.ndarray]) -> Tree:
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def _res_block(reader: _Reader, path: str) -> Tree:
  block = {"norm1": reader.subtree(f"{path}/GroupNorm_0"),
           "conv1": reader.subtree(f"{path}/Conv_0"),
           "norm2": reader.subtree(f"{path}/GroupNorm_1"),
           "conv2": reader.subtree(f"{path}/Conv_1")}
  if reader.has(f"{path}/Conv_2"):
    block["shortcut"] = reader.subtree(f"{path}/Conv_2")
  return {f"{name}/{k}": v for name, sub in block.items()
          for k, v in sub.items()}


def _prefixed(prefix: str, tree: Dict[str, np.ndarray]) -> Dict[str, Any]:
  return {f"{prefix}/{k}": v for k, v in tree.items()}


def tokenizer_from_tree(tree: Tree) -> Tuple[vqgan_lib.VQGAN, Tree]:
  """(VQGAN with the official checkpoint's sizes, its parameters)."""
  r = _Reader(tree, "tokenizer")
  enc_convs = r.count("encoder/", r"Conv_\d+")
  dec_convs = r.count("decoder/", r"Conv_\d+")
  num_levels = dec_convs - 1
  if num_levels < 1 or not r.has("quantizer/codebook"):
    raise OfficialCheckpointError(
        "Not an official MaskGIT tokenizer tree: expected encoder/, decoder/ "
        f"and quantizer/codebook, got top-level keys {sorted(tree)}.")
  conv_downsample = enc_convs > 2
  enc_blocks = r.count("encoder/", r"ResBlock_\d+")
  if enc_blocks % (num_levels + 1):
    raise OfficialCheckpointError(
        f"The encoder has {enc_blocks} residual blocks, not a multiple of "
        f"{num_levels + 1} levels.")
  blocks = enc_blocks // (num_levels + 1)
  filters = r.get("encoder/Conv_0/kernel").shape[-1]
  multipliers = tuple(
      r.get(f"encoder/ResBlock_{level * blocks}/Conv_1/kernel").shape[-1] //
      filters for level in range(num_levels))
  codebook = r.get("quantizer/codebook")

  flat = {"quantizer/codebook": codebook}
  flat.update(_prefixed("encoder/conv_in", r.subtree("encoder/Conv_0")))
  k = 0
  for level in range(num_levels):
    for i in range(blocks):
      flat.update(_prefixed(f"encoder/level{level}_res{i}",
                            _res_block(r, f"encoder/ResBlock_{k}")))
      k += 1
    if conv_downsample and level < num_levels - 1:
      flat.update(_prefixed(f"encoder/level{level}_downsample",
                            r.subtree(f"encoder/Conv_{level + 1}")))
  for i in range(blocks):
    flat.update(_prefixed(f"encoder/mid_res{i}",
                          _res_block(r, f"encoder/ResBlock_{k}")))
    k += 1
  flat.update(_prefixed("encoder/norm_out", r.subtree("encoder/GroupNorm_0")))
  flat.update(_prefixed("encoder/conv_out",
                        r.subtree(f"encoder/Conv_{enc_convs - 1}")))

  flat.update(_prefixed("decoder/conv_in", r.subtree("decoder/Conv_0")))
  k = 0
  for i in range(blocks):
    flat.update(_prefixed(f"decoder/mid_res{i}",
                          _res_block(r, f"decoder/ResBlock_{k}")))
    k += 1
  conv = 1
  for level in reversed(range(num_levels)):
    for i in range(blocks):
      flat.update(_prefixed(f"decoder/level{level}_res{i}",
                            _res_block(r, f"decoder/ResBlock_{k}")))
      k += 1
    if level > 0:
      flat.update(_prefixed(f"decoder/level{level}_upsample_conv",
                            r.subtree(f"decoder/Conv_{conv}")))
      conv += 1
  flat.update(_prefixed("decoder/norm_out", r.subtree("decoder/GroupNorm_0")))
  flat.update(_prefixed("decoder/conv_out",
                        r.subtree(f"decoder/Conv_{conv}")))
  r.check_all_used()

  model = vqgan_lib.VQGAN(
      filters=filters, channel_multipliers=multipliers,
      num_res_blocks=blocks, embedding_dim=codebook.shape[1],
      codebook_size=codebook.shape[0], conv_downsample=conv_downsample,
      image_channels=r.get("decoder/Conv_%d/kernel" % conv).shape[-1])
  params = _unflatten(flat)
  size = 8 * model.downsample_factor
  _check_shapes(model, params, jnp.zeros((1, size, size,
                                          model.image_channels)), "tokenizer")
  return model, params


def transformer_from_tree(tree: Tree, codebook_size: int
                          ) -> Tuple[transformer_lib.MaskGITTransformer, Tree]:
  """(MaskGITTransformer with the checkpoint's sizes, its parameters).

  The vocabulary is codebook_size + num_classes + 1, so the tokenizer's
  codebook size fixes the number of classes.
  """
  r = _Reader(tree, "transformer")
  if not r.has("Embed_0/word_embeddings/embedding"):
    raise OfficialCheckpointError(
        "Not an official MaskGIT transformer tree: expected "
        f"Embed_0/word_embeddings, got top-level keys {sorted(tree)}.")
  words = r.get("Embed_0/word_embeddings/embedding")
  positions = r.get("Embed_0/position_embeddings/embedding")
  vocab, hidden = words.shape
  num_classes = vocab - codebook_size - 1
  if num_classes < 0:
    raise OfficialCheckpointError(
        f"The transformer's vocabulary ({vocab}) is smaller than the "
        f"tokenizer's codebook_size + 1 ({codebook_size + 1}): the two "
        "checkpoints do not belong together.")
  num_layers = r.count("", r"TransformerLayer_\d+")
  flat = {"token_embedding": words, "position_embedding": positions}
  flat.update(_prefixed("embedding_ln", r.subtree("Embed_0/embeddings_ln")))
  heads = mlp = None
  for i in range(num_layers):
    base = f"TransformerLayer_{i}"
    attention = f"{base}/Attention_0/self_attention"
    kernels = [r.get(f"{attention}/{n}/kernel") for n in ("query", "key",
                                                          "value")]
    heads = kernels[0].shape[1]
    flat[f"layer_{i}/attention/qkv_kernel"] = np.stack(kernels, axis=1)
    flat[f"layer_{i}/attention/qkv_bias"] = np.stack(
        [r.get(f"{attention}/{n}/bias") for n in ("query", "key", "value")])
    flat[f"layer_{i}/attention/out_kernel"] = r.get(f"{attention}/out/kernel")
    flat[f"layer_{i}/attention/out_bias"] = r.get(f"{attention}/out/bias")
    flat.update(_prefixed(f"layer_{i}/attention_ln", r.subtree(
        f"{base}/Attention_0/attention_output_ln")))
    mlp = r.get(f"{base}/Mlp_0/intermediate_output/kernel").shape[1]
    flat.update(_prefixed(f"layer_{i}/mlp_in",
                          r.subtree(f"{base}/Mlp_0/intermediate_output")))
    flat.update(_prefixed(f"layer_{i}/mlp_out",
                          r.subtree(f"{base}/Mlp_0/layer_output")))
    flat.update(_prefixed(f"layer_{i}/mlp_ln",
                          r.subtree(f"{base}/Mlp_0/layer_output_ln")))
  flat.update(_prefixed("head_dense", r.subtree("MlmLayer_0/mlm_dense")))
  flat.update(_prefixed("head_ln", r.subtree("MlmLayer_0/mlm_ln")))
  flat["head_bias"] = r.get("MlmLayer_0/mlm_bias/bias")
  r.check_all_used()
  if num_layers == 0:
    raise OfficialCheckpointError("The transformer checkpoint has no layers.")

  model = transformer_lib.MaskGITTransformer(
      codebook_size=codebook_size, num_classes=num_classes,
      num_tokens=positions.shape[0] - 1, hidden_size=hidden,
      num_layers=num_layers, num_heads=heads, mlp_dim=mlp)
  params = _unflatten(flat)
  _check_shapes(model, params, jnp.zeros((1, model.seq_len), jnp.int32),
                "transformer")
  return model, params


def _check_shapes(model, params: Tree, example, what: str) -> None:
  expected = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
  want = {"/".join(k): v.shape for k, v in
          flax.traverse_util.flatten_dict(expected).items()}
  got = {"/".join(k): v.shape for k, v in
         flax.traverse_util.flatten_dict(params).items()}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    raise OfficialCheckpointError(
        f"The {what} checkpoint does not fit the inferred model: missing "
        f"{missing[:5]}, unexpected {extra[:5]}, wrong shapes "
        f"{[(k, got[k], want[k]) for k in wrong[:5]]}.")


def load_official(tokenizer_path: str, transformer_path: str):
  """(tokenizer, tokenizer params, transformer, transformer params)."""
  tokenizer, k_params = tokenizer_from_tree(load_msgpack(tokenizer_path))
  transformer, t_params = transformer_from_tree(
      load_msgpack(transformer_path), tokenizer.codebook_size)
  return tokenizer, k_params, transformer, t_params
