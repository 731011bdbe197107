"""Answering questions with a fine-tuned Open-QA model: retrieve, read the top blocks, pick the best span.

`Predictor` is what `launch/evaluate.py` and `launch/ask.py` use: it holds the model's parameters,
the frozen index and the block store, and returns for each question the answer, its score and the
blocks it was read from (ids, titles, snippets).  `load_predictor` loads the best checkpoint by dev exact
match when fine-tuning recorded one (`checkpoints.best`), else the newest, and logs which and why.
`PretrainedRetriever` is a REALM pre-training run's retriever with its own index, before any fine-tuning.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning, storage
from realm_jax.checkpoints import best
from realm_jax.checkpoints import init as init_lib
from realm_jax.checkpoints.train_dir import abstract_params, restore_params_subtree
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer
from realm_jax.data.tokenization import Tokenizer
from realm_jax.objectives.openqa import READER_FEATURES, OpenQaModel, OpenQaSpec
from realm_jax.objectives.realm import RealmModel
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import Searcher
from realm_jax.retrieval.index import INDEX_DIR


@dataclasses.dataclass
class RetrievedBlock:
  block_id: int
  doc_id: str
  title: str
  score: float
  snippet: str


@dataclasses.dataclass
class Prediction:
  question: str
  answer: str
  score: float  # the joint (block, span) logit of the answer, retriever logit included
  probability: float  # its share of the softmax over every (block, span) pair read
  block_id: int  # the block the answer span came from
  blocks: list[RetrievedBlock]  # the blocks read, best first
  retrieved: np.ndarray  # ids of the top `retrieve_k` blocks (for recall@k)


class Predictor:
  """Fine-tuned retriever + reader over a frozen index (`config.answer_text` forms the answer strings)."""

  def __init__(self, model: OpenQaModel, params, store: BlockStore, tokenizer: Tokenizer, embeddings: np.ndarray,
               searcher: Searcher, config: OpenQaDataConfig, mesh, snippet_chars: int = 200):
    self.model, self.store, self.config, self.mesh = model, store, config, mesh
    self.featurizer = OpenQaFeaturizer(store, tokenizer, config, model.retriever_config.max_position_embeddings)
    self.embeddings = embeddings
    self.searcher = searcher
    self.snippet_chars = snippet_chars
    self.set_params(params)
    self._embed = jax.jit(lambda p, q: model.apply({"params": p}, q, True, method=OpenQaModel.embed_queries))
    self._read = jax.jit(lambda p, b: model.apply({"params": p}, b, True))

  def set_params(self, params) -> None:
    """Answers with `params` from now on (replicated over the mesh; fine-tuning's dev evaluation passes each
    evaluated state's)."""
    with jax.set_mesh(self.mesh):
      self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

  def retrieve(self, questions: list[str], k: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    queries = self.featurizer.queries(questions)
    with jax.set_mesh(self.mesh):
      query_emb = np.asarray(self._embed(self.params, partitioning.shard_batch(queries, self.mesh)))
    ids, scores = self.searcher.search(query_emb, k)
    return queries, ids, scores

  def search(self, questions: list[str], k: int, batch_size: int = 64) -> np.ndarray:
    """[len(questions), k] block ids, best first (retrieval only; batches padded to the "data" axis)."""
    data_size = self.mesh.shape["data"]
    out = []
    for first in range(0, len(questions), batch_size):
      chunk = questions[first : first + batch_size]
      out.append(self.retrieve(chunk + [chunk[-1]] * (-len(chunk) % data_size), k)[1][: len(chunk)])
    return np.concatenate(out)

  def _block(self, block_id: int, score: float) -> RetrievedBlock:
    text = self.store.text(block_id)
    snippet = text["text"] if len(text["text"]) <= self.snippet_chars else text["text"][: self.snippet_chars] + "…"
    return RetrievedBlock(block_id, text["doc_id"], text["title"], score, snippet)

  def answer(self, questions: list[str], retrieve_k: int | None = None, batch_size: int = 8) -> list[Prediction]:
    """Predictions for `questions`, in order; `retrieve_k` (>= reader_k) blocks are kept for recall."""
    c = self.config
    retrieve_k = max(retrieve_k or c.reader_k, c.reader_k)
    out = []
    data_size = self.mesh.shape["data"]
    for first in range(0, len(questions), batch_size):
      chunk = questions[first : first + batch_size]
      padded = chunk + [chunk[-1]] * (-len(chunk) % data_size)
      queries, ids, scores = self.retrieve(padded, retrieve_k)
      readers = [self.featurizer.reader_inputs(queries["input_ids"][b], ids[b, : c.reader_k])
                 for b in range(len(padded))]
      batch = {
          **{f"query_{n}": queries[n] for n in FEATURES},
          **{f"reader_{n}": np.stack([r[n] for r in readers]) for n in READER_FEATURES},
          "block_embeddings": self.embeddings[ids[:, : c.reader_k]],
      }
      with jax.set_mesh(self.mesh):
        _, logits = self._read(self.params, partitioning.shard_batch(batch, self.mesh))
      logits = np.asarray(logits, np.float64).reshape(len(padded), -1)
      for b, question in enumerate(chunk):
        best = int(np.argmax(logits[b]))
        block_rank, span = divmod(best, len(self.featurizer.starts))
        start = int(self.featurizer.starts[span])
        end = int(self.featurizer.ends[span])
        block_id = int(ids[b, block_rank])
        log_z = np.logaddexp.reduce(logits[b])
        out.append(Prediction(
            question=question,
            answer=self.featurizer.answer_text(block_id, queries["input_ids"][b], start, end),
            score=float(logits[b, best]),
            probability=float(np.exp(logits[b, best] - log_z)),
            block_id=block_id,
            blocks=[self._block(int(i), float(s)) for i, s in zip(ids[b, : c.reader_k], scores[b, : c.reader_k],
                                                                 strict=True)],
            retrieved=ids[b],
        ))
    return out


def load_predictor(workdir: storage.PathLike, spec: OpenQaSpec, mesh, step: int | None = None) -> Predictor:
  """`workdir`'s fine-tuning checkpoint `step`, else its best by dev exact match when recorded, else its newest
  (the step and the reason are logged), with its frozen index."""
  workdir = storage.as_path(workdir)
  step = best.log_choice(workdir, step)
  store = spec.store()
  steps = index_lib.committed_steps(workdir / "index")
  if not steps:
    raise FileNotFoundError(f"{workdir / 'index'}: no published index (was fine-tuning started here?)")
  embeddings, searcher = index_lib.load_searcher(workdir / "index", steps[-1], store, mesh, spec.search)
  model = spec.model()
  abstract = abstract_params(model, spec.example_batch())
  params = restore_params_subtree(workdir / "train", step, (), abstract, NamedSharding(mesh, P()))
  return Predictor(model, jax.device_get(params), store, spec.tokenizer(), embeddings, searcher, spec.data, mesh)


class PretrainedRetriever:
  """A REALM pre-training run's retriever as it stands: its newest checkpoint's query tower over the run's own
  index of that very checkpoint (published by its refresher), for zero-shot answer-recall (`search` only)."""

  def __init__(self, realm_workdir: storage.PathLike, spec: OpenQaSpec, mesh):
    realm_dir = storage.as_path(realm_workdir)
    r = spec.retriever
    towers, step = init_lib.load_realm_run(realm_dir, RealmModel(r.encoder, spec.reader, r.projection_size,
                                                                 r.share_towers), ("retriever",))
    index_dir = realm_dir / INDEX_DIR
    if step not in index_lib.committed_steps(index_dir):
      raise FileNotFoundError(f"{index_dir}: no index of step {step}, the run's newest checkpoint; run its refresher "
                              "until it publishes that step")
    store = spec.store()
    _, self.searcher = index_lib.load_searcher(index_dir, step, store, mesh, spec.search)
    self.step, self.mesh = step, mesh
    self.featurizer = OpenQaFeaturizer(store, spec.tokenizer(), spec.data, r.encoder.max_position_embeddings)
    tower = r.tower()
    self._embed = jax.jit(lambda p, q: tower.apply({"params": p}, q["input_ids"], q["input_mask"], q["segment_ids"],
                                                   True))
    with jax.set_mesh(mesh):
      self.params = jax.device_put(towers["retriever"]["query_tower"], NamedSharding(mesh, P()))

  def search(self, questions: list[str], k: int, batch_size: int = 64) -> np.ndarray:
    """[len(questions), k] block ids, best first."""
    data_size = self.mesh.shape["data"]
    out = []
    for first in range(0, len(questions), batch_size):
      chunk = questions[first : first + batch_size]
      queries = self.featurizer.queries(chunk + [chunk[-1]] * (-len(chunk) % data_size))
      with jax.set_mesh(self.mesh):
        query_emb = np.asarray(self._embed(self.params, partitioning.shard_batch(queries, self.mesh)))
      out.append(self.searcher.search(query_emb, k)[0][: len(chunk)])
    return np.concatenate(out)
