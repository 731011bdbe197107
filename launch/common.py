"""Flags and set-up shared by the launchers: gin files/bindings, workdir, mesh, multi-host."""

from __future__ import annotations

from collections.abc import Sequence

import gin
import jax
from absl import flags, logging
from etils import epath

from launch import cli
from realm_jax import partitioning, storage

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin config files (model gin, then run gin).")
GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'NUM_STEPS = 300'.")
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (see WORKSPACE.md).", required=True)
MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Size of the 'data' mesh axis (-1: all remaining devices).")
MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "Size of the 'model' mesh axis.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host), or 'auto' on Cloud TPU pods."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-host job.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-host job.")



def parse_gin(extra_bindings: Sequence[str] = ()) -> None:
  """Parses --gin_file/--gin_bindings, then `extra_bindings` (a launcher's own flags); a misspelt binding or
  macro fails here, naming it."""
  cli.parse_gin(GIN_FILES.value, [*GIN_BINDINGS.value, *extra_bindings])


def setup(job: str, extra_bindings: Sequence[str] = ()) -> tuple[epath.Path, jax.sharding.Mesh]:
  """Joins the multi-host job, parses gin, checks that the workdir (local or gs://) is new, empty or a realm-jax
  run directory and can be written, builds the mesh and records `<job>.config.gin` in the workdir."""
  partitioning.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  parse_gin(extra_bindings)
  workdir = storage.as_path(WORKDIR.value)
  if jax.process_index() == 0:
    cli.check_workdir(workdir)
    storage.check_writable(workdir)
  mesh = partitioning.make_mesh(MESH_DATA.value, MESH_MODEL.value)
  if jax.process_index() == 0:
    storage.write_once(workdir / f"{job}.config.gin", gin.config_str().encode())
  logging.info("mesh %s over %d devices; workdir %s", dict(mesh.shape), mesh.size, workdir)
  return workdir, mesh


def save_operative_config(workdir: epath.Path, job: str) -> None:
  """The bindings actually used by the run (gin's operative config): `<job>.operative_config.gin`."""
  if jax.process_index() == 0:
    storage.write_once(workdir / f"{job}.operative_config.gin", gin.operative_config_str().encode())
