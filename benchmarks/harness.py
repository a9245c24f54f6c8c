"""What every benchmark here shares: timing, workers, FLOPs and the record.

Each variant runs in its own process (nothing compiled or cached is shared)
with glibc's malloc set to keep freed memory (maskgit_jax.host_memory, as
the trainer's entry point sets it): without it XLA:CPU faults its buffers
back in on every call (13-19% of a train step here, up to 2x with other
thresholds), so every side of a comparison gets the same setting.

FLOP utilisation is measured against the best matmul rate, in the
benchmark's own dtype, that the same kind of process reaches on the same
machine (`peak_matmul`), not a datasheet number, so a 2-core VM and an
accelerator are judged alike. On accelerators with a published dense
bfloat16 peak (`NOMINAL_BF16_PEAKS`, or --nominal_peak) a bfloat16 record
also gives the MFU against that datasheet number, as papers report it.
Nothing here imports jax at module level: a parent that only starts workers
stays light, and a PyTorch worker never loads XLA for nothing.
"""

import argparse
import ast
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence)

from maskgit_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXED_MALLOC = dict(host_memory.GLIBC_ENV)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn()` (which must block until done), after one
  untimed call that compiles."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _worker_last_line(args: Sequence[str]) -> str:
  """Runs `python args...` in a fresh process with FIXED_MALLOC; returns the
  last line it prints, or exits naming the worker and its error."""
  result = subprocess.run([sys.executable, *args], capture_output=True,
                          text=True, check=False,
                          env=dict(os.environ, **FIXED_MALLOC))
  lines = result.stdout.strip().splitlines()
  if result.returncode or not lines:
    raise SystemExit(f"worker {' '.join(args)} failed:\n"
                     f"{result.stderr[-3000:]}")
  return lines[-1]


def run_worker(args: Sequence[str]) -> float:
  """Runs `python args...` in a fresh process; returns the number it prints
  last."""
  return float(_worker_last_line(args))


def run_worker_json(args: Sequence[str]) -> Dict[str, Any]:
  """Runs `python args...` in a fresh process; returns the JSON object it
  prints on its last line (a worker's whole report, not just a time)."""
  return json.loads(_worker_last_line(args))


# --- configs ----------------------------------------------------------------


def parse_override(text: str):
  """"transformer.hidden_size=256" -> (["transformer", "hidden_size"], 256).

  The value is a Python literal when it reads as one (ints, floats, bools,
  tuples), else the plain string (`mask_schedule=cosine`).
  """
  key, equals, value = text.partition("=")
  if not equals or not key.strip():
    raise ValueError(f"--set {text!r} is not key.path=value; e.g. --set "
                     "transformer.hidden_size=256.")
  try:
    parsed = ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    parsed = value.strip()
  return key.strip().split("."), parsed


def load_config(spec: str, overrides: Iterable[str] = ()):
  """The config of `path[:variant]` with `key.path=value` overrides applied.

  The config's own types are kept (ml_collections refuses a float for an
  int field), and an unknown key is an error that lists the valid ones, as
  `--config.x=...` of the entry point would be.
  """
  from maskgit_jax import config_base
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config={spec!r}: no such file {path!r}.")
  config = config_base.from_file(path, variant)
  for text in overrides:
    keys, value = parse_override(text)
    node = config
    for depth, key in enumerate(keys):
      if key not in node:
        where = ".".join(keys[:depth]) or "the config"
        raise ValueError(f"--set {text!r}: {where} has no key {key!r}; "
                         f"valid: {sorted(node.keys())}.")
      if depth < len(keys) - 1:
        node = node[key]
    try:
      node[keys[-1]] = value
    except TypeError as error:
      raise ValueError(f"--set {text!r}: {error}") from None
  return config


# --- FLOPs ------------------------------------------------------------------


def count_params(params, exclude: Sequence[str] = ()) -> int:
  """Parameters of a pytree, leaving out leaves whose path names any of
  `exclude` (e.g. the embedding tables)."""
  import jax
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if not names & set(exclude):
      total += math.prod(leaf.shape)
  return total


def transformer_flops(non_embedding_params: int, batch: int, seq_len: int,
                      num_layers: int, hidden: int, training: bool) -> float:
  """Matmul FLOPs of a transformer on [batch, seq_len] (Kaplan et al.).

  Forward: 2 N B S for the weights and 4 L S^2 D B for attention scores and
  their weighted sum; a training step (forward + backward) is 3x that.
  Embedding lookups and a head tied to the embedding table are not counted.
  """
  forward = (2.0 * non_embedding_params * batch * seq_len +
             4.0 * num_layers * seq_len**2 * hidden * batch)
  return 3.0 * forward if training else forward


def xla_flops(compiled) -> float:
  """FLOPs that XLA's cost analysis gives a compiled program.

  `cost_analysis()` is a dict in current jax, a list of per-program dicts
  in older releases. XLA counts a while loop's body once, whatever its trip
  count, and a conditional as its costlier branch.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, Mapping):
    analysis = [analysis]
  return float(sum(part.get("flops", 0.0) for part in analysis or ()))


def peak_matmul(sizes: Sequence[int] = (2048, 4096), repeats: int = 3,
                dtype: str = "float32") -> Dict[str, Any]:
  """The best rate of a jitted n x n matmul in `dtype` over `sizes`.

  Measured in the calling process, so it shares the benchmark's threads,
  malloc setting and XLA flags: {"flops_per_s": best, "by_size": {n:
  rate}, "dtype": dtype}. A bfloat16 step is judged against bfloat16
  matmuls (tensor cores on a GPU), a float32 one against float32.
  """
  import jax
  import jax.numpy as jnp
  matmul = jax.jit(jnp.matmul)
  rates = {}
  for n in sizes:
    a_key, b_key = jax.random.split(jax.random.key(n))
    a = jax.random.normal(a_key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(b_key, (n, n), jnp.float32).astype(dtype)
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(),
                             repeats)
    rates[str(n)] = 2.0 * n**3 / seconds
  return {"flops_per_s": max(rates.values()), "by_size": rates,
          "dtype": str(dtype)}


# Dense (no sparsity) bfloat16 peaks per chip from the vendors' datasheets,
# matched against jax's device_kind in this order (specific names first).
NOMINAL_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),      # SXM5, device_kind "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),      # SXM
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),       # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def nominal_peak(device_kind: str, dtype: str) -> Optional[float]:
  """The datasheet dense peak FLOP/s of one chip for `dtype`, if known.

  Only bfloat16 is tabulated: a float32 matmul's rate on an accelerator
  depends on its precision setting (TF32 on NVIDIA GPUs), so it has no
  single datasheet number.
  """
  if dtype != "bfloat16":
    return None
  kind = device_kind.lower()
  for name, flops in NOMINAL_BF16_PEAKS:
    if name.lower() in kind:
      return flops
  return None


def utilization(achieved: float, peak: Mapping[str, Any], device_kind: str,
                nominal_override: Optional[float] = None) -> Dict[str, Any]:
  """The record's utilisation fields: against the measured matmul peak,
  and (MFU) against one chip's datasheet peak where one is known."""
  nominal = nominal_override or nominal_peak(device_kind, peak["dtype"])
  if nominal_override:
    source = "--nominal_peak"
  elif nominal:
    source = f"datasheet dense {peak['dtype']} peak of {device_kind!r}"
  else:
    source = (f"none known for {device_kind!r} in {peak['dtype']}; pass "
              "--nominal_peak=FLOPS")
  return {"peak_matmul_flops_per_s": peak["flops_per_s"],
          "peak_matmul_by_size": peak["by_size"],
          "peak_matmul_dtype": peak["dtype"],
          "flop_utilization": achieved / peak["flops_per_s"],
          "nominal_peak_flops_per_s": nominal,
          "nominal_peak_source": source,
          "mfu": achieved / nominal if nominal else None}


# --- the record -------------------------------------------------------------


def _cpu_model() -> str:
  """The CPU's model name (Linux), which platform.processor() often is not."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
  """What the numbers were measured on: CPU, OS, jax and its backend."""
  import jax
  uname = platform.uname()
  device = jax.devices()[0]
  return {"cpu": _cpu_model(), "processor": platform.processor(),
          "uname": f"{uname.system} {uname.release} {uname.machine}",
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax_version": jax.__version__, "backend": jax.default_backend(),
          "device_kind": device.device_kind,
          "device_count": jax.device_count()}


def git_commit() -> Dict[str, Any]:
  """{"git_commit": HEAD or None, "git_dirty": uncommitted changes or None};
  never fails (a tarball has no git)."""
  def git(*args) -> Optional[str]:
    try:
      result = subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=REPO, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
      return None
    return result.stdout.strip()
  commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
  return {"git_commit": commit or None,
          "git_dirty": None if status is None else bool(status)}


def now() -> str:
  """The date and time (UTC, ISO 8601, seconds)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


def write_json(path: Optional[str], result: Mapping[str, Any]) -> None:
  """Writes `result` to `path` (folders made as needed); no path, no file."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")


# --- command line -------------------------------------------------------------


def add_common_flags(parser, repeats_help: str) -> None:
  """--rounds, --repeats, --peak_sizes, --peak_repeats and --out, which every
  throughput benchmark takes."""
  parser.add_argument("--rounds", type=int, default=3,
                      help="fresh worker processes (per side, alternating)")
  parser.add_argument("--repeats", type=int, default=5, help=repeats_help)
  parser.add_argument("--peak_sizes", default="2048,4096",
                      help="matmul sizes for the measured peak")
  parser.add_argument("--peak_repeats", type=int, default=3)
  parser.add_argument("--nominal_peak", type=_flops, default=None,
                      help="one chip's datasheet peak FLOP/s for the MFU "
                      "(default: harness.NOMINAL_BF16_PEAKS for bfloat16)")
  parser.add_argument("--out", default=None, help="JSON file for the result")


def _flops(text: str) -> float:
  """--nominal_peak's type: a positive FLOP/s figure."""
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(
        f"--nominal_peak={value}: must be > 0 (FLOP/s).")
  return value


def require_positive(parser, args, names: Iterable[str]) -> None:
  """Stops with a parser error naming the first count flag below 1."""
  for name in names:
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)}: must be >= 1.")


def peak_sizes(text: str) -> List[int]:
  """"2048,4096" -> [2048, 4096]."""
  return [int(size) for size in text.split(",") if size.strip()]
