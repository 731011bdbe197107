"""A trainer's run directory as other jobs read it: orbax checkpoints under `<workdir>/train`, `TRAINING_DONE`,
and `retriever.json` (what the run's block tower is, for the jobs that embed blocks with it).

The refresher, init specs ('ict:', 'realm:'), evaluation and conversion read another job's checkpoints
read-only, and restore only the parameter subtrees they need (orbax partial restore).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from absl import logging

from realm_jax import partitioning, storage
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.retriever import RetrieverConfig

TRAINING_DONE = "TRAINING_DONE"  # written to the workdir when the last step is saved
TRAIN_DIR = "train"  # the trainer's checkpoints, under the workdir
RETRIEVER_DESCRIPTION = "retriever.json"  # what the run's retriever is: `RetrieverDescription`


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


@dataclasses.dataclass(frozen=True)
class RetrieverDescription:
  """What a run's index must be embedded with, written by its trainer to `<workdir>/retriever.json`."""

  retriever: RetrieverConfig
  tower_path: tuple[str, ...]  # the block tower in the trainer's params
  vocab: str  # tokenizer fingerprint of the block store the trainer reads

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self.retriever), "tower_path": list(self.tower_path), "vocab": self.vocab}

  @classmethod
  def from_json(cls, value: dict, where: storage.PathLike) -> RetrieverDescription:
    try:
      fields = {k: v for k, v in value.items() if k not in ("encoder", "tower_path", "vocab")}
      retriever = RetrieverConfig(BertConfig(**value["encoder"]), **fields)
      return cls(retriever, tuple(value["tower_path"]), value["vocab"])
    except (KeyError, TypeError, ValueError) as e:
      raise InputError(f"{where}: not a retriever description ({type(e).__name__}: {e})") from e

  def write(self, workdir: storage.PathLike) -> None:
    """Process 0 records it once; a workdir whose trainer was started with another retriever is refused."""
    path = storage.as_path(workdir) / RETRIEVER_DESCRIPTION
    if path.exists():
      written = RetrieverDescription.from_json(json.loads(storage.read_bytes(path)), path).to_json()
      differ = {k: (v, self.to_json()[k]) for k, v in written.items() if v != self.to_json()[k]}
      if differ:
        raise InputError(f"{path}: this workdir's run was started with " + "; ".join(
            f"{k}={old!r}, now {k}={new!r}" for k, (old, new) in differ.items()) + ": use a new workdir")
    elif jax.process_index() == 0:
      storage.write_json_once(path, self.to_json())
    partitioning.barrier("retriever description written")

  @classmethod
  def read(cls, workdir: storage.PathLike, wait_seconds: float | None = 3600.0,
           poll_seconds: float = 2.0) -> RetrieverDescription:
    """The trainer's description, waiting for a trainer that has not started yet."""
    path = storage.as_path(workdir) / RETRIEVER_DESCRIPTION
    start, logged = time.monotonic(), False
    while not path.exists():
      if wait_seconds is not None and time.monotonic() - start > wait_seconds:
        raise TimeoutError(f"{path}: no trainer wrote its retriever description within {wait_seconds} s")
      if not logged:
        logging.info("waiting for the trainer to write %s ...", path)
        logged = True
      time.sleep(poll_seconds)
    return cls.from_json(json.loads(storage.read_bytes(path)), path)
