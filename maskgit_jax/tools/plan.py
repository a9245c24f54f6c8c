r"""Per-device memory of a config's train step on a mesh, before renting one.

  python -m maskgit_jax.tools.plan --config=configs/maskgit_imagenet256.py \
      --mesh=data=2,fsdp=2,model=2 [--json=plan.json]

Before JAX starts, the tool makes XLA:CPU offer as many (virtual) devices as
the mesh has. It then builds the stage's abstract train state with
`jax.eval_shape` (no parameter is materialised), shards it with
`config.sharding_rules` exactly as the trainer does, lowers and compiles the
jitted, donated train step, and prints per-device bytes: the analytic size
of the parameters, optimizer state and EMA from their shardings, and
`compiled.memory_analysis()` of the step (arguments, outputs, temporaries
such as activations, total). The compiled figures are XLA:CPU's buffer
assignment, an estimate of a TPU's or GPU's (fusion differs). Nothing runs.

A transformer config needs the tokenizer's codebook size and tokens per
image: --codebook_size / --num_tokens, else the tokenizer workdir's token
cache or config when it exists, else 1024 and 256 (ImageNet 256x256); the
output says which.

Flags are parsed with argparse rather than absl, so importing this module
(the tests do) defines no global flags, and JAX is imported only after the
device count is set.
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from maskgit_jax import config_base

MESH_AXES = ("data", "fsdp", "model")  # parallel.AXIS_NAMES (imports jax)
DEFAULT_CODEBOOK_SIZE = 1024  # the ImageNet-256 tokenizer's
DEFAULT_NUM_TOKENS = 256      # 16 x 16 tokens of a 256 x 256 image
STATE_PARTS = (("params", "params"), ("opt_state", "optimizer state"),
               ("ema_params", "EMA params"))
COMPILED_PARTS = (("arguments", "arguments"), ("outputs", "outputs"),
                  ("aliased", "  of which donated (aliased)"),
                  ("temporaries", "temporaries (activations)"),
                  ("total", "total"))


def parse_mesh(text: str) -> Dict[str, int]:
  """"data=2,fsdp=2,model=2" -> {"data": 2, "fsdp": 2, "model": 2}."""
  sizes = {}
  for item in text.split(","):
    axis, equals, size = item.strip().partition("=")
    axis, size = axis.strip(), size.strip()
    if not equals or not axis:
      raise ValueError(f"--mesh={text!r}: {item.strip()!r} is not axis=size; "
                       "expected e.g. data=2,fsdp=2,model=2.")
    if axis not in MESH_AXES:
      raise ValueError(f"--mesh={text!r}: unknown axis {axis!r}; valid: "
                       f"{MESH_AXES}.")
    if axis in sizes:
      raise ValueError(f"--mesh={text!r}: axis {axis!r} is given twice.")
    try:
      sizes[axis] = int(size)
    except ValueError:
      raise ValueError(f"--mesh={text!r}: the size of {axis!r} is {size!r}, "
                       "not an integer.") from None
    if sizes[axis] < 1:
      raise ValueError(f"--mesh={text!r}: the size of {axis!r} is "
                       f"{sizes[axis]}; a plan needs every size >= 1 (no -1: "
                       "there are no real devices to fill).")
  return sizes


def use_virtual_devices(num_devices: int) -> None:
  """Makes JAX (not yet started) run on `num_devices` virtual CPU devices.

  Also selects XLA:CPU's fastest-compiling backend level: nothing runs, and
  buffer assignment, which the memory figures come from, is the same.
  """
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = "cpu"


def token_grid(config, codebook_size: Optional[int] = None,
               num_tokens: Optional[int] = None) -> Tuple[int, int, str]:
  """(codebook size, tokens per image, where they came from) for stage 2.

  Given values win; the others come from config.tokenizer_workdir (its
  token cache, else its config) when it exists, else the ImageNet-256
  defaults.
  """
  given = {"codebook_size": codebook_size, "num_tokens": num_tokens}
  for name, value in given.items():
    if value is not None and int(value) < 1:
      raise ValueError(f"--{name}={value}: must be an integer >= 1.")
  found, source = (None, None), ""
  if codebook_size is None or num_tokens is None:
    found, source = _tokenizer_grid(config.get("tokenizer_workdir", ""))
  values, sources = {}, {}
  for (name, value), fallback in zip(given.items(), found):
    values[name] = int(value) if value is not None else fallback
    sources[name] = f"--{name}" if value is not None else source
  if len(set(sources.values())) == 1:
    text = f"both from {source}"
  else:
    text = ", ".join(f"{name} from {sources[name]}" for name in given)
  return values["codebook_size"], values["num_tokens"], text


def _tokenizer_grid(path: str) -> Tuple[Tuple[int, int], str]:
  """((codebook size, tokens per image), source) of a tokenizer workdir."""
  from maskgit_jax import workdir as workdir_lib
  from maskgit_jax.data import tokens as tokens_lib
  if not path:
    return ((DEFAULT_CODEBOOK_SIZE, DEFAULT_NUM_TOKENS),
            "the ImageNet-256 defaults (config.tokenizer_workdir is empty)")
  run = workdir_lib.Workdir(path)
  cache = os.fspath(run.token_cache)
  if tokens_lib.is_token_dataset(cache):
    tokens = tokens_lib.TokenSource(cache)
    return ((int(tokens.metadata["codebook_size"]),
             math.prod(tokens.token_shape)), f"the token cache {cache}")
  if run.config_file.exists():
    tokenizer = run.load_config()
    factor = 2**(len(tokenizer.vqgan.channel_multipliers) - 1)
    return ((int(tokenizer.vqgan.codebook_size),
             math.prod(run.token_shape(tokenizer, factor))),
            f"the tokenizer config {os.fspath(run.config_file)}")
  return ((DEFAULT_CODEBOOK_SIZE, DEFAULT_NUM_TOKENS),
          f"the ImageNet-256 defaults (no tokenizer workdir at {path!r})")


def plan_memory(config, mesh_sizes: Mapping[str, int],
                codebook_size: Optional[int] = None,
                num_tokens: Optional[int] = None) -> Dict[str, Any]:
  """Compiles the config's train step on a mesh of the devices JAX has
  (exactly as many as the mesh needs) and returns the memory report."""
  import jax
  from maskgit_jax import parallel
  from maskgit_jax import sharding

  mesh = parallel.create_mesh(dict(mesh_sizes))
  shards = parallel.num_batch_shards(mesh)
  if config.batch_size % shards:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"{shards} data-parallel devices of mesh "
                     f"{dict(mesh.shape)}.")
  report = {"stage": config.stage, "mesh": dict(mesh.shape),
            "num_devices": mesh.size, "platform": mesh.devices.flat[0].platform,
            "batch_size": config.batch_size, "batch_shards": shards}
  init_fn, step_fn, batch, constants, tokens = _stage(config, codebook_size,
                                                      num_tokens)
  if tokens:
    report["tokens"] = tokens

  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
  shardings = sharding.state_shardings(abstract, mesh,
                                       config.get("sharding_rules", ()))
  report["state_bytes"] = state_bytes(abstract, shardings)
  report["constant_bytes"] = sum(  # replicated, e.g. the LPIPS weights
      math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(constants))
  replicated = parallel.replicated(mesh)
  jitted = jax.jit(step_fn,
                   in_shardings=(shardings, parallel.batch_sharding(mesh),
                                 replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  start = time.perf_counter()
  compiled = jitted.lower(abstract, batch, constants).compile()
  report["compile_seconds"] = round(time.perf_counter() - start, 1)
  report["compiled_bytes"] = compiled_bytes(compiled.memory_analysis())
  return report


def _stage(config, codebook_size, num_tokens):
  """(init_state, train_step, batch shapes, constant shapes, token info)."""
  import jax
  from maskgit_jax.train import tokenizer_stage
  from maskgit_jax.train import transformer_stage
  if config.stage == "transformer":
    if config.tokenizer_workdir:  # else the flags or defaults stand in
      transformer_stage.validate(config)
    codes, length, source = token_grid(config, codebook_size, num_tokens)
    init_fn, step_fn, batch = transformer_stage.step_functions(
        config, codes, length)
    tokens = {"codebook_size": codes, "num_tokens": length, "source": source}
    return init_fn, step_fn, batch, None, tokens
  if config.stage == "tokenizer":
    if codebook_size is not None or num_tokens is not None:
      raise ValueError("--codebook_size and --num_tokens apply to transformer "
                       "configs; a tokenizer config sets config.vqgan.")
    tokenizer_stage.validate(config)
    init_fn, step_fn, batch = tokenizer_stage.step_functions(config)
    constants = None
    if config.losses.perceptual_weight > 0:  # the frozen LPIPS weights
      from maskgit_jax.models import perceptual
      image = jax.ShapeDtypeStruct(
          (1, perceptual.MIN_IMAGE_SIZE, perceptual.MIN_IMAGE_SIZE, 3),
          jax.numpy.float32)
      constants = jax.eval_shape(perceptual.LPIPS().init, jax.random.key(0),
                                 image, image)["params"]
    return init_fn, step_fn, batch, constants, None
  raise ValueError(f"config.stage={config.stage!r}; valid: 'tokenizer', "
                   "'transformer'.")


def state_bytes(abstract: Any, shardings: Any) -> Dict[str, Dict[str, int]]:
  """{part: {"per_device", "total"}} bytes of params, optimizer state, EMA
  and the rest (step, RNG), from each leaf's shard shape."""
  import jax
  from maskgit_jax import sharding
  parts = {key: {"per_device": 0, "total": 0}
           for key in [k for k, _ in STATE_PARTS] + ["other"]}
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for (path, leaf), leaf_sharding in zip(leaves, jax.tree.leaves(shardings)):
    names = sharding.path_string(path).split("/")
    part = next((k for k, _ in STATE_PARTS if k in names), "other")
    itemsize = leaf.dtype.itemsize
    parts[part]["total"] += math.prod(leaf.shape) * itemsize
    parts[part]["per_device"] += math.prod(
        leaf_sharding.shard_shape(leaf.shape)) * itemsize
  return parts


