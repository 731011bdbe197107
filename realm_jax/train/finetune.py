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
import jax.numpy as jnp
import numpy as np
from absl import logging

from realm_jax import partitioning, storage
from realm_jax.checkpoints import hf_realm
from realm_jax.data.blocks import BlockStore
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer, question_dataset
from realm_jax.data.questions import Question, read_questions
from realm_jax.data.realm import FEATURES
from realm_jax.data.tokenization import load_tokenizer, minilm_dir
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.reader import INVALID_SPAN_LOGIT
from realm_jax.objectives.ict import load_pretrained_encoder
from realm_jax.objectives.openqa import OpenQaModel, openqa_train_loss
from realm_jax.objectives.realm import RealmModel
from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.mips import ExactSearcher
from realm_jax.train.optimizer import bert_adamw
from realm_jax.train.pretrain import (
  REALM_SPEC_PREFIX,
  load_realm_checkpoint,
  load_retriever_init,
  with_retriever_init,
)
from realm_jax.train.trainer import Trainer, TrainerConfig, TrainState


@dataclasses.dataclass
class OpenQaRun:
  """Retrieval on the frozen index + featurisation for each training batch."""

  model: OpenQaModel
  featurizer: OpenQaFeaturizer
  questions: list[Question]
  embeddings: np.ndarray
  mesh: Any

  def __post_init__(self):
    self.searcher = ExactSearcher(self.embeddings, self.mesh)
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
                 pretrained_index: tuple[storage.PathLike, int] | None = None) -> np.ndarray:
  """The fine-tuning index: `<workdir>/index`'s newest; else `pretrained_index` ((index dir, step): the REALM run's
  index of the very checkpoint fine-tuning starts from); else embedded now from `tower`.  Published in
  `<workdir>/index` (each process its rows) and returned as a memory map of the published file(s)."""
  index_dir = storage.as_path(workdir) / "index"
  steps = index_lib.committed_steps(index_dir)
  if steps:
    _, embeddings = index_lib.load_index(index_dir, steps[-1], store)
    return embeddings
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
  index_lib.publish_index(index_dir, 0, rows, store, writer="finetune")  # each process its own rows
  return index_lib.load_index(index_dir, 0, store)[1]


