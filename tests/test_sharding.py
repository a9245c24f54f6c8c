"""Logical-axis sharding rules (maskgit_jax/sharding.py): every parameter is
named, the default rules give FSDP on `fsdp` and tensor parallelism on
`model`, and a step on such a mesh is the data-parallel step.

On the 8 fake CPU devices of conftest.py. The tiny configs' arrays are all
below the 2**14-element threshold, so the step tests shard everything
(min_size=1) to exercise the layouts. The tokenizer's GAN step on an fsdp
mesh is tested against its single-device step in test_tokenizer_stage.py.
"""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import garment_batch, initialize, leaf, load_config
from maskgit_jax import parallel
from maskgit_jax import sharding
from maskgit_jax.train import tokenizer_stage
from maskgit_jax.train import transformer_stage

CODEBOOK, TOKENS = 16, 16  # the tiny transformer's token grid


def transformer_setup():
  """(config, init_state, train_step, batch) of the tiny transformer, with
  a learning rate from the first step on (no warm-up)."""
  config = load_config("maskgit_fashion_mnist")
  config.optimizer.update(warmup_steps=0, schedule="constant")
  init_fn, step_fn, _ = transformer_stage.step_functions(config, CODEBOOK,
                                                         TOKENS)
  labels = np.arange(config.batch_size, dtype=np.int32) % 10
  tokens = (labels[:, None] * 3 + np.arange(TOKENS)[None, :]**2) % CODEBOOK
  return config, init_fn, step_fn, {"tokens": tokens.astype(np.int32),
                                    "label": labels}


def tokenizer_setup():
  """The tiny tokenizer with the GAN (and R1) on from step 0, no LPIPS."""
  config = load_config("vqgan_fashion_mnist")
  config.losses.update(perceptual_weight=0.0, discriminator_start_step=0)
  init_fn, step_fn, _ = tokenizer_stage.step_functions(config)
  batch = garment_batch(config.batch_size)
  batch["label"] = np.zeros(config.batch_size, np.int32)
  return config, init_fn, step_fn, batch


def abstract_state(init_fn):
  return jax.eval_shape(init_fn, jax.random.key(0))


def run_step(init_fn, step_fn, batch, mesh_sizes, rules, min_size=1,
             state=None):
  """(initial state, new state, metrics) of one step on a mesh, from `state`
  (default: init_fn's, compiled as the training loop compiles it)."""
  mesh = parallel.create_mesh(mesh_sizes)
  state = initialize(init_fn) if state is None else state
  shardings = sharding.state_shardings(state, mesh, rules, min_size=min_size)
  step = jax.jit(step_fn, in_shardings=(shardings,
                                        parallel.batch_sharding(mesh),
                                        parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  with jax.set_mesh(mesh):
    new_state, metrics = step(jax.device_put(state, shardings),
                              parallel.global_batch(batch, mesh), None)
  return state, new_state, jax.device_get(metrics)


def assert_same_step(before, a, b, a_metrics, b_metrics, keys, lr):
  """Two steps from one state agree: metrics and Adam's moments (which hold
  the gradients) to float tolerance; parameters to well within one update
  (about lr * sign(g) on the first step, which noise can flip where g ~ 0).
  """
  # On the host: a device array's `x - y` would compile a kernel per shape.
  before, a, b = jax.device_get((before, a, b))
  for key in keys:
    np.testing.assert_allclose(a_metrics[key], b_metrics[key], rtol=1e-5,
                               atol=1e-7, err_msg=key)
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y) + 1e-12
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, atol=0.1 * lr)
  moved = max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree.leaves(a.params), jax.tree.leaves(before.params)))
  assert moved > 0.5 * lr  # the step did update the parameters


def test_jit_init_gives_the_state_jax_jit_gives():
  """The faster-compiled initialiser draws the same parameters."""
  _, init_fn, _, _ = transformer_setup()
  fast = initialize(init_fn)
  plain = jax.jit(init_fn)(jax.random.key(0))
  fast, plain = jax.tree.leaves(fast.params), jax.tree.leaves(plain.params)
  assert len(fast) == len(plain) > 0
  for x, y in zip(fast, plain):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- the names