def compiled_bytes(stats: Any) -> Dict[str, int]:
  """Per-device bytes of a compiled step, from its memory analysis.

  Donated arguments alias outputs, so the total counts them once.
  """
  def get(name):
    return int(getattr(stats, name, 0) or 0)
  result = {"arguments": get("argument_size_in_bytes"),
            "outputs": get("output_size_in_bytes"),
            "aliased": get("alias_size_in_bytes"),
            "temporaries": get("temp_size_in_bytes")}
  result["total"] = (result["arguments"] + result["outputs"] -
                     result["aliased"] + result["temporaries"])
  return result


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a small table (MiB)."""
  mib = lambda n: f"{n / 2**20:12,.1f}"
  mesh = ",".join(f"{axis}={size}" for axis, size in report["mesh"].items())
  lines = [f"{report.get('config', 'config')} ({report['stage']}) on mesh "
           f"{mesh}: {report['num_devices']} virtual {report['platform']} "
           f"devices, global batch {report['batch_size']} in "
           f"{report['batch_shards']} shards."]
  if "tokens" in report:
    tokens = report["tokens"]
    lines.append(f"Tokens: codebook_size={tokens['codebook_size']}, "
                 f"num_tokens={tokens['num_tokens']}; {tokens['source']}.")
  lines += ["", f"{'train state':32}{'MiB/device':>12}{'MiB in all':>12}"]
  state = report["state_bytes"]
  for key, label in STATE_PARTS + (("other", "step, RNG"),):
    lines.append(f"  {label:30}{mib(state[key]['per_device'])}"
                 f"{mib(state[key]['total'])}")
  if report.get("constant_bytes"):
    lines.append(f"  {'frozen constants (LPIPS)':30}"
                 f"{mib(report['constant_bytes'])}"
                 f"{mib(report['constant_bytes'])}")
  lines += ["", f"{'compiled train step':32}{'MiB/device':>12}"]
  compiled = report["compiled_bytes"]
  for key, label in COMPILED_PARTS:
    lines.append(f"  {label:30}{mib(compiled[key])}")
  lines.append(f"(XLA:{report['platform'].upper()} buffer assignment, compiled "
               f"in {report['compile_seconds']} s; a TPU's or GPU's differs "
               "somewhat.)")
  return "\n".join(lines)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m maskgit_jax.tools.plan",
      description="Per-device memory of a config's train step on a mesh.")
  parser.add_argument("--config", required=True,
                      help="Config file, e.g. configs/maskgit_imagenet256.py"
                      "[:arg].")
  parser.add_argument("--mesh", required=True,
                      help="Mesh axis sizes, e.g. data=2,fsdp=2,model=2.")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="Transformer configs: the tokenizer's codebook.")
  parser.add_argument("--num_tokens", type=int, default=None,
                      help="Transformer configs: tokens per image.")
  parser.add_argument("--json", default="",
                      help="Also write the report to this JSON file.")
  return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  path, _, arg = args.config.partition(":")
  try:
    mesh_sizes = parse_mesh(args.mesh)
    if not os.path.exists(path):
      raise ValueError(f"--config={args.config!r}: no such file {path!r}.")
    config = config_base.from_file(path, arg)
    use_virtual_devices(math.prod(mesh_sizes.values()))
    report = {"config": args.config,
              **plan_memory(config, mesh_sizes, args.codebook_size,
                            args.num_tokens)}
  except ValueError as error:
    sys.exit(f"Error: {error}")
  print(format_report(report))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
