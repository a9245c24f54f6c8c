"""Logical-axis sharding: parameter dimensions -> mesh axes, by config rules.

Every parameter dimension has a logical name, read off the parameter's path
and rank (`param_axes`): the transformer's fused QKV kernel [hidden, 3,
heads, head_dim] is ("embed", "qkv", "heads", "kv"), a convolution kernel
("conv_height", "conv_width", "conv_in", "conv_out"). `config.sharding_rules`
maps logical names to mesh axes (as in big_vision and MaxText), so data
parallelism, FSDP and tensor parallelism are changes of `config.mesh`:

  fsdp = 1, model = 1   everything replicated: plain data parallelism;
  fsdp = N              each large parameter's largest dimension split N ways;
  model = M             the transformer's heads and MLP hidden dimension
                        split M ways (tensor parallelism).

How one array is laid out (`partition_spec`): its dimensions choose in order
of decreasing size, so the largest one wins a mesh axis two dimensions ask
for, and each takes the first rule for its name whose mesh axes are in the
mesh with size > 1, are not taken by another dimension of the array, and
divide the dimension. A name may appear in several rules; later ones are
fallbacks: with ("mlp", "model"), ("mlp", "fsdp") the MLP dimension goes to
`model` when the mesh has one and to `fsdp` otherwise. A dimension no rule
can split is replicated (with a log line, once per name, when only
divisibility stopped it). Arrays under `min_size` elements stay replicated.

In a train state, optimizer moments (Adam's mu and nu) and EMA parameters
end in the path of the parameter they mirror, so they get its names and its
sharding; scalars (step, optimizer counts) and the RNG are replicated.
"""

import logging
import math
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskgit_jax import parallel

MIN_SHARDED_SIZE = 2**14  # elements; smaller arrays are not worth splitting

Names = Tuple[str, ...]
Rule = Tuple[str, Tuple[str, ...]]  # logical name, mesh axes (() = none)

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")

# (pattern searched in the "/"-joined path, logical names of the dimensions):
# the first entry whose pattern matches and whose names fit the rank wins.
PARAM_AXES: Tuple[Tuple[str, Names], ...] = (
    # The transformer (models/transformer.py).
    (r"token_embedding$", ("vocab", "embed")),
    (r"position_embedding$", ("positions", "embed")),
    (r"attention/qkv_kernel$", ("embed", "qkv", "heads", "kv")),
    (r"attention/qkv_bias$", ("qkv", "heads", "kv")),
    (r"attention/out_kernel$", ("heads", "kv", "embed")),
    (r"mlp_in/kernel$", ("embed", "mlp")),
    (r"mlp_in/bias$", ("mlp",)),
    (r"mlp_out/kernel$", ("mlp", "embed")),
    (r"head_dense/kernel$", ("embed", "embed")),  # one mesh axis: one dim
    (r"(attention/out_|mlp_out/|head_dense/)bias$", ("embed",)),
    (r"head_bias$", ("vocab",)),
    (r"_ln/(scale|bias)$", ("norm",)),
    # The VQGAN (models/vqgan.py) and discriminator (models/discriminator.py).
    (r"quantizer/codebook$", ("codes", "code_dim")),
    (r"norm\w*/(scale|bias)$", ("norm",)),
    (r"(^|/)(dense|logit)/kernel$", ("dense_in", "dense_out")),
    (r"(^|/)(dense|logit)/bias$", ("dense_out",)),
    (r"kernel$", CONV_AXES),  # every convolution: [kh, kw, in, out]
    (r"bias$", ("conv_out",)),
)

LOGICAL_AXES = frozenset(name for _, names in PARAM_AXES for name in names)
# Unnamed leaves that are replicated on purpose (scalars always are).
REPLICATED_LEAVES = ("rng",)
# Mesh axes that need no rule: `data` only ever splits the batch.
BATCH_ONLY_AXES = ("data",)

_logged_names = set()  # logical names whose divisibility fallback was logged


def param_axes(path: str, shape: Sequence[int]) -> Optional[Names]:
  """The logical names of a parameter's dimensions, or None if unknown."""
  for pattern, names in PARAM_AXES:
    if len(names) == len(shape) and re.search(pattern, path):
      return names
  return None


def logical_axes(params: Any) -> Dict[str, Names]:
  """{path: logical names} of every leaf of a parameter tree.

  Raises ValueError for a parameter no entry of PARAM_AXES names.
  """
  named = {}
  for path, leaf in _leaves_with_paths(params):
    names = param_axes(path, leaf.shape)
    if names is None:
      raise ValueError(_unnamed_message(path, leaf.shape))
    named[path] = names
  return named


def check_rules(rules: Iterable[Any]) -> Tuple[Rule, ...]:
  """Validated rules, each target as a tuple of mesh axes (() = replicated).

  A rule is (logical name, mesh axis), the mesh axis None (replicated), an
  axis name, or a sequence of axis names (split over their product). Lists
  are accepted too: a config read back from JSON holds lists.
  """
  checked = []
  for rule in rules:
    if isinstance(rule, str) or not isinstance(rule, Sequence) or len(
        rule) != 2:
      raise ValueError(f"Sharding rule {rule!r} is not a (logical axis, mesh "
                       "axis or None) pair.")
    name, target = rule
    if name not in LOGICAL_AXES:
      raise ValueError(f"Sharding rule {tuple(rule)!r}: unknown logical axis "
                       f"{name!r}; valid: {sorted(LOGICAL_AXES)}.")
    axes = ((target,) if isinstance(target, str) else
            () if target is None else tuple(target))
    for axis in axes:
      if axis not in parallel.AXIS_NAMES:
        raise ValueError(f"Sharding rule {tuple(rule)!r}: unknown mesh axis "
                         f"{axis!r}; valid: {parallel.AXIS_NAMES} or None.")
    checked.append((name, axes))
  return tuple(checked)


