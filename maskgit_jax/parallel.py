"""Device mesh and batch shardings (jit + NamedSharding; no pmap).

Axes: `data` (pure data parallelism), `fsdp` (data parallel with sharded
parameters) and optionally `model`. The batch is split over every data-like
axis. Meshes use Auto axis types, i.e. GSPMD propagation (jax >= 0.10 makes
Explicit the default).
"""

import dataclasses
import math
import os
import socket
import sys
import threading
import time
from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS_NAMES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def create_mesh(axis_sizes: Optional[Mapping[str, int]] = None,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a mesh over `devices` (default: all) with the given axis sizes.

  One size may be -1, meaning "all remaining devices"; with no sizes the mesh
  is all devices on `data`. Example: {"data": -1, "fsdp": 2}.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(axis_sizes or {"data": -1})
  unknown = [name for name in sizes if name not in AXIS_NAMES]
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; valid axes: {AXIS_NAMES}.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh "
                       f"{sizes}: {len(devices)} is not divisible by {fixed}.")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but {len(devices)} are available.")
  names = tuple(name for name in AXIS_NAMES if name in sizes)
  shape = tuple(sizes[name] for name in names)
  return jax.make_mesh(shape, names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple:
  """The mesh axes that split the batch dimension."""
  return tuple(name for name in BATCH_AXES if name in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[name] for name in batch_axes(mesh))


# Below this many state elements a CPU initialiser compiles at backend
# optimisation level 0: the unoptimised kernels run ~3x slower (ImageNet-256's
# 700M elements: 5 -> 14 s), which here costs at most ~1 s.
FAST_INIT_MAX_ELEMENTS = 2**26


def jit_init(fn, abstract_state, **jit_kwargs):
  """`jax.jit` for a program run once per run: a state's initialisation.

  An initialiser is hundreds of small random kernels (threefry bits and the
  erf_inv of truncated normals, one set per parameter). XLA:CPU spends
  seconds optimising their machine code for a single run: the demo
  tokenizer's compiles in 12 s at the default level and in 4 s at level 0,
  which this uses on CPU for states under FAST_INIT_MAX_ELEMENTS
  (`abstract_state`: the state's shapes, from jax.eval_shape). Other
  platforms and larger states get plain `jax.jit`.
  """
  size = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state))
  if jax.default_backend() == "cpu" and size < FAST_INIT_MAX_ELEMENTS:
    jit_kwargs.setdefault("compiler_options",
                          {"xla_backend_optimization_level": 0})
  return jax.jit(fn, **jit_kwargs)


def initialize(init_fn, key: jax.Array):
  """init_fn(key) compiled by jit_init, on the default device: what a state
  or parameters made outside the training loop should use (run eagerly, an
  initialiser compiles each of its ops on its own)."""
  return jit_init(init_fn, jax.eval_shape(init_fn, key))(key)


