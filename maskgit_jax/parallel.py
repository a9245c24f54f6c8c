"""Device mesh and batch shardings (jit + NamedSharding; no pmap).

Axes: `data` (pure data parallelism), `fsdp` (data parallel with sharded
parameters) and optionally `model`. The batch is split over every data-like
axis. Meshes use Auto axis types, i.e. GSPMD propagation (jax >= 0.10 makes
Explicit the default).
"""

import math
import os
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


def initialize_distributed() -> None:
  """Initialises multi-host JAX once, when this is one of several processes.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (launch/local_multiprocess.sh sets them). Otherwise SLURM
  and Cloud TPU pods are detected by jax itself. A single process does
  nothing.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]))
  elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]:
    jax.distributed.initialize()
