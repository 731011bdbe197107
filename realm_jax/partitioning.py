"""Device mesh, the one logical-axis-rules table, and placement helpers.

Every parameter and activation in realm-jax is named with *logical* axes
(batch, length, embed, ...).  `LOGICAL_AXIS_RULES` is the single table that maps
them onto the physical ("data", "model") mesh; change it (or pass other rules)
to move between pure data parallelism, tensor parallelism and FSDP-style layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from realm_jax.errors import InputError

MESH_AXES = ("data", "model")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The one table.  Logical axis -> mesh axis (None = replicated).
LOGICAL_AXIS_RULES: Rules = (
    ("batch", "data"),        # examples of a (global) batch
    ("length", None),         # token positions
    ("embed", None),          # hidden size (residual stream)
    ("hidden", None),         # second hidden-size axis of square matrices (pooler)
    ("mlp", "model"),         # feed-forward inner size
    ("heads", "model"),       # attention heads
    ("kv", None),             # per-head size
    ("vocab", "model"),       # word-piece vocabulary
    ("type_vocab", None),     # segment-type vocabulary
    ("position", None),       # position-embedding table rows
    ("proj", None),           # retrieval projection (128)
    ("docs", ("data", "model")),  # rows of the block-embedding index: over every device (`mips.index_axes`)
)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ("data", "model") mesh; `data=-1` takes all devices left over by `model`."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    if len(devices) % model:
      raise InputError(f"{len(devices)} devices do not split into model={model} groups")
    data = len(devices) // model
  if data * model != len(devices):
    raise InputError(f"mesh data={data} x model={model} needs {data * model} devices, have {len(devices)}")
  return jax.make_mesh(
      (data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def initialize_distributed(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
  """Joins a multi-host job (no-op for a single process); call before any other JAX use.

  `coordinator_address="auto"` lets JAX discover the job (Cloud TPU VMs, SLURM, ...).
  """
  if coordinator_address == "auto":
    jax.distributed.initialize()
    return
  if num_processes <= 1:
    return
  if not coordinator_address:
    raise InputError("multi-host runs need --coordinator_address host:port")
  # CPU processes need gloo for cross-process collectives (no effect on TPU/GPU backends).  Backends
  # must not be initialised before `jax.distributed.initialize`, so this is set unconditionally.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info(
      "process %d/%d joined; %d local / %d global devices",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )


def logical_sharding(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree of (possibly boxed) Flax variables or logical PartitionSpecs."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: leading axis over "data", the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows of a batch-sharded global batch that this process's devices hold (contiguous)."""
  indices = data_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
  starts, stops = {i[0].indices(global_batch)[0] for i in indices}, {i[0].indices(global_batch)[1] for i in indices}
  rows = slice(min(starts), max(stops))
  if (rows.stop - rows.start) * jax.process_count() != global_batch or rows.start != jax.process_index() * (
      rows.stop - rows.start):
    raise ValueError(f"process {jax.process_index()} holds rows {rows.start}:{rows.stop} of {global_batch}; "
                     "the 'data' mesh axis must give process p the p-th of equal contiguous parts of the batch")
  return rows


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places this process's part of a batch (`process_rows`; the whole batch on one process) on the mesh.

  The global batch is the processes' parts concatenated in process order.
  """

  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(data_sharding(mesh, np.ndim(x)), np.asarray(x))

  return jax.tree.map(put, batch)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows (`process_rows`) of a batch-sharded global array, in order: the inverse of `shard_batch`
  (a row held by several devices, e.g. along "model", is read once)."""
  shards = {s.index[0].indices(x.shape[0])[:2]: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[rows].data) for rows in sorted(shards)])


def process_block_range(num_blocks: int, process: int | None = None, processes: int | None = None) -> tuple[int, int]:
  """Blocks [start, stop) that process `process` (default: this one) of `processes` embeds and writes: equal
  contiguous parts of the index, in process order (their sizes differ by at most one)."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  return process * num_blocks // processes, (process + 1) * num_blocks // processes


def agree(value: int) -> int:
  """Process 0's `value` (any int64) on every process (decisions that read shared files, e.g. which step to
  index)."""
  if jax.process_count() == 1:
    return value
  # As int32 halves: without jax_enable_x64 the collective would truncate an int64 to 32 bits.
  halves = np.asarray(multihost_utils.broadcast_one_to_all(np.array([value], np.int64).view(np.int32)), np.int32)
  return int(halves.view(np.int64)[0])


def gather_ints(values: Sequence[int]) -> np.ndarray:
  """[processes, len(values)]: every process's `values` (int64, e.g. byte sizes; one collective; [1, n] on one
  process)."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  halves = np.asarray(multihost_utils.process_allgather(local.view(np.int32)), np.int32)  # as in `agree`
  return halves.reshape(jax.process_count(), 2 * len(local)).view(np.int64)


def barrier(name: str) -> None:
  """Waits for every process (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