def fsdp_sharding(tree, mesh: Mesh, min_size: int = 2**14):
  """Shards each large array's biggest divisible dimension over `fsdp`.

  Arrays smaller than `min_size` elements, or with no dimension divisible by
  the `fsdp` axis size, are replicated. With fsdp = 1 everything is
  replicated (plain data parallelism).
  """
  fsdp = mesh.shape.get("fsdp", 1)

  def spec(x):
    shape = getattr(x, "shape", ())
    if fsdp == 1 or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp == 0:
        axes = [None] * len(shape)
        axes[dim] = "fsdp"
        return NamedSharding(mesh, P(*axes))
    return NamedSharding(mesh, P())

  return jax.tree.map(spec, tree)


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch (this process's rows) -> global sharded arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def initialize_distributed(timeout_s: Optional[int] = None,
                           env: Optional[Mapping[str, str]] = None) -> None:
  """Initialises multi-host JAX once, when this is one of several processes.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, all three or none (launch/local_multiprocess.sh sets them).
  Otherwise SLURM (SLURM_NTASKS > 1), Cloud TPU pods (several
  TPU_WORKER_HOSTNAMES) and MASKGIT_DISTRIBUTED=auto (launch/tpu_pod.sh: jax
  asks the TPU VM's metadata server) use jax's own detection. A single
  process does nothing. Settings are checked (ValueError) before jax is
  called.

  A job whose processes do not meet within `timeout_s` seconds (default:
  env MASKGIT_INIT_TIMEOUT_S, else 300) does not hang. A process that finds
  nobody at the coordinator address raises DistributedInitError. Once jax
  is connecting, its own time-out would abort the process from C++ with a
  bare check failure, so a watchdog gets there first: it prints the same
  kind of message and exits the process with status 1.

  Args:
    timeout_s: seconds to wait for every process to reach the coordinator.
    env: the environment to read (default os.environ; tests pass their own).
      jax's own cluster detection always reads os.environ.
  """
  env = os.environ if env is None else env
  setup = _distributed_setup(env)
  if setup is None:
    return
  timeout_s = _init_timeout_s(timeout_s, env)
  if jax.distributed.is_initialized():
    return
  deadline = time.monotonic() + timeout_s
  kwargs = {}
  if setup.address is not None:  # Explicit; otherwise jax detects it all.
    kwargs = dict(coordinator_address=setup.address,
                  num_processes=setup.num_processes,
                  process_id=setup.process_id)
    if setup.process_id != 0:  # Process 0 starts the coordinator itself.
      _wait_for_coordinator(setup, timeout_s, deadline)
  # CPU processes exchange arrays over gloo (the default has none).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  remaining = max(1.0, deadline - time.monotonic())
  watchdog = threading.Timer(remaining, _give_up, (setup, timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:
    # jax's deadline comes after the watchdog's, which must win the race.
    jax.distributed.initialize(
        initialization_timeout=math.ceil(remaining) + _JAX_GRACE_S, **kwargs)
  except (ValueError, OSError, jax.errors.JaxRuntimeError) as error:
    # E.g. jax's detection found no coordinator, or the metadata server
    # did not answer. (Misuse, such as a call after jax has started its
    # backends, stays a plain RuntimeError.)
    raise DistributedInitError(
        _init_failure_message(setup, timeout_s, error)) from error
  finally:
    watchdog.cancel()


DEFAULT_INIT_TIMEOUT_S = 300
_JAX_GRACE_S = 10  # jax's own time-out comes this much after the watchdog's.
_EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                  "JAX_PROCESS_ID")


class DistributedInitError(RuntimeError):
  """The processes of a multi-host job could not connect to each other."""


@dataclasses.dataclass(frozen=True)
class _Setup:
  """How this process joins a job; None fields are left to jax."""
  source: str  # where the settings come from, for messages
  address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def _distributed_setup(env: Mapping[str, str]) -> Optional[_Setup]:
  """The validated setup of this process, or None for a single process."""
  mode = env.get("MASKGIT_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise ValueError(f"MASKGIT_DISTRIBUTED={mode!r} is not valid: leave it "
                     "unset, or 'auto' to let jax detect the cluster.")
  given = {name: env[name] for name in _EXPLICIT_VARS if env.get(name)}
  if given:
    return _explicit_setup(given)
  if mode == "auto":
    return _Setup("auto-detected by jax (MASKGIT_DISTRIBUTED=auto)")
  if env.get("SLURM_JOB_ID"):
    ntasks = _parse_int("SLURM_NTASKS", env.get("SLURM_NTASKS", "1"))
    if ntasks > 1:
      process_id = env.get("SLURM_PROCID")
      return _Setup("SLURM", num_processes=ntasks, process_id=(
          _parse_int("SLURM_PROCID", process_id) if process_id else None))
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    worker = env.get("TPU_WORKER_ID")
    return _Setup("Cloud TPU pod", num_processes=len(hosts), process_id=(
        _parse_int("TPU_WORKER_ID", worker) if worker else None))
  return None


def _explicit_setup(given: Mapping[str, str]) -> Optional[_Setup]:
  """Checks JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID."""
  count = given.get("JAX_NUM_PROCESSES")
  num_processes = None if count is None else _parse_int(
      "JAX_NUM_PROCESSES", count)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"JAX_NUM_PROCESSES={count!r}: the number of processes "
                     "must be an integer >= 1.")
  # One process needs no coordinator: JAX_NUM_PROCESSES=1 may stand alone.
  needed = () if num_processes == 1 else _EXPLICIT_VARS
  missing = [name for name in needed if name not in given]
  if missing:
    raise ValueError(
        f"Multi-process JAX needs all of {', '.join(_EXPLICIT_VARS)}; "
        f"{', '.join(f'{k}={v!r}' for k, v in given.items())} set but "
        f"{', '.join(missing)} missing. Set all three, or none for a single "
        "process.")
  process_id = _parse_int("JAX_PROCESS_ID", given.get("JAX_PROCESS_ID", "0"))
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f"JAX_PROCESS_ID={process_id} is out of range: with "
        f"JAX_NUM_PROCESSES={num_processes} it must be in "
        f"[0, {num_processes}), i.e. 0..{num_processes - 1}.")
  if "JAX_COORDINATOR_ADDRESS" in given:
    _check_address(given["JAX_COORDINATOR_ADDRESS"])
  if num_processes == 1:
    return None
  return _Setup("JAX_* variables", given["JAX_COORDINATOR_ADDRESS"],
                num_processes, process_id)