@pytest.mark.parametrize("setup", [transformer_setup, tokenizer_setup])
def test_every_parameter_gets_one_name_per_dimension(setup):
  state = abstract_state(setup()[1])
  params = ({"generator": state["generator"].params,
             "discriminator": state["discriminator"].params}
            if isinstance(state, dict) else state.params)
  named = sharding.logical_axes(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(named) == len(leaves) > 5
  for path, x in leaves:
    names = named[sharding.path_string(path)]
    assert len(names) == x.ndim and set(names) <= sharding.LOGICAL_AXES


def test_names_follow_the_modules():
  params = abstract_state(transformer_setup()[1]).params
  named = sharding.logical_axes(params)
  assert named["layer_0/attention/qkv_kernel"] == ("embed", "qkv", "heads",
                                                   "kv")
  assert named["layer_0/attention/out_kernel"] == ("heads", "kv", "embed")
  assert named["layer_0/mlp_in/kernel"] == ("embed", "mlp")
  assert named["layer_0/mlp_out/kernel"] == ("mlp", "embed")
  assert named["token_embedding"] == ("vocab", "embed")
  assert named["layer_0/mlp_ln/scale"] == ("norm",)
  state = abstract_state(tokenizer_setup()[1])
  named = sharding.logical_axes(state["generator"].params)
  assert named["quantizer/codebook"] == ("codes", "code_dim")
  assert named["encoder/conv_in/kernel"] == sharding.CONV_AXES
  assert named["encoder/level0_res0/norm1/scale"] == ("norm",)
  named = sharding.logical_axes(state["discriminator"].params)
  assert named["dense/kernel"] == ("dense_in", "dense_out")


def test_an_unknown_parameter_is_an_error():
  with pytest.raises(ValueError, match=r"'layer_0/new_thing' of shape "
                                       r"\(4, 4\).*PARAM_AXES"):
    sharding.logical_axes({"layer_0": {"new_thing": np.zeros((4, 4))}})


# ------------------------------------------------------------- the rules


def test_official_sizes_shard_over_fsdp_as_fsdp_sharding_did():
  """On fsdp = 8 the default rules give the former `fsdp_sharding` layout
  for every leaf of both ImageNet states (so nothing moves), and on
  data = 8 everything is replicated."""
  for name, step_functions in (
      ("maskgit_imagenet256",
       lambda c: transformer_stage.step_functions(c, 1024, 256)),
      ("vqgan_imagenet256", tokenizer_stage.step_functions)):
    config = load_config(name, "")
    state = abstract_state(step_functions(config)[0])
    mesh = parallel.create_mesh({"fsdp": 8})
    new = sharding.state_shardings(state, mesh, config.sharding_rules)
    old = parallel.fsdp_sharding(state, mesh)
    specs = [(a.spec, b.spec) for a, b in zip(jax.tree.leaves(new),
                                              jax.tree.leaves(old))]
    assert all(a == b for a, b in specs)
    assert sum(a != P() for a, _ in specs) > 10
    mesh = parallel.create_mesh({"data": 8})
    assert all(s.spec == P() for s in jax.tree.leaves(
        sharding.state_shardings(state, mesh, config.sharding_rules)))


def test_rules_choose_by_size_fall_back_and_skip_absent_axes():
  rules = load_config("maskgit_fashion_mnist").sharding_rules
  spec = lambda names, shape, mesh: sharding.partition_spec(
      names, shape, mesh, rules, min_size=1)
  # MLP kernel: `mlp` to `model`, `embed` to `fsdp`; without `model` the
  # larger `mlp` falls back to `fsdp` and `embed` stays whole.
  assert spec(("embed", "mlp"), (8, 32), {"fsdp": 2, "model": 2}) == P(
      "fsdp", "model")
  assert spec(("embed", "mlp"), (8, 32), {"data": 4, "fsdp": 2}) == P(
      None, "fsdp")
  assert spec(("embed", "mlp"), (8, 32), {"data": 8}) == P()
  # A [hidden, hidden] matrix: one mesh axis splits one dimension.
  assert spec(("embed", "embed"), (8, 8), {"fsdp": 2}) == P("fsdp", None)
  # Small arrays stay replicated by default.
  assert sharding.partition_spec(("embed", "mlp"), (8, 32), {"fsdp": 2},
                                 rules) == P()


def test_an_indivisible_dimension_is_replicated_with_one_log_line(
    monkeypatch, caplog):
  monkeypatch.setattr(sharding, "_logged_names", set())
  rules = (("vocab", "fsdp"), ("embed", "fsdp"))
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      assert sharding.partition_spec(("vocab", "embed"), (27, 16),
                                     {"fsdp": 2}, rules, 1) == P(None, "fsdp")
      assert sharding.partition_spec(("vocab",), (27,), {"fsdp": 2}, rules,
                                     1) == P()
  logged = [r.getMessage() for r in caplog.records if "'vocab'" in
            r.getMessage()]
  assert len(logged) == 1 and "not divisible" in logged[0], logged


def test_a_mesh_axis_no_rule_uses_is_an_error():
  _, init_fn, _, _ = tokenizer_setup()
  state = abstract_state(init_fn)
  rules = load_config("vqgan_fashion_mnist").sharding_rules
  mesh = parallel.create_mesh({"data": 4, "model": 2})
  with pytest.raises(ValueError, match=r"Mesh axis 'model' has size 2.*"
                                       r"Rules: heads->'model', "
                                       r"mlp->'model'.*conv_in"):
    sharding.state_shardings(state, mesh, rules)
  # fsdp with rules that never name it: an error too, not silent DP.
  transformer_state = abstract_state(transformer_setup()[1])
  with pytest.raises(ValueError, match=r"Mesh axis 'fsdp'"):
    sharding.state_shardings(transformer_state,
                             parallel.create_mesh({"data": 4, "fsdp": 2}),
                             (("heads", "model"),))


@pytest.mark.parametrize("rules, message", [
    ((("embed", "fdsp"),), r"unknown mesh axis 'fdsp'"),
    ((("emebd", "fsdp"),), r"unknown logical axis 'emebd'"),
    ((("embed",),), r"not a \(logical axis, mesh axis or None\) pair"),
])
def test_bad_rules_are_errors(rules, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_rules(rules)


def test_rules_read_back_from_json_work():
  """A workdir's config.json holds lists: same layout as the tuples."""
  rules = load_config("maskgit_fashion_mnist").sharding_rules
  as_lists = [list(rule) for rule in rules]
  mesh = {"fsdp": 2, "model": 2}
  names, shape = ("embed", "qkv", "heads", "kv"), (16, 3, 2, 8)
  assert sharding.partition_spec(names, shape, mesh, as_lists, 1) == (
      sharding.partition_spec(names, shape, mesh, rules, 1))


# ------------------------------------------------------------- the steps


@pytest.fixture(scope="module")
def transformer_baseline():
  """The tiny transformer's step on 8 data-parallel devices."""
  config, init_fn, step_fn, batch = transformer_setup()
  return run_step(init_fn, step_fn, batch, {"data": 8},
                  config.sharding_rules)


@pytest.mark.parametrize("mesh_sizes, qkv, mlp_in", [
    ({"data": 4, "fsdp": 2}, P("fsdp", None, None, None), P(None, "fsdp")),
    ({"data": 4, "model": 2}, P(None, None, "model", None), P(None, "model")),
    ({"data": 2, "fsdp": 2, "model": 2}, P("fsdp", None, "model", None),
     P("fsdp", "model")),
])
def test_transformer_step_on_fsdp_and_tensor_parallel_meshes(
    transformer_baseline, mesh_sizes, qkv, mlp_in):
  config, init_fn, step_fn, batch = transformer_setup()
  _, state, metrics = run_step(init_fn, step_fn, batch, mesh_sizes,
                               config.sharding_rules)
  for part in ("params/", "ema_params/", "mu/", "nu/"):
    assert leaf(state, part + "layer_0/attention/qkv_kernel").sharding.spec \
        == qkv, part
    assert leaf(state, part + "layer_0/mlp_in/kernel").sharding.spec \
        == mlp_in, part
  assert leaf(state, "rng").sharding.spec == P()
  before, baseline, baseline_metrics = transformer_baseline
  assert_same_step(before, state, baseline, metrics, baseline_metrics,
                   ("loss", "masked_accuracy", "grad_norm"),
                   config.optimizer.learning_rate)
