"""Parity with the official MaskGIT modules on small checkpoints.

tests/fixtures/official holds a tokenizer and a transformer checkpoint
written by the official code (google-research/maskgit, run outside this
repository), with its outputs on fixed inputs in reference_outputs.npz.
"""

import os

import flax
import numpy as np
import pytest

from maskgit_jax import official
from maskgit_jax import Pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "official")
TOKENIZER = os.path.join(FIXTURES, "tokenizer.msgpack")
TRANSFORMER = os.path.join(FIXTURES, "transformer.msgpack")
CODEBOOK = 32


@pytest.fixture(scope="module")
def reference():
  with np.load(os.path.join(FIXTURES, "reference_outputs.npz"),
               allow_pickle=False) as data:
    return dict(data)


@pytest.fixture(scope="module")
def pipe():
  return Pipeline.from_official(tokenizer=TOKENIZER, transformer=TRANSFORMER)


def relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_sizes_are_inferred_from_the_trees(pipe):
  assert pipe.tokenizer.filters == 32
  assert tuple(pipe.tokenizer.channel_multipliers) == (1, 1, 2)
  assert pipe.tokenizer.num_res_blocks == 1
  assert pipe.tokenizer.embedding_dim == 8
  assert pipe.codebook_size == CODEBOOK and pipe.num_classes == 10
  t = pipe.transformer
  assert (t.num_layers, t.hidden_size, t.num_heads, t.mlp_dim) == (2, 32, 4, 64)
  assert pipe.token_shape == (8, 8)


def test_logits_match_official(pipe, reference):
  tokens = reference["tokens"]
  ours = pipe.logits(tokens[:, 1:], tokens[:, 0] - CODEBOOK)
  theirs = reference["logits"][:, 1:, :CODEBOOK]
  assert ours.shape == theirs.shape and ours.dtype == np.float32
  assert relative_error(ours, theirs) < 1e-4


def test_tokenize_and_detokenize_match_official(pipe, reference):
  np.testing.assert_array_equal(pipe.tokenize(reference["images"]),
                                reference["indices"])
  ours = pipe.detokenize(reference["indices"])
  # detokenize returns displayable images: the official output, clipped.
  theirs = np.clip(reference["reconstructions"], 0.0, 1.0)
  assert relative_error(ours, theirs) < 1e-4


def test_generate_from_official_weights(pipe):
  images = pipe.generate([0, 9], seed=0, num_iter=4)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def rewrite(tmp_path, path, edit):
  tree = flax.serialization.msgpack_restore(open(path, "rb").read())
  edit(tree["params"])
  out = tmp_path / os.path.basename(path)
  out.write_bytes(flax.serialization.msgpack_serialize(tree))
  return str(out)


def test_not_a_msgpack_file(tmp_path):
  bad = tmp_path / "weights.ckpt"
  bad.write_bytes(b"\x80\x04not msgpack at all" * 10)
  with pytest.raises(official.OfficialCheckpointError, match="weights.ckpt"):
    Pipeline.from_official(tokenizer=str(bad), transformer=TRANSFORMER)


def test_missing_parameter_is_named(tmp_path):
  def drop(params):
    del params["MlmLayer_0"]["mlm_ln"]
  path = rewrite(tmp_path, TRANSFORMER, drop)
  with pytest.raises(official.OfficialCheckpointError,
                     match="MlmLayer_0/mlm_ln"):
    Pipeline.from_official(tokenizer=TOKENIZER, transformer=path)


def test_extra_parameter_is_named(tmp_path):
  def add(params):
    params["encoder"]["Dense_9"] = {"kernel": np.zeros((2, 2), np.float32)}
  path = rewrite(tmp_path, TOKENIZER, add)
  with pytest.raises(official.OfficialCheckpointError,
                     match="encoder/Dense_9/kernel"):
    Pipeline.from_official(tokenizer=path, transformer=TRANSFORMER)


