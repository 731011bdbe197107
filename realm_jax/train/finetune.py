"""Open-QA fine-tuning run (ORQA/REALM §9): frozen block index, query tower + reader trained.

The index is built once from the starting retriever (REALM's pre-trained block tower) and published
in `<workdir>/index` (reused on resume).  Each step: the batch's questions are embedded with the
CURRENT query tower, the frozen index gives the top `retrieve_k` blocks, and the jit step re-scores them
exactly (gradients reach the query tower only) and reads the top `reader_k`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from realm_jax import partitioning, storage
from realm_jax.checkpoints import init as init_lib
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.openqa import OpenQaFeaturizer, question_dataset
from realm_jax.data.questions import Question, read_questions
from realm_jax.errors import InputError
from realm_jax.objectives.openqa import OpenQaModel, OpenQaSpec
from realm_jax.objectives.realm import RealmModel
from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import Searcher, get_backend
from realm_jax.train.live_index import INDEX_DIR
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, TrainHooks, TrainState, make_trainer


@dataclasses.dataclass
class OpenQaRun:
  """Retrieval on the frozen index + featurisation for each training batch."""

  model: OpenQaModel
  featurizer: OpenQaFeaturizer
  questions: list[Question]
  embeddings: np.ndarray
  searcher: Searcher
  mesh: Any

  def __post_init__(self):
    self._embed = jax.jit(lambda p, q: self.model.apply({"params": p}, q, True, method=OpenQaModel.embed_queries))

  def embed_questions(self, params, queries: dict[str, np.ndarray]) -> np.ndarray:
    with jax.set_mesh(self.mesh):
      return np.asarray(self._embed(params, partitioning.shard_batch(queries, self.mesh)))

  def prepare_batch(self, state: TrainState, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    queries = {k: batch[f"query_{k}"] for k in FEATURES}
    retrieved, _ = self.searcher.search(self.embed_questions(state.params, queries),
                                        self.featurizer.config.retrieve_k)
    questions = [self.questions[int(i)] for i in batch["question_index"]]
    features = self.featurizer.training_features(questions, batch["query_input_ids"], retrieved, self.embeddings)
    return {**batch, **features}


def frozen_index(workdir: storage.PathLike, tower: dict | None, refresh: RefreshConfig, store: BlockStore, mesh,
                 pretrained_index: tuple[storage.PathLike, int] | None = None) -> tuple[np.ndarray, Searcher]:
  """The fine-tuning index: `<workdir>/index`'s newest; else `pretrained_index` ((index dir, step): the REALM run's
  index of the very checkpoint fine-tuning starts from); else embedded now from `tower`.  Published in
  `<workdir>/index` (each process its rows, with the assets of `refresh.search`'s backend) and returned as a memory
  map of the published file(s) with a searcher of that backend."""
  index_dir = storage.as_path(workdir) / INDEX_DIR
  steps = index_lib.committed_steps(index_dir)
  if steps:
    return index_lib.load_searcher(index_dir, steps[-1], store, mesh, refresh.search, refresh.rules)
  reuse = pretrained_index is not None and pretrained_index[1] in index_lib.committed_steps(pretrained_index[0])
  if not reuse and tower is None:
    raise FileNotFoundError(f"{index_dir}: the run has checkpoints but no published frozen index (deleted?); "
                            "its index cannot be rebuilt from the fine-tuned parameters: start a new workdir")
  if jax.process_index() == 0:
    index_lib.remove_uncommitted(index_dir, writer="finetune")  # a start killed mid-publish
  partitioning.barrier("fine-tuning index: stale data removed")
  if reuse:
    _, pretrained = index_lib.load_index(*pretrained_index, store)
    logging.info("fine-tuning index: reusing %s (same parameters as the starting checkpoint)",
                 index_lib.commit_path(*pretrained_index))
    start, stop = partitioning.process_block_range(store.num_blocks)
    rows = index_lib.EmbeddedRows(start, np.asarray(pretrained[start:stop]), store.num_blocks)
  else:
    rows = embed_all_blocks(tower, refresh, store, mesh, desc="fine-tuning index")
  index_lib.publish_index(index_dir, 0, rows, store, get_backend(refresh.search), writer="finetune")
  return index_lib.load_searcher(index_dir, 0, store, mesh, refresh.search, refresh.rules)


def starting_weights(spec: OpenQaSpec) -> tuple[Any, tuple[storage.PathLike, int] | None]:
  """`TrainHooks.pretrained` for the spec's inits, and (index dir, step) of the REALM run whose index of that very
  checkpoint fine-tuning can reuse (`init='realm:<workdir>'`; else None)."""
  if spec.init is not None:
    if init_lib.kind(spec.init) != init_lib.REALM:
      raise InputError(f"init={spec.init!r}: expected '{init_lib.REALM}<REALM pre-training workdir>'")
    realm_dir = storage.as_path(spec.init[len(init_lib.REALM):])
    r = spec.retriever
    realm_model = RealmModel(r.encoder, spec.reader, r.projection_size, r.share_towers)
    realm, step = init_lib.load_realm_run(realm_dir, realm_model, ("retriever", "reader"))
    return (lambda params: {**params, "retriever": realm["retriever"],
                            "reader": {**params["reader"], "encoder": realm["reader"]}}), (realm_dir / INDEX_DIR, step)
  retriever = init_lib.load_retriever(spec.retriever_init, spec.retriever) if spec.retriever_init else None
  reader = (init_lib.load_openqa_reader(spec.reader_init, spec.reader, spec.span_hidden_size,
                                        spec.data.max_span_width, spec.reader_layer_norm_eps)
            if spec.reader_init else {})

  def pretrained(params):
    params = dict(params)
    if retriever is not None:
      params["retriever"] = retriever.into_retriever(params["retriever"])
    params["reader"] = {**params["reader"], **reader}
    return params

  return pretrained, None


def run_finetune(workdir: str, mesh: jax.sharding.Mesh, spec: OpenQaSpec, trainer: TrainerConfig,
                 optimizer: OptimizerConfig, train_questions: str, index_batch_size: int = 256
                 ) -> list[dict[str, float]]:
  """ORQA fine-tuning (gin/runs/openqa.gin: lr 1e-5, one question per step) from the spec's inits.
  `index_batch_size` (gin: INDEX_BATCH_SIZE, the refresh job's too) is the frozen index's embedding batch."""
  workdir_path = storage.as_path(workdir)
  store = spec.store()
  featurizer = OpenQaFeaturizer(store, spec.tokenizer(), spec.data)
  questions = read_questions(train_questions, skip_unanswerable=True)
  pretrained, pretrained_index = starting_weights(spec)
  train = make_trainer(spec.objective(), mesh, workdir, trainer, optimizer)
  state, tower = None, None  # no tower: the published index is reused
  if train.checkpoints.latest_step() is None and not index_lib.committed_steps(workdir_path / INDEX_DIR):
    state = train.init_state(pretrained)
    tower = jax.device_get(state.params["retriever"][spec.retriever.block_tower])
  refresh = RefreshConfig(spec.retriever, ("retriever", spec.retriever.block_tower), index_batch_size,
                          search=spec.search, rules=train.rules)
  embeddings, searcher = frozen_index(workdir_path, tower, refresh, store, mesh, pretrained_index)
  run = OpenQaRun(spec.model(), featurizer, questions, embeddings, searcher, mesh)
  batches = iter(question_dataset(questions, featurizer, spec.data).to_iter_dataset())
  _, history = train.fit(batches, TrainHooks(pretrained=pretrained, prepare_batch=run.prepare_batch),
                         initial_state=state)
  return history
