"""REALM pre-training run: masked queries -> retrieval on the live index -> marginal MLM step.

Each step: (1) the grain iterator yields salient-span masked queries; (2) `RealmRun.complete` embeds
them with the CURRENT query tower, searches the newest published index (stale block embeddings,
REALM's off-policy selection) deep enough that removing trivial retrievals still fills every candidate
slot (`data.realm.search_depth`; with `RealmSpec.rerank_depth`, at least that many, re-ordered by the current
block tower), removes them, prepends the null block and builds candidate/joint inputs;
(3) the jit step re-scores the candidates with fresh parameters so gradients reach both towers and the reader.
Indexes are hot-swapped between steps.  Logged besides the loss: MLM accuracy, retrieval utility (marginal vs
null-block log-likelihood), p(null), `span_retrieved` (share of queries whose masked span is in a candidate the
reader saw), index step and staleness, examples/s; with held-out blocks (`eval_blocks`), the held-out `eval_*`
metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning, storage
from realm_jax.checkpoints import init as init_lib
from realm_jax.checkpoints.train_dir import RetrieverDescription
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.realm import (
  MaskedQueries,
  block_inputs,
  candidate_inputs,
  most_blocks_per_uid,
  realm_query_dataset,
  rerank,
  search_depth,
  select_candidates,
  span_in_candidates,
)
from realm_jax.errors import InputError
from realm_jax.eval.realm_mlm import HeldOutMlm
from realm_jax.objectives.realm import RealmModel, RealmSpec
from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import get_backend
from realm_jax.retrieval.index import INDEX_DIR
from realm_jax.retrieval.mips import SearchConfig
from realm_jax.train.live_index import LiveIndexConfig, following
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, TrainHooks, TrainState, make_trainer

QUERY_CORPUS = "queries.json"  # the block store the run's masked queries come from (written once)


@dataclasses.dataclass
class RealmRun:
  """A REALM run's host-side work each step: candidates for the batch's queries from the live index.

  `store` is the knowledge store (the index's blocks), `query_store` the store the batch's `block_id`s index
  (the query corpus; None: `store`)."""

  spec: RealmSpec
  store: BlockStore
  mesh: Any
  search: SearchConfig = SearchConfig()
  rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES  # the trainer's: where the index rows go ("docs")
  query_store: BlockStore | None = None

  def __post_init__(self):
    self.model = self.spec.model()
    self.query_uids = None if self.query_store is None else self.query_store.arrays["uids"]
    self.live = index_lib.LiveIndex(self.mesh, self.search, self.rules)
    self.copies = most_blocks_per_uid(self.store.arrays["uids"])  # blocks a query's own content may fill
    replicated = NamedSharding(self.mesh, P())
    self._embed_queries = jax.jit(lambda p, q: self.model.apply(
        {"params": p}, q, True, method=RealmModel.embed_queries), out_shardings=replicated)
    self._embed_blocks = jax.jit(lambda p, b: self.model.apply(
        {"params": p}, b, True, method=RealmModel.embed_blocks), out_shardings=replicated)

  def prepare_batch(self, state: TrainState, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Completes this process's part of the batch; all processes search the whole batch's queries."""
    return self.complete(state.params, batch)

  def complete(self, params: Any, batch: dict[str, np.ndarray],
               exclude_trivial: bool | None = None) -> dict[str, np.ndarray]:
    """`prepare_batch` with the given parameters; `exclude_trivial` (None: the spec's) overrides the spec's
    setting (the held-out evaluation always excludes the query's own block)."""
    spec, c = self.spec, self.spec.data
    exclude_trivial = spec.exclude_trivial if exclude_trivial is None else exclude_trivial
    size = len(batch["block_id"])
    if not spec.retrieval:  # ablation: the null block only
      candidates, weights = np.full((size, 1), -1, np.int64), np.ones(size, np.float32)
    else:
      queries = {k: batch[f"query_{k}"] for k in FEATURES}
      with jax.set_mesh(self.mesh):
        query_emb = np.asarray(self._embed_queries(params, partitioning.shard_batch(queries, self.mesh)))
      depth = search_depth(c.num_candidates, spec.null_document, exclude_trivial, self.copies, self.store.num_blocks)
      depth = min(max(depth, spec.rerank_depth), self.store.num_blocks)
      retrieved, _ = self.live.searcher.search(query_emb, depth)
      rows = partitioning.process_rows(self.mesh, len(retrieved))
      retrieved = retrieved[rows]
      if spec.rerank_depth:
        retrieved = self.rerank_retrieved(params, query_emb[rows], retrieved)
      candidates, weights = select_candidates(retrieved, batch["block_id"], self.store.arrays["uids"],
                                              c.num_candidates, spec.null_document, exclude_trivial, self.query_uids)
    blocks, joint = candidate_inputs(self.store, candidates, batch["query_input_ids"], c)
    return {
        **batch,
        **{f"block_{k}": v for k, v in blocks.items()},
        **{f"joint_{k}": v for k, v in joint.items()},
        "example_weight": weights,
        "span_retrieved": span_in_candidates(joint, batch["mlm_ids"], batch["mlm_weights"]),
    }

  def rerank_retrieved(self, params: Any, query_emb: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """This process's [b, L] retrieved ids re-ordered by the current block tower (`RealmSpec.rerank_depth`)."""
    blocks = block_inputs(self.store, retrieved, self.spec.data.block_len)
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in blocks.items()}
    with jax.set_mesh(self.mesh):
      block_emb = np.asarray(self._embed_blocks(params, partitioning.shard_batch(flat, self.mesh)))
    rows = partitioning.process_rows(self.mesh, len(block_emb) // retrieved.shape[1])  # the global batch's rows
    return rerank(retrieved, query_emb, block_emb.reshape(-1, *retrieved.shape[1:], block_emb.shape[-1])[rows])


def record_query_corpus(workdir: storage.PathLike, query_store: BlockStore) -> None:
  """Process 0 records the query corpus in `<workdir>/queries.json` once; a restart on another one (its grain
  state would index other blocks) is refused, naming both manifests."""
  path = storage.as_path(workdir) / QUERY_CORPUS
  now = {"block_store": str(query_store.path), "corpus_fingerprint": query_store.manifest["corpus_fingerprint"],
         "num_blocks": query_store.num_blocks}
  if path.exists():
    try:
      written = json.loads(storage.read_bytes(path))
      differ = [k for k in ("corpus_fingerprint", "num_blocks") if written[k] != now[k]]
    except (KeyError, TypeError, ValueError) as e:
      raise InputError(f"{path}: not a query corpus record ({type(e).__name__}: {e})") from e
    if differ:
      raise InputError(f"{path}: this run's queries came from {written['block_store']} ({differ[0]} "
                       f"{written[differ[0]]!r}), now from {now['block_store']}/manifest.json ({now[differ[0]]!r}): "
                       "use a new workdir")
  elif jax.process_index() == 0:
    storage.write_json_once(path, now)
  partitioning.barrier("query corpus recorded")


def starting_weights(spec: RealmSpec) -> Any:
  """`TrainHooks.pretrained` for the spec's `retriever_init` and `reader_init` (None where both are unset)."""
  retriever = init_lib.load_retriever(spec.retriever_init, spec.retriever) if spec.retriever_init else None
  reader = init_lib.load_realm_reader(spec.reader_init, spec.model()) if spec.reader_init else None
  if retriever is None and reader is None:
    return None

  def pretrained(params):
    params = dict(params)
    if retriever is not None:
      params["retriever"] = retriever.into_retriever(params["retriever"])
    return params | (reader.subtrees if reader is not None else {})

  return pretrained


def run_pretrain(workdir: str, mesh: jax.sharding.Mesh, spec: RealmSpec, trainer: TrainerConfig,
                 optimizer: OptimizerConfig, index: LiveIndexConfig | None = None) -> list[dict[str, float]]:
  """REALM pre-training (gin/runs/realm_pretrain.gin: the paper's batch 512, 200k steps, lr 3e-5, 8 candidates
  incl. null).

  `optimizer.subtree_learning_rates` may give the retriever or the MLM head a peak lr of their own: a reader
  whose MLM head starts from scratch needs to move its bias by several nats, which Adam at a BERT lr cannot do
  in a short run.  `retriever.score_scale` multiplies the inner products before the softmax over candidates
  (1.0: the released code): a MiniLM retriever (LayerNorm'd 384-d sentence vectors, identity projection) has
  inner products of ~384 x cosine, one-hot on the top block; 20 / 384 gives softmax(20 cosine).

  With `data.eval_blocks` > 0 the held-out MLM evaluation (`eval.realm_mlm`) runs every `trainer.eval_every`
  steps (0: at the last step only) on the live index, never retrieving a query's own block.

  With `spec.query_store` the queries (training and held-out) come from that store (X) and the candidates from
  `spec.block_store` (Z), the store the refresher embeds; trivial retrievals are excluded by SHA1 uid across them.
  """
  data, index = spec.data, index or LiveIndexConfig()
  if trainer.eval_every and not data.eval_blocks:
    raise InputError(f"eval_every={trainer.eval_every} needs held-out blocks: set RealmDataConfig.eval_blocks > 0")
  store = spec.store()
  query_store = spec.query_block_store(store)
  record_query_corpus(workdir, query_store)
  RetrieverDescription(spec.retriever, spec.block_tower_path, store.manifest["tokenizer"]).write(workdir)
  pretrained = starting_weights(spec)
  train = make_trainer(spec.objective(), mesh, workdir, trainer, optimizer)
  masked = MaskedQueries(query_store, data)
  queries = iter(realm_query_dataset(query_store, data, masked).to_iter_dataset())
  with contextlib.ExitStack() as stack:
    state, run, poller = None, RealmRun(spec, store, mesh, index.search, train.rules, query_store), None
    if spec.retrieval:
      index_dir = storage.as_path(workdir) / INDEX_DIR
      fresh = not index_lib.committed_steps(index_dir) and train.checkpoints.latest_step() is None
      if index.bootstrap and partitioning.agree(fresh):
        state = train.init_state(pretrained)  # also the first train state: initialised once
        bootstrap_index(index_dir, state, spec, store, mesh, index, train.rules)
      poller = stack.enter_context(following(run.live, workdir, store, index))
      poller.wait_for_first(index.wait_seconds)
    evaluate = None
    if data.eval_blocks:
      held_out = HeldOutMlm(run.model, mesh, masked.eval_batches(data.batch_size),
                            functools.partial(run.complete, exclude_trivial=True), workdir, spec.null_document)
      evaluate = lambda state: held_out(state.params, int(state.step))  # noqa: E731
    hooks = TrainHooks(pretrained=pretrained, before_step=poller.maybe_swap if poller else None,
                       prepare_batch=run.prepare_batch, evaluate=evaluate)
    _, history = train.fit(queries, hooks, initial_state=state)
  return history


def bootstrap_index(index_dir: storage.PathLike, state: TrainState, spec: RealmSpec, store: BlockStore, mesh,
                    index: LiveIndexConfig, rules: partitioning.Rules) -> None:
  """Index 0, embedded with the starting block tower and published by every process (each its own rows), with
  the assets of the backend the run searches with."""
  batch_size, backend = index.batch_size, get_backend(index.search)
  tower = jax.device_get(state.params["retriever"][spec.retriever.block_tower])
  refresh = RefreshConfig(spec.retriever, spec.block_tower_path, batch_size, search=index.search, rules=rules)
  rows = embed_all_blocks(tower, refresh, store, mesh, desc="bootstrap index")
  if jax.process_index() == 0:
    index_lib.remove_uncommitted(index_dir, writer="bootstrap")  # a bootstrap killed mid-publish
  partitioning.barrier("bootstrap index: stale data removed")
  index_lib.publish_index(index_dir, 0, rows, store, backend, writer="bootstrap")