@dataclasses.dataclass(frozen=True)
class OpenQaSpec:
  """What fine-tuning, evaluation and `launch/ask.py` share: model, data shapes, block store, vocabulary."""

  block_store: str
  retriever: BertConfig
  reader: BertConfig
  data: OpenQaDataConfig = OpenQaDataConfig()
  projection_size: int = 128
  share_towers: bool = True
  span_hidden_size: int = 256
  block_len: int = 288  # block tower input length (the index)
  vocab: str | None = None  # the block store's tokenizer file; None: the uncased BERT/MiniLM vocab
  retriever_layer_norm_eps: float = 1e-3  # 1e-12 reproduces Hugging Face REALM
  invalid_span_logit: float = INVALID_SPAN_LOGIT  # reader.HF_INVALID_SPAN_LOGIT reproduces Hugging Face REALM
  projection_init: str = "normal"  # "identity": a retriever warm-started from a sentence encoder keeps its space

  def model(self) -> OpenQaModel:
    return OpenQaModel(self.retriever, self.reader, self.projection_size, self.share_towers,
                       self.span_hidden_size, self.data.max_span_width, self.retriever_layer_norm_eps,
                       self.invalid_span_logit, self.projection_init)

  def store(self) -> BlockStore:
    return BlockStore(self.block_store)

  def tokenizer(self):
    return load_tokenizer(self.vocab or minilm_dir() / "vocab.txt")

  def batch_spec(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of the batch the train step sees (after `OpenQaRun.prepare_batch`)."""
    d, i32 = self.data, jnp.int32
    b = batch_size or d.batch_size
    return {
        **{f"query_{n}": jax.ShapeDtypeStruct((b, d.query_len), i32) for n in FEATURES},
        **{f"reader_{n}": jax.ShapeDtypeStruct((b, d.reader_k, d.reader_len), i32)
           for n in (*FEATURES, "block_mask")},
        "block_embeddings": jax.ShapeDtypeStruct((b, d.retrieve_k, self.projection_size), jnp.float32),
        "retriever_correct": jax.ShapeDtypeStruct((b, d.retrieve_k), jnp.bool_),
        "span_correct": jax.ShapeDtypeStruct((b, d.reader_k, d.reader_len * d.max_span_width), jnp.bool_),
        "question_index": jax.ShapeDtypeStruct((b,), i32),
    }

  def example_batch(self) -> dict[str, jax.Array]:
    """A one-question batch of the model's input shapes (for init and abstract shapes)."""
    return {name: jnp.zeros(x.shape, x.dtype) for name, x in self.batch_spec(1).items()}


def openqa_trainer(spec: OpenQaSpec, mesh: jax.sharding.Mesh, workdir: str | None, num_steps: int = 10_000,
                   learning_rate: float = 1e-5, warmup_steps: int | None = None, checkpoint_every: int = 1000,
                   log_every: int = 100, seed: int = 0) -> Trainer:
  """The Open-QA trainer (`workdir=None`: no checkpoints, for ahead-of-time compilation)."""
  model = spec.model()
  example = spec.example_batch()
  return Trainer(
      init_params=lambda rng: model.init(rng, example)["params"],
      loss_fn=lambda params, batch, rng: openqa_train_loss(model, params, batch, rng),
      optimizer=bert_adamw(learning_rate, num_steps, warmup_steps=warmup_steps),
      mesh=mesh,
      workdir=workdir,
      config=TrainerConfig(num_steps, checkpoint_every, log_every, seed=seed),
  )


def run_finetune(
    workdir: str,
    spec: OpenQaSpec,
    train_questions: str,
    mesh: jax.sharding.Mesh,
    init: str | None = None,
    retriever_init: str | None = None,
    reader_init: str | None = None,
    num_steps: int = 10_000,
    learning_rate: float = 1e-5,
    warmup_steps: int | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    seed: int = 0,
    index_batch_size: int = 256,
) -> list[dict[str, float]]:
  """ORQA fine-tuning (lr 1e-5, one question per step).  `init='realm:<pretrain workdir>'` starts retriever
  and reader from REALM pre-training; otherwise `retriever_init` ('ict:<dir>', 'hf_realm:<dir>' or BERT
  weights) and `reader_init` (BERT weights, or 'hf_realm:<dir>': a released REALM encoder, or an ORQA
  reader with its span scorer).  Otherwise the span scorer starts fresh.  `index_batch_size` (gin:
  INDEX_BATCH_SIZE, the refresh job's too) is the frozen index's embedding batch."""
  data, retriever, reader = spec.data, spec.retriever, spec.reader
  workdir_path = storage.as_path(workdir)
  store = spec.store()
  featurizer = OpenQaFeaturizer(store, spec.tokenizer(), data)
  questions = read_questions(train_questions, skip_unanswerable=True)
  model = spec.model()

  if init is not None:
    if not init.startswith(REALM_SPEC_PREFIX):
      raise InputError(f"init={init!r}: expected '{REALM_SPEC_PREFIX}<REALM pre-training workdir>'")
    realm_dir = storage.as_path(init[len(REALM_SPEC_PREFIX):])
    realm_model = RealmModel(retriever, reader, spec.projection_size, spec.share_towers)
    realm, realm_step = load_realm_checkpoint(realm_dir, realm_model, ("retriever", "reader"), mesh)
    starting = {"retriever": realm["retriever"], "reader": {"encoder": realm["reader"]}}
    pretrained_index = (realm_dir / "index", realm_step)
  else:
    retriever_params = (load_retriever_init(retriever_init, retriever, spec.projection_size, mesh)
                        if retriever_init else {})
    if reader_init and reader_init.startswith(hf_realm.SPEC_PREFIX):
      reader_params = hf_realm.load_hf_realm_reader(reader_init, reader, spec.span_hidden_size, data.max_span_width)
    else:
      reader_params = {"encoder": load_pretrained_encoder(reader_init, reader)} if reader_init else {}
    starting = {"retriever_spec": retriever_params, "reader": reader_params}
    pretrained_index = None

  def pretrained(params):
    params = dict(params)
    if "retriever" in starting:
      params["retriever"] = starting["retriever"]
    else:
      params["retriever"] = with_retriever_init(params["retriever"], starting["retriever_spec"], retriever_init)
    params["reader"] = {**params["reader"], **starting["reader"]}
    return params

  trainer = openqa_trainer(spec, mesh, workdir, num_steps, learning_rate, warmup_steps, checkpoint_every, log_every,
                           seed)
  state = None
  if trainer.checkpoints.latest_step() is None and not index_lib.committed_steps(workdir_path / "index"):
    state = trainer.init_state(pretrained)
    towers = jax.device_get(state.params["retriever"])
    tower = towers["query_tower" if spec.share_towers else "block_tower"]
  else:
    tower = None  # the published index is reused
  refresh = RefreshConfig(retriever, spec.projection_size, spec.retriever_layer_norm_eps, block_len=spec.block_len,
                          batch_size=index_batch_size)
  embeddings = frozen_index(workdir_path, tower, refresh, store, mesh, pretrained_index)
  run = OpenQaRun(model, featurizer, questions, embeddings, mesh)
  batches = iter(question_dataset(questions, featurizer, data).to_iter_dataset())
  _, history = trainer.fit(batches, pretrained, batch_size=data.batch_size, prepare_batch=run.prepare_batch,
                           initial_state=state)
  return history