def _parse_int(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _check_address(address: str) -> None:
  """`host:port` (an IPv6 host in brackets), with a port in 1..65535."""
  host, _, port = address.rpartition(":")
  valid_port = port.isdigit() and 1 <= int(port) <= 65535
  if not host or not valid_port or any(c.isspace() for c in address):
    raise ValueError(
        f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port with a port "
        "in 1..65535, e.g. 10.0.0.1:1234 (process 0's host; every process "
        "passes the same address).")


def _init_timeout_s(timeout_s: Optional[int],
                    env: Mapping[str, str]) -> int:
  """The argument, else MASKGIT_INIT_TIMEOUT_S, else the default; >= 1."""
  if timeout_s is None:
    raw = env.get("MASKGIT_INIT_TIMEOUT_S") or str(DEFAULT_INIT_TIMEOUT_S)
    source = f"MASKGIT_INIT_TIMEOUT_S={raw!r}"
    timeout_s = _parse_int("MASKGIT_INIT_TIMEOUT_S", raw)
  else:
    source = f"timeout_s={timeout_s!r}"
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or (
      timeout_s < 1):
    raise ValueError(f"{source}: the initialisation timeout must be a whole "
                     "number of seconds >= 1.")
  return timeout_s


def _wait_for_coordinator(setup: _Setup, timeout_s: int,
                          deadline: float) -> None:
  """Polls the coordinator's port until it accepts a TCP connection."""
  host, _, port = setup.address.rpartition(":")
  host = host.strip("[]")  # An IPv6 literal.
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, int(port)),
                                    timeout=min(2.0, max(0.1, remaining))):
        return
    except OSError as error:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise DistributedInitError(_init_failure_message(
            setup, timeout_s, error, "nobody is listening there")) from error
      time.sleep(min(0.5, remaining))


def _give_up(setup: _Setup, timeout_s: int) -> None:
  """Ends the process, explaining why, before jax aborts it (watchdog)."""
  message = _init_failure_message(setup, timeout_s, None,
                                  "the other processes did not all arrive")
  sys.stderr.write(f"Error: {message}\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def _init_failure_message(setup: _Setup, timeout_s: int,
                          error: Optional[Exception],
                          what: str = "") -> str:
  """What was tried, what went wrong and what to check."""
  def known(value):
    return "?" if value is None else value
  cause = what
  if error is not None:
    first = (str(error).strip().splitlines() or [""])[0][:300]
    cause += f"{'; ' if cause else ''}{type(error).__name__}: {first}"
  return (
      f"Multi-host JAX initialisation failed ({setup.source}): process "
      f"{known(setup.process_id)} of {known(setup.num_processes)} could not "
      f"meet the others at coordinator {setup.address or '(chosen by jax)'}"
      f" within {timeout_s} s ({cause}). Start every process with the same "
      "coordinator address and process count (ids 0..count-1, each once); "
      "process 0 runs the coordinator, so its host and port must be "
      "reachable from all of them. If they start slowly, raise the timeout "
      "with --distributed_timeout_s or MASKGIT_INIT_TIMEOUT_S.")
