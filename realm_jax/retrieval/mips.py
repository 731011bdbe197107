"""Maximum-inner-product search behind one interface: exact sharded search on device, or ScaNN on host.

`search(queries [B, D]) -> (ids [B, k] int32, scores [B, k] float32)`, best first.

ExactSearcher keeps the block embeddings sharded row-wise over every mesh device ("docs" in the
rules table); each device scores its rows and keeps its own top-k inside `jax.shard_map`
(`lax.approx_max_k` on TPU when `approximate=True`, exact `lax.top_k` otherwise), then the
per-device candidates are merged.  `swap()` replaces the embeddings with a new array of the same
shape and sharding, so the compiled search is reused (no recompilation).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax.errors import InputError


class Searcher(Protocol):
  num_blocks: int

  def search(self, queries: np.ndarray | jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _all_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


class ExactSearcher:
  """Brute-force inner products over row-sharded embeddings, per-shard top-k, global merge."""

  def __init__(self, embeddings: np.ndarray, mesh: Mesh, approximate: bool = False, recall_target: float = 0.95):
    self.mesh = mesh
    self.num_blocks, self.dim = embeddings.shape
    shards = mesh.size
    self.rows_per_shard = -(-self.num_blocks // shards)
    self.sharding = NamedSharding(mesh, P(_all_axes(mesh), None))
    self.approximate, self.recall_target = approximate, recall_target
    self.embeddings = self.place(embeddings)
    self._compiled: dict[int, jax.stages.Wrapped] = {}

  def place(self, embeddings: np.ndarray) -> jax.Array:
    """Pads rows to a multiple of the device count and shards them over the whole mesh."""
    if embeddings.shape != (self.num_blocks, self.dim):
      raise ValueError(f"index shape {embeddings.shape} != {(self.num_blocks, self.dim)}; cannot hot-swap")
    padded_rows = self.rows_per_shard * self.mesh.size
    padded = np.zeros((padded_rows, self.dim), np.float32)
    padded[: len(embeddings)] = embeddings
    # Every process holds the same verified index, so each fills its own shards.  Not `device_put`: across
    # processes it runs an equality collective, which raced the trainer's collectives when the index
    # reader's thread loaded an index (gloo "collective mismatch" abort).
    return jax.make_array_from_callback(padded.shape, self.sharding, lambda index: padded[index])

  def swap(self, embeddings: np.ndarray) -> None:
    """New embeddings of the same shape: the compiled search is reused."""
    self.embeddings = self.place(embeddings)

  def _search_fn(self, k: int):
    if k in self._compiled:
      return self._compiled[k]
    axes, rows, n = _all_axes(self.mesh), self.rows_per_shard, self.num_blocks
    local_k = min(k, rows)
    approximate, recall = self.approximate, self.recall_target

    def local_top_k(shard, queries):
      scores = jnp.einsum("bd,nd->bn", queries, shard, preferred_element_type=jnp.float32)
      ids = jax.lax.axis_index(axes) * rows + jnp.arange(rows)
      scores = jnp.where(ids[None, :] < n, scores, -jnp.inf)
      if approximate:
        top_scores, top = jax.lax.approx_max_k(scores, local_k, recall_target=recall)
      else:
        top_scores, top = jax.lax.top_k(scores, local_k)
      return top_scores, ids[top].astype(jnp.int32)

    @functools.partial(jax.jit, in_shardings=(self.sharding, NamedSharding(self.mesh, P())),
                       out_shardings=NamedSharding(self.mesh, P()))
    def search(embeddings, queries):
      scores, ids = jax.shard_map(
          local_top_k, mesh=self.mesh, in_specs=(P(axes, None), P()),
          out_specs=(P(None, axes), P(None, axes)), check_vma=False,
      )(embeddings, queries.astype(jnp.float32))
      best, position = jax.lax.top_k(scores, k)
      return jnp.take_along_axis(ids, position, axis=1), best

    self._compiled[k] = search
    return search

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k > self.num_blocks:
      raise ValueError(f"k={k} exceeds the {self.num_blocks} indexed blocks")
    ids, scores = self._search_fn(k)(self.embeddings, np.asarray(queries, np.float32))
    return np.asarray(ids), np.asarray(scores)


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  """ScaNN tree + asymmetric hashing + exact reordering.

  For 10M+ blocks (REALM's 13.35M): num_leaves ~ sqrt(N) (2000-4000), num_leaves_to_search
  ~ 5-10% of leaves, training_sample_size 250k, dimensions_per_block 2, reorder 4-10x k.
  ORQA used 1000 leaves / 100 searched / 100k samples / 2 dims per block.
  """

  num_leaves: int = 1000
  num_leaves_to_search: int = 100
  training_sample_size: int = 100_000
  dimensions_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  reorder: int = 100


class ScannSearcher:
  """ScaNN searcher over host embeddings (dot product)."""

  def __init__(self, searcher, num_blocks: int):
    self._searcher = searcher
    self.num_blocks = num_blocks

  @classmethod
  def build(cls, embeddings: np.ndarray, config: ScannConfig = ScannConfig(), k: int = 10) -> ScannSearcher:
    from scann.scann_ops.py import scann_ops_pybind

    n = len(embeddings)
    leaves = max(1, min(config.num_leaves, n // 40))
    builder = scann_ops_pybind.builder(np.ascontiguousarray(embeddings, np.float32), k, "dot_product")
    searcher = (
        builder.tree(
            num_leaves=leaves,
            num_leaves_to_search=max(1, min(config.num_leaves_to_search, leaves)),
            training_sample_size=min(config.training_sample_size, n),
        )
        .score_ah(config.dimensions_per_block,
                  anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
        .reorder(config.reorder)
        .build()
    )
    return cls(searcher, n)

  def serialize(self, directory: str | Path) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    self._searcher.serialize(str(directory), relative_path=True)

  @classmethod
  def load(cls, directory: str | Path, num_blocks: int) -> ScannSearcher:
    """Loads serialized ScaNN assets; refuses pickle files (ScaNN would unpickle docids)."""
    from scann.scann_ops.py import scann_ops_pybind

    pickles = sorted(p.name for p in Path(directory).glob("*.pkl"))
    if pickles:
      raise InputError(f"{directory}: refusing ScaNN assets containing pickle files {pickles}")
    return cls(scann_ops_pybind.load_searcher(str(directory)), num_blocks)

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(np.asarray(queries, np.float32))
    ids, scores = self._searcher.search_batched(queries, final_num_neighbors=k)
    return ids.astype(np.int32), scores.astype(np.float32)


def exact_top_k_numpy(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference brute force on host (for tests and recall measurements)."""
  scores = queries @ embeddings.T
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
  ids = np.take_along_axis(top, order, 1)
  return ids.astype(np.int32), np.take_along_axis(scores, ids, 1)