def test_codebook_sizes_that_disagree(tmp_path):
  def grow(params):
    params["quantizer"]["codebook"] = np.zeros((64, 8), np.float32)
  path = rewrite(tmp_path, TOKENIZER, grow)
  with pytest.raises(official.OfficialCheckpointError, match="belong"):
    Pipeline.from_official(tokenizer=path, transformer=TRANSFORMER)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(out, tokenizer workdir, transformer workdir) of one import, which the
  tests below only read (or copy)."""
  from maskgit_jax.tools import import_official
  out = str(tmp_path_factory.mktemp("imported") / "out")
  return (out, *import_official.import_official(TOKENIZER, TRANSFORMER, out))


@pytest.mark.slow
def test_import_tool_writes_workdirs_that_sample_the_same(imported, pipe):
  from maskgit_jax.tools import import_official
  out, k_dir, t_dir = imported
  assert (k_dir, t_dir) == (os.path.join(out, "tokenizer"),
                            os.path.join(out, "transformer"))
  loaded = Pipeline.from_workdirs(k_dir, t_dir)
  np.testing.assert_array_equal(loaded.generate([1, 2], seed=3, num_iter=4),
                                pipe.generate([1, 2], seed=3, num_iter=4))
  with pytest.raises(FileExistsError):
    import_official.import_official(TOKENIZER, TRANSFORMER, out)


def test_edit_regenerates_only_the_box(pipe, reference):
  from maskgit_jax.editing import box_mask
  images = reference["images"]
  mask = box_mask((32, 32), 8, 8, 8, 8)
  edited = pipe.edit(images, mask, [3, 7], seed=1, num_iter=6, start_iter=2)
  assert edited.shape == (2, 32, 32, 3) and edited.dtype == np.uint8
  original = np.round(images * 255).astype(np.uint8)
  # Far from the blurred box the original pixels come back unchanged.
  np.testing.assert_array_equal(edited[:, 26:], original[:, 26:])
  assert np.abs(edited[:, 8:16, 8:16].astype(int) -
                original[:, 8:16, 8:16]).mean() > 1
  raw = pipe.edit(images, mask, [3, 7], seed=1, num_iter=6, blend=False)
  assert raw.shape == edited.shape
  with pytest.raises(ValueError, match="start_iter"):
    pipe.edit(images, mask, [3, 7], num_iter=6, start_iter=6)


def test_token_mask_and_outpainting_canvas(pipe):
  from maskgit_jax.editing import box_mask, extend_canvas
  cells = pipe.token_mask(box_mask((32, 32), 4, 4, 2, 2)[None], dilate=0)
  assert cells.sum() == 1 and cells[0, 1, 1]
  # By default edit grows the box by one token each way, as the demo does.
  assert pipe.token_mask(box_mask((32, 32), 4, 4, 2, 2)[None]).sum() == 9
  images = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
  canvas, mask = extend_canvas(images, 8, "right")
  np.testing.assert_array_equal(canvas[:, :, :24], images[:, :, 8:])
  assert mask[:, :, 24:].all() and not mask[:, :, :24].any()
  out = pipe.edit(canvas, mask, [5], num_iter=4, start_iter=0)
  np.testing.assert_array_equal(
      out[:, :, :8], np.round(canvas[:, :, :8] * 255).astype(np.uint8))


def test_classifier_free_guidance(pipe, reference):
  import jax
  import jax.numpy as jnp
  from maskgit_jax import pipeline
  from maskgit_jax import sampling
  tokens = jnp.asarray(reference["tokens"])
  # Jitted: one program each rather than every op compiled on its own.
  apply = jax.jit(lambda t: pipe.transformer.apply(
      {"params": pipe.transformer_params}, t)[..., :CODEBOOK])
  cond, uncond = apply(tokens), apply(tokens.at[:, 0].set(-1))
  logits_fn = lambda t: pipeline.image_logits(
      pipe.transformer, pipe.transformer_params, t)
  guided = jax.jit(sampling.guided(logits_fn, 2.0, "constant", 4))(
      tokens, jnp.int32(0))
  np.testing.assert_allclose(guided, cond + 2.0 * (cond - uncond),
                             rtol=1e-5, atol=1e-5)
  # The released weights have no unconditional model: guidance is refused.
  assert not pipe.has_unconditional
  with pytest.raises(ValueError, match="label dropout"):
    pipe.generate([1, 2], num_iter=4, guidance_scale=3.0)
  # The same weights declared unconditional run both schedules.
  declared = Pipeline(pipe.tokenizer, pipe.tokenizer_params, pipe.transformer,
                      pipe.transformer_params, token_shape=pipe.token_shape,
                      has_unconditional=True)
  constant = declared.generate([1, 2], seed=0, num_iter=4, guidance_scale=3.0)
  rising = declared.generate([1, 2], seed=0, num_iter=4, guidance_scale=3.0,
                             guidance_schedule="linear")
  assert constant.shape == rising.shape
  with pytest.raises(ValueError, match="guidance_schedule"):
    declared.generate([1], guidance_scale=1.0, guidance_schedule="step")


@pytest.mark.slow
def test_imported_workdirs_evaluate_and_fine_tune(imported, tmp_path):
  """Official weights as workdirs: eval, tokenize, then train on from step 0."""
  import gzip
  import shutil
  from maskgit_jax.train import jobs
  from maskgit_jax import workdir as workdir_lib
  # A copy: this test writes into both workdirs.
  k_dir, t_dir = str(tmp_path / "tokenizer"), str(tmp_path / "transformer")
  shutil.copytree(imported[1], k_dir)
  shutil.copytree(imported[2], t_dir)
  source_dir = tmp_path / "idx"
  source_dir.mkdir()
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 20), ("t10k", 10)):
    for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
      array = (rng.integers(0, 255, shape) if kind.startswith("images")
               else np.arange(n) % 10).astype(np.uint8)
      header = bytes([0, 0, 8, array.ndim]) + b"".join(
          int(d).to_bytes(4, "big") for d in array.shape)
      with gzip.open(source_dir / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
        f.write(header + array.tobytes())

  k_config = workdir_lib.Workdir(k_dir).load_config()
  k_config.data.update(name="fashion_mnist", source_dir=str(source_dir),
                       data_dir=str(tmp_path / "tfds"), eval_split="test",
                       image_size=32)
  k_config.update(batch_size=8, eval_batch_size=8, num_eval_images=8)
  k_config.eval.feature_network = "none"  # no Inception weights here
  scalars = jobs.run("eval", k_config, k_dir)
  assert np.isfinite(scalars["psnr"]) and np.isfinite(scalars["lpips"])
  assert scalars["num_images"] == 10 and 0 < scalars["codebook_usage"] <= 1
  jobs.run("tokenize", k_config, k_dir)

  t_config = workdir_lib.Workdir(t_dir).load_config()
  assert t_config.tokenizer_workdir == imported[1]
  t_config.tokenizer_workdir = k_dir  # the copy, with its token cache
  t_config.update(batch_size=8, num_train_steps=2, log_every_steps=1,
                  checkpoint_every_steps=2, eval_every_steps=2)
  jobs.run("train", t_config, t_dir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(t_dir, "checkpoints"))
                 if s.isdigit())
  assert steps == [0, 2]  # the imported weights, then two fine-tuning steps
  tuned = Pipeline.from_workdirs(k_dir, t_dir)
  assert tuned.generate([1, 2], seed=3, num_iter=4).shape == (2, 32, 32, 3)