def partition_spec(names: Names, shape: Sequence[int],
                   mesh_shape: Mapping[str, int], rules: Iterable[Any],
                   min_size: int = MIN_SHARDED_SIZE) -> P:
  """The PartitionSpec of one array (see the module docstring)."""
  return _partition_spec(names, tuple(shape), mesh_shape, check_rules(rules),
                         min_size)


def state_shardings(state: Any, mesh: Mesh, rules: Iterable[Any],
                    min_size: int = MIN_SHARDED_SIZE) -> Any:
  """NamedShardings for every leaf of a train state (or of any tree of
  parameters, optimizer states and EMA copies) on `mesh`.

  A mesh with no parameter axis of size > 1 (fsdp = model = 1) replicates
  everything, whatever the tree holds: plain data parallelism, as before
  rules existed. Otherwise a non-scalar leaf that is neither named by
  PARAM_AXES nor in REPLICATED_LEAVES is a ValueError, and so is a mesh
  axis of size > 1 that no rule maps a logical axis of this state onto
  (`check_mesh_use`), before anything is compiled.
  """
  rules = check_rules(rules)
  replicated = NamedSharding(mesh, P())
  if all(size == 1 for axis, size in mesh.shape.items()
         if axis not in BATCH_ONLY_AXES):
    return jax.tree.map(lambda _: replicated, state)
  used_names = set()

  def leaf_sharding(key_path, leaf) -> NamedSharding:
    path = path_string(key_path)
    shape = tuple(getattr(leaf, "shape", ()))
    names = param_axes(path, shape) if shape else None
    if names is None:
      if shape and path.rsplit("/", 1)[-1] not in REPLICATED_LEAVES:
        raise ValueError(_unnamed_message(path, shape))
      return replicated
    used_names.update(names)
    return NamedSharding(mesh, _partition_spec(names, shape, mesh.shape,
                                               rules, min_size))

  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, state)
  check_mesh_use(mesh.shape, rules, used_names)
  return shardings


def check_mesh_use(mesh_shape: Mapping[str, int], rules: Iterable[Any],
                   names: Iterable[str]) -> None:
  """ValueError for a mesh axis of size > 1 (other than `data`) onto which
  no rule maps any of `names`, the logical axes of the state at hand.

  Such an axis would split no parameter: e.g. `model` = 2 for the VQGAN,
  which has no heads or MLP dimension, would run the same work twice.
  """
  rules = check_rules(rules)
  names = set(names)
  for axis, size in mesh_shape.items():
    if size == 1 or axis in BATCH_ONLY_AXES:
      continue
    if not any(name in names and axis in axes for name, axes in rules):
      raise ValueError(
          f"Mesh axis {axis!r} has size {size}, but config.sharding_rules "
          f"map none of this model's logical axes onto it, so it would "
          f"split no parameter. Rules: {_rules_text(rules)}. Logical axes "
          f"of this model: {sorted(names)}. Add a rule (logical axis, "
          f"{axis!r}) or remove {axis!r} from config.mesh.")


def _partition_spec(names: Names, shape: Tuple[int, ...],
                    mesh_shape: Mapping[str, int], rules: Tuple[Rule, ...],
                    min_size: int) -> P:
  if len(names) != len(shape):
    raise ValueError(f"Logical axes {names} do not fit shape {shape}.")
  if math.prod(shape) < min_size:
    return P()
  spec = [None] * len(shape)
  taken = set()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    indivisible = None
    for name, axes in rules:
      axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
      if name != names[dim] or not axes or taken.intersection(axes):
        continue
      ways = math.prod(mesh_shape[a] for a in axes)
      if shape[dim] % ways:
        indivisible = indivisible or (axes, ways)
        continue
      spec[dim] = axes[0] if len(axes) == 1 else axes
      taken.update(axes)
      break
    else:
      if indivisible:
        _log_replicated(names[dim], shape[dim], *indivisible)
  return P(*spec) if any(spec) else P()


def _log_replicated(name: str, size: int, axes: Tuple[str, ...],
                    ways: int) -> None:
  if name in _logged_names:
    return
  _logged_names.add(name)
  logging.warning(
      "Sharding: logical axis %r of size %d is not divisible by mesh axes %s "
      "(%d ways); such dimensions are replicated.", name, size, axes, ways)


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_string(key_path: Sequence[Any]) -> str:
  """A jax key path as the "/"-joined names PARAM_AXES patterns read."""
  return "/".join(_key_name(key) for key in key_path)


def _leaves_with_paths(tree: Any):
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield path_string(key_path), leaf


def _rules_text(rules: Tuple[Rule, ...]) -> str:
  def target(axes):
    return repr(axes[0]) if len(axes) == 1 else repr(axes or None)
  return ", ".join(f"{name}->{target(axes)}" for name, axes in rules) or "none"


def _unnamed_message(path: str, shape: Sequence[int]) -> str:
  return (f"No logical axis names for {path!r} of shape {tuple(shape)}: add "
          "an entry for it to maskgit_jax.sharding.PARAM_AXES.")
