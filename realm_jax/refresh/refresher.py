"""The index refresh job: newest trainer checkpoint -> re-embed every block -> build -> publish.

Runs beside the trainer (REALM's asynchronous index builder).  What to embed with comes from the run itself:
the trainer writes `<workdir>/retriever.json` (`RetrieverDescription`: tower, block length, projection,
LayerNorm eps, vocabulary, ...), and a refresh-job setting that disagrees with it is refused.  The refresher
restores only the block tower's parameters from the trainer's orbax checkpoints (partial restore), embeds all
blocks with a jit step sharded over the mesh, builds the chosen MIPS backend and publishes the index with a
commit object (see `realm_jax.retrieval.index`).  Restarting resumes: checkpoints already indexed are skipped
and the data of a publish it was killed in is removed.

A pass is a pipeline: a background thread builds and places the input batches (`BlockStore.retriever_inputs`,
`RefreshConfig.prefetch` ahead) while the device embeds and the previous batch's embeddings are fetched.  Its
compiled steps (one per length group) are kept across passes (`BlockEmbedder`) and across restarts (JAX's
persistent compilation cache, `run_refresh(compilation_cache_dir=...)`).  Whether the pass is superseded is
asked about every `abandon_check_seconds`, not every batch (`AbandonCheck`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from realm_jax import partitioning, storage
from realm_jax.checkpoints.train_dir import (
  RETRIEVER_DESCRIPTION,
  TRAINING_DONE,
  RetrieverDescription,
  read_only_checkpoints,
  restore_params_subtree,
)
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import embedding_batches
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import get_backend
from realm_jax.retrieval.mips import SearchConfig


@dataclasses.dataclass
class RefreshConfig:
  retriever: RetrieverConfig  # what embeds the blocks: the trainer's block tower, at its block_len
  tower_path: Sequence[str] = ("query_tower",)  # where the block tower lives in the trainer's params
  batch_size: int = 256
  # Blocks are embedded in groups of equal length, rounded up to a multiple of `length_bucket` (one compiled
  # shape per group; 0: every block padded to block_len).  Padding never changes an embedding (masked).
  length_bucket: int = 32
  search: SearchConfig = SearchConfig()  # its backend's assets are published beside the rows (ScaNN: its index)
  keep: int = 3
  abandon_check_seconds: float = 30.0  # how often a pass asks whether it is superseded (`AbandonCheck`)
  prefetch: int = 2  # input batches a background thread builds ahead of the device
  rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES  # the trainer's, for a job inside it (bootstrap)
  slowdown: float = 1.0  # > 1: each index is held back (slowdown - 1) x its pass (`Refresher.hold_back`)


@dataclasses.dataclass
class RefreshJob:
  """The refresh job's own settings; the retriever's come from the run (`RetrieverDescription`).

  encoder / projection_size / layer_norm_eps / tower_path / block_len: None takes the run's value; a value
  given here must equal it (a refresher that embeds with another tower or length is refused, both named).
  `slowdown` > 1 makes the job that many times slower following the trainer (Table 2's "30x stale MIPS",
  gin/ablations/slow_refresh.gin): see `Refresher.hold_back`.
  """

  batch_size: int = 256
  length_bucket: int = 32
  search: SearchConfig = SearchConfig()
  keep: int = 3
  abandon_check_seconds: float = 30.0
  prefetch: int = 2
  encoder: BertConfig | None = None
  projection_size: int | None = None
  layer_norm_eps: float | None = None
  tower_path: Sequence[str] | None = None
  block_len: int | None = None
  slowdown: float = 1.0
  description_wait_seconds: float | None = 3600.0  # how long to wait for the trainer's retriever.json (None: ever)

  def config(self, run: RetrieverDescription, where: storage.PathLike) -> RefreshConfig:
    """The complete embedding config: the run's retriever with this job's batching and backend."""
    for field in ("encoder", "projection_size", "layer_norm_eps", "tower_path", "block_len"):
      mine = getattr(self, field)
      theirs = run.tower_path if field == "tower_path" else getattr(run.retriever, field)
      if mine is not None and (tuple(mine) if field == "tower_path" else mine) != theirs:
        raise InputError(f"refresher.RefreshJob.{field} = {mine!r}, but the trainer of this run wrote "
                         f"{field} = {theirs!r} in {where}; drop the binding or use that value")
    if self.slowdown < 1:
      raise InputError(f"refresher.RefreshJob.slowdown = {self.slowdown}: a factor >= 1 (1: as fast as it can)")
    return RefreshConfig(run.retriever, run.tower_path, self.batch_size, self.length_bucket, self.search,
                         self.keep, self.abandon_check_seconds, self.prefetch, slowdown=self.slowdown)


def embed_step(config: RefreshConfig, mesh: Mesh) -> Callable[[dict, dict[str, jax.Array]], jax.Array]:
  """The jit embedding step: (tower params, block inputs [B, block_len]) -> [B, projection_size], sharded as the
  inputs (each process fetches the rows it fed, `partitioning.local_rows`)."""
  tower = config.retriever.tower()

  def embed(p, b):
    with nn.logical_axis_rules(config.rules):
      return tower.apply({"params": p}, b["input_ids"], b["input_mask"], b["segment_ids"], True)

  return jax.jit(embed, out_shardings=partitioning.data_sharding(mesh, 2))


class AbandonCheck:
  """Asks `abandon` about every `every_seconds` of a pass; all processes take its answer at the same batch.

  Every process calls it before every batch, and only at scheduled batches does it do anything: one collective
  (`partitioning.agree`) carrying process 0's decision, -1 (abandon now) or the batch of the next check.  The
  schedule is made of agreed values only, so the processes run that collective at the same batches whatever
  their clocks say (no clock is ever compared across processes).  Process 0 calls `abandon` (file-system reads)
  only when its clock says `every_seconds` have passed since its last call (less half a batch, so a check that
  lands a little early still asks), so a pass of T seconds asks at most about 1 + T / every_seconds times.  It
  schedules the next check at the first batch it expects to start after that time: a batch's cost is taken as
  proportional to its input length, at the seconds per input position measured since the previous check, so
  moving on to a group of longer blocks does not delay a check much.  A check that lands early just schedules
  another.  Batch 0 is always checked (a pass started after training finished is dropped at once); batch 1
  measures the first rate.
  """

  def __init__(self, abandon: Callable[[], bool], lengths: Sequence[int], every_seconds: float,
               clock: Callable[[], float] = time.monotonic):
    self.abandon, self.every_seconds, self.clock = abandon, every_seconds, clock
    self.cost = np.concatenate([[0], np.cumsum(lengths, dtype=np.float64)])  # input positions before batch i
    self.next_check = 0
    self.asked_at: float | None = None  # process 0: when `abandon` was last called
    self.seconds_per_position: float | None = None
    self.measured: tuple[int, float] | None = None  # process 0: (batch, time) of the previous check

  def __call__(self, batch: int) -> bool:
    """Whether to abandon the pass before `batch` (every process, every batch, in order)."""
    if batch != self.next_check:
      return False
    self.next_check = partitioning.agree(self._decide(batch) if jax.process_index() == 0 else 0)
    return self.next_check < 0

  def _decide(self, batch: int) -> int:
    now = self.clock()
    if self.measured is not None:
      before, then = self.measured
      self.seconds_per_position = (now - then) / (self.cost[batch] - self.cost[before])
    self.measured = (batch, now)
    half_batch = 0.5 * (self.seconds_per_position or 0.0) * (self.cost[batch + 1] - self.cost[batch])
    if self.asked_at is None or now - self.asked_at >= self.every_seconds - half_batch:
      if self.abandon():
        return -1
      self.asked_at = now
    if self.seconds_per_position is None:
      return batch + 1
    due = self.cost[batch] + (self.asked_at + self.every_seconds - now) / max(self.seconds_per_position, 1e-12)
    return max(batch + 1, int(np.searchsorted(self.cost, due)))


T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
  """`items`, made by a background thread at most `depth` ahead of the consumer; an exception making them is
  raised here.  Closing the generator stops the thread."""
  ready: queue.Queue = queue.Queue(max(1, depth))
  stop, end = threading.Event(), object()

  def produce():
    try:
      for item in items:
        ready.put((item, None))
        if stop.is_set():
          return
      ready.put((end, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      ready.put((end, e))

  thread = threading.Thread(target=produce, name="refresh-inputs", daemon=True)
  thread.start()
  try:
    while True:
      item, error = ready.get()
      if error is not None:
        raise error
      if item is end:
        return
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting to put
      with contextlib.suppress(queue.Empty):
        ready.get(timeout=0.05)


class BlockEmbedder:
  """Embeds whole block stores with one tower config on one mesh, batches sharded over the "data" axis.

  Its jit step (`embed_step`, or a stand-in `step` with the same contract) compiles once per input length and is
  reused by every pass.  Each process feeds only its blocks (`partitioning.process_block_range`) as its rows of
  every batch, and keeps only their embeddings: its memory grows with its share of the index, not the index.
  """

  def __init__(self, config: RefreshConfig, mesh: Mesh,
               step: Callable[[dict, dict[str, jax.Array]], jax.Array] | None = None):
    data_size = mesh.shape["data"]
    if config.batch_size % data_size:
      raise InputError(f"index batch_size {config.batch_size} must be a multiple of the mesh's data axis "
                       f"({data_size})")
    self.config, self.mesh = config, mesh
    self.step = step or embed_step(config, mesh)
    rows = partitioning.process_rows(mesh, config.batch_size)
    self.local_batch = rows.stop - rows.start

  def __call__(self, params: dict, store: BlockStore, desc: str = "embed",
               abandon: Callable[[], bool] | None = None) -> index_lib.EmbeddedRows | None:
    """This process's rows of the [num_blocks, projection_size] float32 embeddings; None when `abandon` (asked
    about every `abandon_check_seconds`, see `AbandonCheck`) said yes."""
    config = self.config
    block_len = config.retriever.block_len
    batches = embedding_batches(store.retriever_lengths(block_len), config.batch_size, block_len,
                                config.length_bucket, jax.process_index(), jax.process_count())
    check = AbandonCheck(abandon, [n for n, _ in batches], config.abandon_check_seconds) if abandon else None
    start, stop = partitioning.process_block_range(store.num_blocks)
    out = np.zeros((stop - start, config.retriever.projection_size), np.float32)

    def fetch(ids: np.ndarray, embedded: jax.Array) -> None:
      out[ids - start] = partitioning.local_rows(embedded)[: len(ids)]

    began = time.perf_counter()
    inputs = prefetched(self._inputs(store, batches, start), config.prefetch)
    with contextlib.closing(inputs), jax.set_mesh(self.mesh):
      params = jax.device_put(params, NamedSharding(self.mesh, P()))
      pending = None
      for i, (_, ids) in enumerate(tqdm(batches, desc=desc, unit="batch", mininterval=2.0,
                                        disable=jax.process_index() != 0)):
        if check is not None and check(i):
          return None
        # Dispatched: runs while the previous batch is fetched (two steps in flight at most; XLA:CPU's collectives
        # can deadlock with dozens).
        embedded = self.step(params, next(inputs))
        if pending is not None:
          fetch(*pending)
        pending = ids, embedded
      if pending is not None:
        fetch(*pending)
    seconds = time.perf_counter() - began
    logging.info("embedded blocks %d:%d of %d in %.1f s (%.1f blocks/s)", start, stop, store.num_blocks, seconds,
                 (stop - start) / seconds)
    return index_lib.EmbeddedRows(start, out, store.num_blocks)

  def _inputs(self, store: BlockStore, batches: list[tuple[int, np.ndarray]],
              first: int) -> Iterator[dict[str, jax.Array]]:
    """This process's rows of every batch (short ones padded with their last block, empty ones with block
    `first`), placed on the mesh."""
    for length, ids in batches:
      local = np.pad(ids if len(ids) else np.array([min(first, store.num_blocks - 1)]),
                     (0, self.local_batch - max(1, len(ids))), mode="edge")
      yield partitioning.shard_batch(store.retriever_inputs(local, length), self.mesh)


def embed_all_blocks(
    params: dict, config: RefreshConfig, store: BlockStore, mesh: Mesh, desc: str = "embed",
    abandon: Callable[[], bool] | None = None,
) -> index_lib.EmbeddedRows | None:
  """One pass of a new `BlockEmbedder` (a job embedding once: the bootstrap and fine-tuning indexes).

  Blocks of similar length are embedded together at that length (`RefreshConfig.length_bucket`)."""
  return BlockEmbedder(config, mesh)(params, store, desc, abandon)


class Refresher:
  """Watches `<train_workdir>/train`, publishes indexes to `<index_dir>`.

  As fast as it can (`slowdown` 1), each pass embeds the newest checkpoint and the next starts at once: an index
  of pass time T is T to 2T old while it is searched (1.5 T on average, in trainer steps: T x steps/s).  With
  `config.slowdown` = f it is an f times slower index builder: each pass's index is held back (f - 1) T before
  it is published (`hold_back`), so every index is fT to 2fT old, f times staler, and refreshes come f times
  less often (Table 2's "30x stale MIPS" against the paper's ~500-step refresh: f = 30).
  """

  def __init__(self, train_workdir: storage.PathLike, index_dir: storage.PathLike, store: BlockStore, mesh: Mesh,
               config: RefreshConfig, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    self.train_workdir, self.index_dir = storage.as_path(train_workdir), storage.as_path(index_dir)
    self.clock, self.sleep = clock, sleep
    self.backend = get_backend(config.search)  # the assets it publishes
    self.store, self.mesh, self.config = store, mesh, config
    self.embedder = BlockEmbedder(config, mesh)  # its compiled steps serve every pass
    self.checkpoints = read_only_checkpoints(self.train_workdir / "train")
    stale = index_lib.remove_uncommitted(index_dir) if jax.process_index() == 0 else []
    if stale:
      logging.warning("removed the data of publishes a previous refresher was killed in: %s", stale)

  def restore_block_tower(self, step: int) -> dict:
    """Only the block tower's parameters (orbax partial restore), replicated."""
    return restore_params_subtree(
        self.train_workdir / "train", step, tuple(self.config.tower_path),
        self.config.retriever.abstract_tower_params(), NamedSharding(self.mesh, P()),
    )

  def refresh(self, step: int, abandon_if_superseded: bool = False, hold: bool = False) -> epath.Path | None:
    """Embeds all blocks with checkpoint `step` and publishes index `step`, each process its own rows.

    With `abandon_if_superseded`, a pass still running when the trainer has finished with a newer final
    checkpoint is dropped (None): nobody will train on that index, and the final one is wanted sooner.  With
    `hold`, the index is held back as `config.slowdown` says (`hold_back`) before it is published.
    """
    began = self.clock()
    params = self.restore_block_tower(step)
    abandon = (lambda: self.superseded(step)) if abandon_if_superseded else None
    rows = self.embedder(params, self.store, desc=f"embed@{step}", abandon=abandon)
    if rows is None or (hold and not self.hold_back(step, (self.config.slowdown - 1) * (self.clock() - began))):
      logging.info("abandoned index %d: training is done and its final checkpoint is newer", step)
      return None
    return index_lib.publish_index(self.index_dir, step, rows, self.store, self.backend, self.config.keep)

  def hold_back(self, step: int, seconds: float) -> bool:
    """Waits `seconds` (process 0's count: its pass took `seconds` / (slowdown - 1)) before index `step` is
    published, looking every `abandon_check_seconds` whether training is done: then the index is published at
    once if it is of the final checkpoint (nobody trains on it, the final one is wanted soon), and dropped
    (False) if that checkpoint is newer.  Every process sleeps as long as process 0 says."""
    if self.config.slowdown <= 1:  # the same on every process (`seconds` is process 0's)
      return True
    logging.info("holding index %d back %.1f s (slowdown %gx)", step, seconds, self.config.slowdown)
    deadline = self.clock() + seconds
    while True:
      decision = 0  # process 0: -1 drop, 0 publish, else milliseconds to wait before looking again
      if jax.process_index() == 0:
        left = deadline - self.clock()
        if self.superseded(step):
          decision = -1
        elif left > 0 and not self.training_done():
          decision = max(1, int(1000 * min(left, self.config.abandon_check_seconds)))
      decision = partitioning.agree(decision)
      if decision <= 0:
        return decision == 0
      self.sleep(decision / 1000)

  def pending_step(self) -> int | None:
    """Newest trainer checkpoint not yet indexed."""
    newest = self.newest_checkpoint()
    done = index_lib.committed_steps(self.index_dir)
    if newest is None or (done and newest <= done[-1]):
      return None
    return newest

  def training_done(self) -> bool:
    return (self.train_workdir / TRAINING_DONE).exists()

  def superseded(self, step: int) -> bool:
    """Whether the trainer has finished and its final checkpoint is newer than `step`."""
    if not self.training_done():
      return False
    newest = self.newest_checkpoint()
    return newest is not None and newest > step

  def newest_checkpoint(self, attempts: int = 5) -> int | None:
    """The trainer's newest checkpoint step.  Listing races with the trainer deleting its oldest
    checkpoint (`keep_checkpoints`); a step that vanished mid-listing is retried, not fatal."""
    for attempt in range(attempts - 1):
      try:
        self.checkpoints.reload()
        return self.checkpoints.latest_step()
      except FileNotFoundError as e:
        logging.info("checkpoint listing raced with the trainer's garbage collection (%s); retrying", e)
        time.sleep(0.1 * (attempt + 1))
    self.checkpoints.reload()
    return self.checkpoints.latest_step()

  def run(self, once: bool = False, step: int | None = None, poll_seconds: float = 10.0,
          max_refreshes: int | None = None) -> list[int]:
    """Refreshes until the trainer is done (or once / for one step); returns the published steps."""
    if step is not None:
      if step in index_lib.committed_steps(self.index_dir):
        logging.info("index step %d is already committed in %s", step, self.index_dir)
        return []
      self.refresh(step)
      return [step]
    published: list[int] = []
    while True:
      # Read before looking for checkpoints (the final one is seen); process 0 decides for all.
      done = bool(partitioning.agree(int(self.training_done())))
      pending = self.pending_step()
      pending = partitioning.agree(-1 if pending is None else pending)
      if pending >= 0:
        if self.refresh(pending, abandon_if_superseded=True, hold=True) is None:
          continue  # the trainer finished meanwhile: index its final checkpoint instead
        published.append(pending)
        if once or (max_refreshes and len(published) >= max_refreshes):
          return published
        continue
      if done or once:
        return published
      self.sleep(poll_seconds)


