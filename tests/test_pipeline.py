"""Pipeline: shared compiled programs, guidance safety, editing geometry."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from maskgit_jax import editing
from maskgit_jax import pipeline
from maskgit_jax import Pipeline


@pytest.fixture(scope="module")
def pipes():
  """Two pipelines of one architecture with different random weights."""
  return Pipeline.random(seed=0), Pipeline.random(seed=1)


def test_equal_modules_share_one_compiled_program(pipes):
  a, b = pipes
  assert a.transformer == b.transformer and a.tokenizer == b.tokenizer
  fn = pipeline.sample_images
  before = fn._cache_size()
  first = a.generate([0, 1], seed=0, num_iter=4)
  compiled = fn._cache_size()
  assert compiled - before <= 1  # 0 when another test compiled it already
  second = b.generate([0, 1], seed=0, num_iter=4)
  assert fn._cache_size() == compiled
  assert not np.array_equal(first, second)  # the parameters do differ
  np.testing.assert_array_equal(first, a.generate([0, 1], seed=0, num_iter=4))


def test_tokenize_detokenize_logits_share_programs(pipes):
  a, b = pipes
  images = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  tokens = np.full((2, a.transformer.num_tokens), -1, np.int32)
  outputs = []
  for pipe in (a, b):
    indices = pipe.tokenize(images)
    outputs.append((indices, pipe.detokenize(indices),
                    pipe.logits(tokens, [0, 1])))
    sizes = [f._cache_size() for f in (pipeline.tokenize_images,
                                       pipeline.detokenize_indices,
                                       pipeline.transformer_logits)]
  assert [f._cache_size() for f in (pipeline.tokenize_images,
                                    pipeline.detokenize_indices,
                                    pipeline.transformer_logits)] == sizes
  # Same modules, different weights: nothing was baked into the programs.
  assert not np.array_equal(outputs[0][2], outputs[1][2])
  assert not np.allclose(a.detokenize(outputs[0][0]),
                         b.detokenize(outputs[0][0]))


def test_tokenize_takes_uint8_and_refuses_float_pixels_out_of_range(pipes):
  pipe = pipes[0]
  pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
  np.testing.assert_array_equal(pipe.tokenize(pixels),
                                pipe.tokenize(pixels / np.float32(255)))
  with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
    pipe.tokenize(pixels.astype(np.float32))


def test_decode_options_are_hashable_and_validated(pipes):
  a, b = pipes
  one = a._options(4, "cosine", None, 0)
  assert one == b._options(4, "cosine", None, 0)
  assert hash(one) == hash(b._options(4, "cosine", None, 0))
  assert one != a._options(4, "cosine", "linear", 0)
  for kwargs, match in ((dict(num_iter=0), "num_iter"),
                        (dict(num_iter=4, start_iter=4), "start_iter"),
                        (dict(num_iter=4, mask_schedule="cosinus"), "cosinus"),
                        (dict(num_iter=4, guidance_schedule="step"), "step")):
    with pytest.raises(ValueError, match=match):
      pipeline.DecodeOptions(a.tokenizer, a.transformer, a.token_shape,
                             **kwargs)


def no_unconditional(pipe):
  return Pipeline(pipe.tokenizer, pipe.tokenizer_params, pipe.transformer,
                  pipe.transformer_params, token_shape=pipe.token_shape)


def test_guidance_needs_an_unconditional_model(pipes):
  a, _ = pipes
  assert a.has_unconditional  # random weights: every option can be tried
  plain = no_unconditional(a)
  assert not plain.has_unconditional
  images = np.zeros((1, 32, 32, 3), np.float32)
  mask = editing.box_mask((32, 32), 8, 8, 8, 8)
  sizes = (pipeline.sample_images._cache_size(),
           pipeline.tokenize_images._cache_size())
  with pytest.raises(ValueError, match=r"guidance_scale=2\.0 needs a "
                     r"transformer trained with label dropout.*"
                     r"--config\.label_dropout=0\.1.*guidance_scale=0"):
    plain.generate([0], num_iter=5, guidance_scale=2.0)
  with pytest.raises(ValueError, match="label dropout"):
    plain.edit(images, mask, [0], num_iter=5, guidance_scale=2.0)
  # Refused before anything compiled.
  assert (pipeline.sample_images._cache_size(),
          pipeline.tokenize_images._cache_size()) == sizes
  # Without guidance it samples as before; with it the random pipeline runs.
  assert plain.generate([0, 1], seed=0, num_iter=4).shape == (2, 32, 32, 3)
  guided = a.generate([0, 1], seed=0, num_iter=4, guidance_scale=2.0,
                      guidance_schedule="cosine")
  assert guided.shape == (2, 32, 32, 3)


def test_has_unconditional_must_be_a_bool(pipes):
  a, _ = pipes
  with pytest.raises(ValueError, match="has_unconditional"):
    Pipeline(a.tokenizer, a.tokenizer_params, a.transformer,
             a.transformer_params, token_shape=a.token_shape,
             has_unconditional="yes")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_iter=0), "num_iter must be a positive int, got 0"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(choice_temperature=-1.0), "choice_temperature must be .* >= 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be .* >= 0, got -1.0"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_schedule="step"), "guidance_schedule must be one of"),
    (dict(schedule="cosinus"), "cosinus"),
])
def test_bad_generate_arguments_are_named(pipes, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipes[0].generate([0, 1], **kwargs)


def test_bad_class_ids_are_named(pipes):
  a, _ = pipes
  with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
    a.generate([10])
  with pytest.raises(ValueError, match="integers"):
    a.generate([0.5])
  with pytest.raises(ValueError, match="at least one"):
    a.generate([])
  images = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="1 class ids for 2 images"):
    a.edit(images, editing.box_mask((32, 32), 0, 0, 8, 8), [3])


# --- editing -----------------------------------------------------------------


def test_token_mask_dilation_grows_a_box_and_stops_at_the_border():
  box = editing.box_mask((32, 32), 4, 4, 2, 2)[None]  # inside token (1, 1)
  cells = editing.token_mask(box, (8, 8))
  assert cells.sum() == 1 and cells[0, 1, 1]
  grown = editing.token_mask(box, (8, 8), dilate=1)
  assert grown[0, 0:3, 0:3].all() and grown.sum() == 9
  assert editing.token_mask(box, (8, 8), dilate=2).sum() == 16  # clipped
  with pytest.raises(ValueError, match="dilate must be an int >= 0, got -1"):
    editing.token_mask(box, (8, 8), dilate=-1)
  with pytest.raises(ValueError, match="does not tile"):
    editing.token_mask(np.zeros((1, 30, 32), bool), (8, 8))


def test_edit_dilates_by_one_token_by_default(pipes):
  a, _ = pipes
  assert a.token_mask(editing.box_mask((32, 32), 8, 8, 8, 8)[None]).sum() == 16
  images = np.random.default_rng(1).random((1, 32, 32, 3), np.float32)
  mask = editing.box_mask((32, 32), 8, 8, 8, 8)
  kwargs = dict(seed=2, num_iter=4, start_iter=1)
  default = a.edit(images, mask, [1], **kwargs)
  np.testing.assert_array_equal(default,
                                a.edit(images, mask, [1], dilate=1, **kwargs))
  assert not np.array_equal(default,
                            a.edit(images, mask, [1], dilate=0, **kwargs))
  # Outside the grown box (tokens 1..4, pixels 4..19) and its blur the
  # original comes back unchanged.
  original = np.round(images * 255).astype(np.uint8)
  weight = editing.soft_mask(a.token_mask(mask[None]), (32, 32))
  assert weight[0, 6:18, 6:18].min() > 0.9 and not weight[0, 23:].any()
  np.testing.assert_array_equal(default[weight == 0], original[weight == 0])


def pil_blur(cells, size, radius):
  image = Image.fromarray(cells.astype(np.uint8) * 255).resize(
      (size, size), Image.NEAREST)
  return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)),
                    np.float32) / 255.0


@pytest.mark.parametrize("size,radius", [(256, 15), (512, 31), (32, 1),
                                         (16, 0), (8, 0)])
def test_blur_radius_scales_with_the_image_as_the_official_demo(size, radius):
  assert editing.default_blur_radius(size) == radius
  cells = np.array([[[True, False], [False, False]]])
  soft = editing.soft_mask(cells, (size, size))
  assert soft.shape == (1, size, size) and soft.dtype == np.float32
  np.testing.assert_array_equal(soft[0], pil_blur(cells[0], size, radius))
  if size == 512:  # not the patch-size radius (15) used before
    assert not np.array_equal(soft[0], pil_blur(cells[0], size, 15))


def test_soft_mask_radius_override_and_bad_radius():
  cells = np.array([[[True, False], [False, False]]])
  np.testing.assert_array_equal(
      editing.soft_mask(cells, (256, 256), blur_radius=4)[0],
      pil_blur(cells[0], 256, 4))
  with pytest.raises(ValueError, match="blur_radius must be an int >= 0"):
    editing.soft_mask(cells, (256, 256), blur_radius=-2)


def test_edit_blur_radius_default_and_override(pipes):
  a, _ = pipes
  images = np.random.default_rng(3).random((1, 32, 32, 3), np.float32)
  mask = editing.box_mask((32, 32), 8, 8, 8, 8)
  kwargs = dict(seed=0, num_iter=4, start_iter=1)
  default = a.edit(images, mask, [2], **kwargs)
  np.testing.assert_array_equal(
      default, a.edit(images, mask, [2], blur_radius=1, **kwargs))
  assert not np.array_equal(
      default, a.edit(images, mask, [2], blur_radius=3, **kwargs))
  with pytest.raises(ValueError, match="blur_radius"):
    a.edit(images, mask, [2], blur_radius=-1, **kwargs)


def test_box_mask_and_extend_canvas():
  mask = editing.box_mask((8, 10), 2, 3, 4, 5)
  assert mask.shape == (8, 10) and mask.sum() == 20 and mask[2, 3]
  with pytest.raises(ValueError, match="inside"):
    editing.box_mask((8, 10), 9, 0, 1, 1)
  with pytest.raises(ValueError, match="height must be an int >= 1"):
    editing.box_mask((8, 10), 0, 0, 0, 1)
  images = np.random.default_rng(0).random((1, 8, 8, 3), np.float32)
  for side, strip in (("right", np.s_[:, :, 6:]), ("left", np.s_[:, :, :2]),
                      ("bottom", np.s_[:, 6:]), ("top", np.s_[:, :2])):
    canvas, new = editing.extend_canvas(images, 2, side)
    assert new[strip].all() and new.sum() == 16
    assert (canvas[new] == 0).all()
  canvas, _ = editing.extend_canvas(images, 2, "top")
  np.testing.assert_array_equal(canvas[:, 2:], images[:, :6])
  with pytest.raises(ValueError, match="side must be one of"):
    editing.extend_canvas(images, 2, "up")
  with pytest.raises(ValueError, match=r"pixels must be in \(0, 8\)"):
    editing.extend_canvas(images, 8)


def test_old_import_paths_still_work():
  assert pipeline.box_mask is editing.box_mask
  assert pipeline.extend_canvas is editing.extend_canvas
