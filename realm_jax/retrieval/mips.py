"""Maximum-inner-product search: brute force sharded over the mesh on device, or ScaNN on host.

`search(queries [B, D]) -> (ids [B, k] int32, scores [B, k] float32)`, best first.  Which one a job uses is
`SearchConfig.backend`, looked up in `backends.BACKENDS`.

ExactSearcher keeps the block embeddings sharded row-wise over the mesh axes the rules table's "docs" entry names
(`index_axes`; the default table: every device); each shard finds its own top-k inside `jax.shard_map`, then the
per-shard candidates are merged.  How a shard finds its top-k is `SearchConfig.backend`: "exact", a running top-k
over chunks of `chunk_rows` rows (peak memory batch x chunk scores, not batch x rows per device), or
"approx_max_k", `lax.approx_max_k` over the whole shard (TPU's approximate top-k, whose partial reduction the TPU
compiler fuses into the score matmul).  Among equal scores the lower block id comes first.  `with_index()` is the
searcher over another index of the same shape, placed the same way: the compiled search is reused (no
recompilation).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import mmap
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning
from realm_jax.errors import InputError

_ROW_ALIGN = 8  # chunk sizes are multiples of a TPU tile's 8 sublanes


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  """ScaNN tree + asymmetric hashing (AH), optionally followed by exact reordering.

  `anisotropic_quantization_threshold`: None is ScaNN's default, plain (isotropic) AH.  `reorder`: how many AH
  candidates are re-scored exactly (0: none, the AH scores are returned).  A tree never has more than one leaf
  per 40 rows (`for_rows`).  For 10M+ blocks (REALM's 13.35M): num_leaves ~ sqrt(N) (2000-4000),
  num_leaves_to_search ~ 5-10% of leaves, training_sample_size 250k, dimensions_per_block 2, reorder 4-10x k.
  Below ~100k rows one leaf (`num_leaves=1`: AH scores of every row, then reordering) beats a tree: on the 31k
  small corpus a query's top 5 spreads over many leaves.
  ORQA's own settings are `ORQA_SCANN` (gin: gin/search/scann_orqa.gin).  Recall and queries/s of several
  settings against exact search: BENCHMARKS.md, "Recall/throughput frontier".
  """

  num_leaves: int = 1000
  num_leaves_to_search: int = 100
  training_sample_size: int = 100_000
  dimensions_per_block: int = 2
  anisotropic_quantization_threshold: float | None = 0.2
  reorder: int = 100

  def __post_init__(self):
    for field in ("num_leaves", "num_leaves_to_search", "training_sample_size", "dimensions_per_block"):
      if getattr(self, field) < 1:
        raise InputError(f"ScannConfig.{field}: {getattr(self, field)} is not a positive count")
    if self.num_leaves_to_search > self.num_leaves:
      raise InputError(f"ScannConfig.num_leaves_to_search: {self.num_leaves_to_search} exceeds num_leaves "
                       f"{self.num_leaves}")
    if self.reorder < 0:
      raise InputError(f"ScannConfig.reorder: {self.reorder} is negative (0: no reordering)")

  def for_rows(self, rows: int) -> ScannConfig:
    """The settings a searcher over `rows` rows is built with: at most one leaf per 40 rows (at least one), as
    many searched as the tree has if fewer, training sample at most `rows`."""
    leaves = max(1, min(self.num_leaves, rows // 40))
    return dataclasses.replace(self, num_leaves=leaves, num_leaves_to_search=min(self.num_leaves_to_search, leaves),
                               training_sample_size=min(self.training_sample_size, rows))

  def describe(self) -> str:
    """A short label: tree leaves/searched, AH dims per block (+ anisotropic threshold), reorder."""
    threshold = "" if self.anisotropic_quantization_threshold is None else (
        f" t={self.anisotropic_quantization_threshold:g}")
    reorder = f"reorder {self.reorder}" if self.reorder else "no reorder"
    tree = "no tree (1 leaf)" if self.num_leaves == 1 else f"tree {self.num_leaves}/{self.num_leaves_to_search}"
    return f"{tree}, AH{self.dimensions_per_block}{threshold}, {reorder}"


# ORQA's and REALM's fine-tuning searcher (orqa/utils/scann_utils.py): tree 1000 leaves, 100 searched, 100k
# training sample, plain AH with 2 dimensions per block, no reordering.  In gin: %mips.ORQA_SCANN.
ORQA_SCANN = ScannConfig(num_leaves=1000, num_leaves_to_search=100, training_sample_size=100_000,
                         dimensions_per_block=2, anisotropic_quantization_threshold=None, reorder=0)
gin.constant("mips.ORQA_SCANN", ORQA_SCANN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
  """How a job searches the index: `backend`, a name in `backends.BACKENDS`, and its settings.

  "exact" (default): each device's shard searched as a running top-k over chunks of at most `chunk_rows` rows,
  so a search holds [batch, chunk] scores at a time; the result is the exact top-k.  "approx_max_k":
  `lax.approx_max_k` over the whole shard with `recall_target` (exact `top_k` on CPU and GPU).  For both,
  `storage_dtype="bfloat16"` holds the index in bfloat16 (half the device memory; queries are cast to it and
  scores accumulate in float32); its recall against float32 is measured by bench/scale.py (`bf16_recall`).
  "scann": ScaNN on host, built as `scann` says by the job that publishes the index.
  """

  backend: str = "exact"
  recall_target: float = 0.95
  chunk_rows: int = 65536
  storage_dtype: str = "float32"
  scann: ScannConfig = ScannConfig()

  def __post_init__(self):
    if self.storage_dtype not in ("float32", "bfloat16"):
      raise InputError(f"SearchConfig.storage_dtype: {self.storage_dtype!r}, expected 'float32' or 'bfloat16'")
    if self.chunk_rows < _ROW_ALIGN or self.chunk_rows % _ROW_ALIGN:
      raise InputError(f"SearchConfig.chunk_rows: {self.chunk_rows} is not a positive multiple of {_ROW_ALIGN}")
    if not 0 < self.recall_target <= 1:
      raise InputError(f"SearchConfig.recall_target: {self.recall_target} is not in (0, 1]")


def shard_layout(num_blocks: int, devices: int, chunk_rows: int) -> tuple[int, int]:
  """(rows per device, rows per chunk): the fewest chunks of at most `chunk_rows` rows that cover an even
  share of `num_blocks`, each a multiple of 8 rows; the shard is padded to a whole number of chunks."""
  share = -(-num_blocks // devices)
  chunks = -(-share // chunk_rows)
  chunk = -(-share // chunks)
  chunk = -(-chunk // _ROW_ALIGN) * _ROW_ALIGN
  return chunks * chunk, chunk


def index_axes(mesh: Mesh, rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> tuple[str, ...]:
  """The mesh axes the index's rows are sharded over: the rules table's "docs" entry (None: replicated)."""
  table = dict(rules)
  if "docs" not in table:
    raise InputError(f"the logical axis rules {list(table)} have no 'docs' entry: where the index rows go")
  axes = table["docs"]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  if missing := [a for a in axes if a not in mesh.shape]:
    raise InputError(f"rule 'docs' -> {axes} names mesh axes {missing} that the mesh {dict(mesh.shape)} lacks")
  return axes


def sharded_search(mesh: Mesh, num_blocks: int, rows_per_shard: int, chunk: int, k: int, config: SearchConfig,
                   rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> jax.stages.Wrapped:
  """The jitted `(embeddings [shards x rows_per_shard, D], queries [B, D]) -> (ids, scores)` of the top `k`, the
  embeddings' rows sharded over `index_axes(mesh, rules)`.

  Rows at or past `num_blocks` are padding and score -inf.  Exact: each chunk's top-k is merged into the
  running top-k (which comes first, and holds lower ids), so equal scores keep the lower id as `lax.top_k`
  does over a whole shard; a shard with fewer than `k` real rows fills its candidates with -inf (id num_blocks),
  which the global top-k passes over.
  """
  axes = index_axes(mesh, rules)
  local_k = min(k, rows_per_shard)
  chunk_k = min(local_k, chunk)
  num_chunks = rows_per_shard // chunk

  def scores_of(queries, rows, first_id):
    scores = jnp.einsum("bd,nd->bn", queries, rows, preferred_element_type=jnp.float32)
    ids = first_id + jnp.arange(rows.shape[0], dtype=jnp.int32)
    return jnp.where(ids[None, :] < num_blocks, scores, -jnp.inf)

  def first_row():
    return jax.lax.axis_index(axes) * rows_per_shard if axes else 0

  def approximate_top_k(shard, queries):
    first = first_row()
    top_scores, top = jax.lax.approx_max_k(scores_of(queries, shard, first), local_k,
                                           recall_target=config.recall_target)
    return top_scores, first + top

  def chunked_top_k(shard, queries):
    first = first_row()

    def merge(best, index):
      best_scores, best_ids = best
      start = first + index * chunk
      rows = jax.lax.dynamic_slice_in_dim(shard, index * chunk, chunk)
      chunk_scores, top = jax.lax.top_k(scores_of(queries, rows, start), chunk_k)
      merged_scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
      merged_ids = jnp.concatenate([best_ids, start + top], axis=1)
      top_scores, position = jax.lax.top_k(merged_scores, local_k)
      return (top_scores, jnp.take_along_axis(merged_ids, position, axis=1)), None

    batch = queries.shape[0]
    empty = (jnp.full((batch, local_k), -jnp.inf, jnp.float32), jnp.full((batch, local_k), num_blocks, jnp.int32))
    best, _ = jax.lax.scan(merge, empty, jnp.arange(num_chunks))
    return best

  rows = P(axes or None, None)
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, in_shardings=(NamedSharding(mesh, rows), replicated), out_shardings=replicated)
  def search(embeddings, queries):
    scores, ids = jax.shard_map(
        approximate_top_k if config.backend == "approx_max_k" else chunked_top_k, mesh=mesh, in_specs=(rows, P()),
        out_specs=(P(None, axes or None), P(None, axes or None)), check_vma=False,
    )(embeddings, queries.astype(embeddings.dtype))
    best, position = jax.lax.top_k(scores, k)
    return jnp.take_along_axis(ids, position, axis=1), best

  return search


def release_mapped_rows(array: np.ndarray, start: int, stop: int) -> None:
  """Drops rows [start, stop) of a memory-mapped array from this process's resident memory (`madvise`
  MADV_DONTNEED; the file's pages stay in the page cache and fault back in if read again).  A no-op for an
  array that is not a memory map."""
  if not isinstance(array, np.memmap) or not isinstance(array.base, mmap.mmap) or stop <= start:
    return
  first = array.offset % mmap.ALLOCATIONGRANULARITY + start * array.strides[0]  # where the rows are in the map
  begin = first // mmap.PAGESIZE * mmap.PAGESIZE
  end = min(len(array.base), first + (stop - start) * array.strides[0])
  array.base.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class ExactSearcher:
  """Brute-force inner products over row-sharded embeddings, per-shard top-k (`SearchConfig`), global merge.

  The rows are sharded over the mesh axes of the rules table's "docs" entry (`index_axes`) and replicated over the
  others."""

  def __init__(self, embeddings: np.ndarray, mesh: Mesh, config: SearchConfig = SearchConfig(),
               rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES):
    self.mesh, self.config, self.rules = mesh, config, rules
    self.num_blocks, self.dim = embeddings.shape
    axes = index_axes(mesh, rules)
    self.shards = math.prod(mesh.shape[a] for a in axes)
    self.rows_per_shard, self.chunk = shard_layout(self.num_blocks, self.shards, config.chunk_rows)
    self.sharding = NamedSharding(mesh, P(axes or None, None))
    self.embeddings = self.place(embeddings)
    self._compiled: dict[int, jax.stages.Wrapped] = {}

  def place(self, embeddings: np.ndarray) -> jax.Array:
    """Shards the rows as `self.sharding` says, padded to whole chunks on every shard.

    Only this process's devices' rows are read (a memory-mapped index is never read whole), one device's
    slice at a time, and a slice's mapped pages are released once copied (`release_mapped_rows`), so a swap
    holds at most one device's rows beyond the placed array."""
    if embeddings.shape != (self.num_blocks, self.dim):
      raise ValueError(f"index shape {embeddings.shape} != {(self.num_blocks, self.dim)}; cannot hot-swap")
    padded_rows = self.rows_per_shard * self.shards

    def device_rows(index: tuple[slice, ...]) -> np.ndarray:
      start, stop, _ = index[0].indices(padded_rows)
      rows = np.zeros((stop - start, self.dim), np.float32)
      real = embeddings[start : min(stop, self.num_blocks)]
      rows[: len(real)] = real
      release_mapped_rows(embeddings, start, start + len(real))
      return rows[(slice(None), *index[1:])].astype(self.config.storage_dtype, copy=False)

    # Every process holds the same verified index, so each fills its own shards, one device at a time (a
    # callback for all devices at once would hold every slice until the last is read).  Not a global
    # `device_put`: across processes it runs an equality collective, which raced the trainer's collectives when
    # the index poller's thread loaded an index (gloo "collective mismatch" abort).
    shape = (padded_rows, self.dim)
    shards = [jax.device_put(device_rows(index), device)
              for device, index in self.sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, self.sharding, shards)

  def with_index(self, embeddings: np.ndarray, assets: Path | None = None) -> ExactSearcher:
    """This searcher over other embeddings of the same shape, placed the same way: it shares the compiled searches
    (no recompilation), and this one is unchanged until it is dropped.  `assets`: none are read."""
    new = copy.copy(self)
    new.embeddings = self.place(embeddings)
    return new

  def _search_fn(self, k: int):
    if k not in self._compiled:
      self._compiled[k] = sharded_search(self.mesh, self.num_blocks, self.rows_per_shard, self.chunk, k, self.config,
                                         self.rules)
    return self._compiled[k]

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k > self.num_blocks:
      raise ValueError(f"k={k} exceeds the {self.num_blocks} indexed blocks")
    ids, scores = self._search_fn(k)(self.embeddings, np.asarray(queries, np.float32))
    return np.asarray(ids), np.asarray(scores)


class ScannSearcher:
  """ScaNN searcher over host embeddings (dot product)."""

  def __init__(self, searcher, num_blocks: int):
    self._searcher = searcher
    self.num_blocks = num_blocks

  @classmethod
  def build(cls, embeddings: np.ndarray, config: ScannConfig = ScannConfig(), k: int = 10) -> ScannSearcher:
    """A dot-product ScaNN searcher over `embeddings`, built as `config.for_rows(len(embeddings))` says."""
    from scann.scann_ops.py import scann_ops_pybind

    n = len(embeddings)
    config = config.for_rows(n)
    builder = scann_ops_pybind.builder(np.ascontiguousarray(embeddings, np.float32), k, "dot_product")
    threshold = config.anisotropic_quantization_threshold
    builder = builder.tree(
        num_leaves=config.num_leaves,
        num_leaves_to_search=config.num_leaves_to_search,
        training_sample_size=config.training_sample_size,
    ).score_ah(config.dimensions_per_block,
               anisotropic_quantization_threshold=float("nan") if threshold is None else threshold)
    searcher = (builder.reorder(config.reorder) if config.reorder else builder).build()
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

  def with_index(self, embeddings: np.ndarray, assets: Path | None) -> ScannSearcher:
    """The searcher of another index: its serialized assets loaded (nothing is compiled)."""
    if assets is None:
      raise InputError("a ScaNN searcher needs the index's ScaNN assets")
    return ScannSearcher.load(assets, len(embeddings))

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(np.asarray(queries, np.float32))
    ids, scores = self._searcher.search_batched(queries, final_num_neighbors=k)
    return ids.astype(np.int32), scores.astype(np.float32)


def exact_top_k_numpy(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference brute force on host (for tests and recall measurements); equal scores: the lower id first."""
  scores = queries @ embeddings.T
  kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
  ids = np.empty((len(scores), k), np.int64)
  for row, (row_scores, threshold) in enumerate(zip(scores, kth, strict=True)):
    candidates = np.flatnonzero(row_scores >= threshold)
    ids[row] = candidates[np.lexsort((candidates, -row_scores[candidates]))[:k]]
  return ids.astype(np.int32), np.take_along_axis(scores, ids, 1)
