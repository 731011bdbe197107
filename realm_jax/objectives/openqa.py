"""Open-QA fine-tuning objective (ORQA's `orqa_model.py`, used unchanged by REALM).

- Retriever: logits q . e_z over the top `retrieve_k` blocks of the frozen index; only the query tower
  gets gradients (block embeddings are inputs).  Loss: -log sum_{z has answer} p(z|x), zeroed when no
  retrieved block has the answer.
- Reader: span logits of the top `reader_k` blocks with the block's retriever logit added, ONE softmax
  over every (block, span) pair; loss -log sum_{gold spans} p, zeroed when no span is gold.
- Prediction: the argmax (block, span) of those logits.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.openqa import OpenQaDataConfig
from realm_jax.data.tokenization import Tokenizer, load_tokenizer, minilm_dir
from realm_jax.models.bert import BertConfig
from realm_jax.models.reader import INVALID_SPAN_LOGIT, SpanReader
from realm_jax.models.retriever import DualEncoder, RetrieverConfig
from realm_jax.objectives.objective import Objective
from realm_jax.retrieval.mips import SearchConfig

Array = jax.Array
READER_FEATURES = ("input_ids", "input_mask", "segment_ids", "block_mask")


class OpenQaModel(nn.Module):
  """Params {'retriever': DualEncoder, 'reader': SpanReader}."""

  retriever_config: BertConfig
  reader_config: BertConfig
  projection_size: int = 128
  share_towers: bool = True
  span_hidden_size: int = 256
  max_span_width: int = 10
  # Hugging Face REALM's values differ: 1e-12 and float32 min (see README, "released checkpoints").
  retriever_layer_norm_eps: float = 1e-3
  invalid_span_logit: float = INVALID_SPAN_LOGIT
  retriever_projection_init: str = "normal"  # DualEncoder.projection_init
  reader_layer_norm_eps: float = 1e-3  # SpanReader.layer_norm_eps (a HF REALM config's `reader_layer_norm_eps`)
  retriever_score_scale: float = 1.0  # RetrieverConfig.score_scale: retriever logit = scale * <query, block>

  def setup(self):
    self.retriever = DualEncoder(self.retriever_config, self.projection_size, self.share_towers,
                                 layer_norm_eps=self.retriever_layer_norm_eps,
                                 projection_init=self.retriever_projection_init)
    self.reader = SpanReader(self.reader_config, self.span_hidden_size, self.max_span_width,
                             layer_norm_eps=self.reader_layer_norm_eps, invalid_span_logit=self.invalid_span_logit)

  def embed_queries(self, queries: dict[str, Array], deterministic: bool = True) -> Array:
    return self.retriever.embed_queries(queries, deterministic)

  def embed_blocks(self, blocks: dict[str, Array], deterministic: bool = True) -> Array:
    return self.retriever.embed_blocks(blocks, deterministic)

  def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> tuple[Array, Array]:
    """Retriever logits [B, retrieve_k] and reader logits [B, reader_k, num_spans] (retriever logit added)."""
    queries = {k[len("query_"):]: v for k, v in batch.items() if k.startswith("query_")}
    query_emb = self.retriever.embed_queries(queries, deterministic)
    retriever_logits = self.retriever_score_scale * jnp.einsum("bd,bkd->bk", query_emb, batch["block_embeddings"])
    span_logits = self.reader({k: batch[f"reader_{k}"] for k in READER_FEATURES}, deterministic)
    reader_k = span_logits.shape[1]
    return retriever_logits, span_logits + retriever_logits[:, :reader_k, None]


def marginal_nll(logits: Array, correct: Array) -> tuple[Array, Array]:
  """-log sum_{correct} softmax(logits) over the last axes, and whether any is correct (else loss 0)."""
  flat = logits.reshape(logits.shape[0], -1)
  flat_correct = correct.reshape(correct.shape[0], -1).astype(bool)
  any_correct = flat_correct.any(-1)
  gold = jax.nn.logsumexp(jnp.where(flat_correct, flat, -jnp.inf), axis=-1)
  loss = jax.nn.logsumexp(flat, axis=-1) - jnp.where(any_correct, gold, 0.0)
  return jnp.where(any_correct, loss, 0.0), any_correct


def openqa_loss(retriever_logits: Array, reader_logits: Array, retriever_correct: Array, span_correct: Array,
                example_weight: Array | None = None) -> tuple[Array, dict[str, Array]]:
  retriever_nll, retriever_any = marginal_nll(retriever_logits, retriever_correct)
  reader_nll, reader_any = marginal_nll(reader_logits, span_correct)
  weight = jnp.ones_like(retriever_nll) if example_weight is None else example_weight
  count = jnp.maximum(weight.sum(), 1.0)
  best = jnp.argmax(reader_logits.reshape(reader_logits.shape[0], -1), axis=-1)
  best_correct = jnp.take_along_axis(span_correct.reshape(span_correct.shape[0], -1), best[:, None], -1)[:, 0]
  metrics = {
      "retriever_loss": (retriever_nll * weight).sum() / count,
      "reader_loss": (reader_nll * weight).sum() / count,
      "retrieval_recall": (retriever_any * weight).sum() / count,  # answer in the top retrieve_k
      "reader_oracle": (reader_any * weight).sum() / count,  # a gold span in the top reader_k
      "span_exact_match": (best_correct * weight).sum() / count,
  }
  return ((retriever_nll + reader_nll) * weight).sum() / count, metrics


def openqa_train_loss(model: OpenQaModel, params, batch: dict[str, Array], rng: Array):
  """Loss for the Trainer: dropout on, as ORQA's train mode."""
  retriever_logits, reader_logits = model.apply({"params": params}, batch, False, rngs={"dropout": rng})
  return openqa_loss(retriever_logits, reader_logits, batch["retriever_correct"], batch["span_correct"])