def run_refresh(
    workdir: str,
    block_store: str,
    mesh: Mesh,
    job: RefreshJob | None = None,
    once: bool = False,
    step: int | None = None,
    poll_seconds: float = 10.0,
    compilation_cache_dir: str | None = None,
) -> list[int]:
  """Refresh job for the trainer in `workdir` (its `retriever.json` says what to embed with); indexes go to
  `<workdir>/index`.

  `compilation_cache_dir` (None: off; gin/runs/refresh.gin: ~/.cache/realm_jax/jax) turns on JAX's persistent
  compilation cache there: a restarted refresher loads its compiled embedding steps instead of compiling them
  again (steps compiling in under `jax_persistent_cache_min_compile_time_secs`, 1 s, are not kept).  JAX writes
  entries from process 0 only, so on a pod a directory local to each host serves process 0's host and the other
  hosts compile as before; a shared one (gs://BUCKET/jax_cache: JAX reads and writes it through etils.epath)
  serves every host.  JAX runs what it finds there: point it only at a location that nobody else can write.
  """
  if compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(compilation_cache_dir))
  store = BlockStore(block_store)
  job = job or RefreshJob()
  run = RetrieverDescription.read(workdir, job.description_wait_seconds)
  if run.vocab != store.manifest["tokenizer"]:
    raise InputError(f"block store {store.path} was built with tokenizer {store.manifest['tokenizer']}, but the "
                     f"trainer of {workdir} reads blocks of tokenizer {run.vocab}")
  config = job.config(run, storage.as_path(workdir) / RETRIEVER_DESCRIPTION)
  refresher = Refresher(workdir, storage.as_path(workdir) / "index", store, mesh, config)
  return refresher.run(once=once, step=step, poll_seconds=poll_seconds)
