"""A trainer's run directory as other jobs read it: orbax checkpoints under `<workdir>/train`, `TRAINING_DONE`.

The refresher, init specs ('ict:', 'realm:'), evaluation and conversion read another job's checkpoints
read-only, and restore only the parameter subtrees they need (orbax partial restore).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from realm_jax import storage

TRAINING_DONE = "TRAINING_DONE"  # written to the workdir when the last step is saved
TRAIN_DIR = "train"  # the trainer's checkpoints, under the workdir


def orbax_dir(path: storage.PathLike) -> str:
  """The directory string orbax gets: `gs://...` as is (tensorstore writes the arrays), local ones absolute."""
  return os.fspath(path) if storage.is_remote(path) else os.path.abspath(os.fspath(path))


def abstract_params(model: nn.Module, example: dict[str, Any], method=None) -> Any:
  """Shapes of `model`'s parameters (no memory, no FLOPs)."""
  init = lambda: model.init(jax.random.key(0), example, method=method)["params"]  # noqa: E731
  return nn.meta.unbox(jax.eval_shape(init))


def read_only_checkpoints(train_dir: storage.PathLike) -> ocp.CheckpointManager:
  """Another job's trainer checkpoints, read-only (the refresher, init specs, evaluation)."""
  return ocp.CheckpointManager(orbax_dir(train_dir), options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=("state", "data"))


def restore_params_subtree(train_dir: storage.PathLike, step: int, path: tuple[str, ...], abstract: Any,
                           sharding) -> Any:
  """Restores only `params[path...]` of a trainer checkpoint (orbax partial restore)."""
  manager = read_only_checkpoints(train_dir)
  item = abstract
  for key in reversed(path):
    item = {key: item}
  item = {"params": item}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), item)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
  params = restored["state"]["params"]
  for key in path:
    params = params[key]
  return params


def latest_checkpoint_step(train_dir: storage.PathLike) -> int | None:
  return read_only_checkpoints(train_dir).latest_step()