@dataclasses.dataclass(frozen=True)
class OpenQaSpec:
  """What fine-tuning, evaluation and `launch/ask.py` share: model, data shapes, block store, vocabulary; and
  where fine-tuning starts (init specs, `checkpoints.init`): `init='realm:<workdir>'` takes retriever, reader and
  index from one REALM pre-training run, else `retriever_init` and `reader_init` (None: random)."""

  block_store: str
  retriever: RetrieverConfig
  reader: BertConfig
  data: OpenQaDataConfig = OpenQaDataConfig()
  span_hidden_size: int = 256
  vocab: str | None = None  # the block store's tokenizer file; None: the uncased BERT/MiniLM vocab
  invalid_span_logit: float = INVALID_SPAN_LOGIT  # reader.HF_INVALID_SPAN_LOGIT reproduces Hugging Face REALM
  reader_layer_norm_eps: float = 1e-3  # the span scorer's LayerNorm (released code); a HF checkpoint's must match
  init: str | None = None
  retriever_init: str | None = None
  reader_init: str | None = None
  search: SearchConfig = SearchConfig()  # how the frozen index is searched (and which assets fine-tuning publishes)

  def model(self) -> OpenQaModel:
    r = self.retriever
    return OpenQaModel(r.encoder, self.reader, r.projection_size, r.share_towers, self.span_hidden_size,
                       self.data.max_span_width, r.layer_norm_eps, self.invalid_span_logit, r.projection_init,
                       self.reader_layer_norm_eps, r.score_scale)

  def store(self) -> BlockStore:
    return BlockStore(self.block_store)

  def tokenizer(self) -> Tokenizer:
    return load_tokenizer(self.vocab or minilm_dir() / "vocab.txt")

  def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of the batch the train step sees (after the run's retrieval)."""
    d, i32 = self.data, jnp.int32
    b = batch_size or d.batch_size
    return {
        **{f"query_{n}": jax.ShapeDtypeStruct((b, d.query_len), i32) for n in FEATURES},
        **{f"reader_{n}": jax.ShapeDtypeStruct((b, d.reader_k, d.reader_len), i32) for n in READER_FEATURES},
        "block_embeddings": jax.ShapeDtypeStruct((b, d.retrieve_k, self.retriever.projection_size), jnp.float32),
        "retriever_correct": jax.ShapeDtypeStruct((b, d.retrieve_k), jnp.bool_),
        "span_correct": jax.ShapeDtypeStruct((b, d.reader_k, d.reader_len * d.max_span_width), jnp.bool_),
        "question_index": jax.ShapeDtypeStruct((b,), i32),
    }

  def example_batch(self) -> dict[str, jax.Array]:
    """A one-question batch of the model's input shapes (for init and abstract shapes)."""
    return {name: jnp.zeros(x.shape, x.dtype) for name, x in self.batch_shapes(1).items()}

  def objective(self) -> Objective:
    model, example = self.model(), self.example_batch()
    return Objective(
        init_params=lambda rng: model.init(rng, example)["params"],
        loss_fn=lambda params, batch, rng: openqa_train_loss(model, params, batch, rng),
        batch_size=self.data.batch_size,
    )
