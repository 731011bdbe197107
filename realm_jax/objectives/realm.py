"""REALM's pre-training objective: marginal MLM likelihood over retrieved blocks plus the null block.

As coded in the released `realm/model.py` (REALM_REFERENCE §4): candidate scores are recomputed
with fresh parameters, `log p(z|x) = log_softmax` over the K candidates (null first), the reader's
`log p(y_j|z,x)` is taken at the masked positions, and the loss is the negative
per-masked-token marginal `log sum_z p(z|x) p(y_j|z,x)`, averaged over scored masks.  The paper's
per-example marginal (product over the masks inside the sum) is `per_example_marginal=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.checkpoints.train_dir import abstract_params
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.realm import RealmDataConfig, query_store_for
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder, MlmHead
from realm_jax.models.retriever import DualEncoder, RetrieverConfig
from realm_jax.objectives.objective import Objective

Array = jax.Array


class RealmModel(nn.Module):
  """Retriever (dual encoder) + knowledge-augmented encoder (BERT reader with MLM head)."""

  retriever_config: BertConfig
  reader_config: BertConfig
  projection_size: int = 128
  share_towers: bool = True
  retriever_layer_norm_eps: float = 1e-3  # DualEncoder.layer_norm_eps (Hugging Face REALM: 1e-12)
  retriever_projection_init: str = "normal"  # DualEncoder.projection_init
  score_scale: float = 1.0  # p(z|x) = softmax(score_scale * <query, block>); 1.0: the released code

  def setup(self):
    self.retriever = DualEncoder(self.retriever_config, self.projection_size, self.share_towers,
                                 layer_norm_eps=self.retriever_layer_norm_eps,
                                 projection_init=self.retriever_projection_init)
    self.reader = BertEncoder(self.reader_config)
    self.mlm_head = MlmHead(self.reader_config)

  def embed_queries(self, queries: dict[str, Array], deterministic: bool = True) -> Array:
    return self.retriever.embed_queries(queries, deterministic)

  def embed_blocks(self, blocks: dict[str, Array], deterministic: bool = True) -> Array:
    return self.retriever.embed_blocks(blocks, deterministic)

  def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> tuple[Array, Array]:
    """Returns retrieval scores [B, K] (scaled by `score_scale`) and the reader's log p(.|z, x) at the masks
    [B, K, M, V]."""
    queries = {k[len("query_"):]: v for k, v in batch.items() if k.startswith("query_")}
    query_emb = self.retriever.embed_queries(queries, deterministic)
    batch_size, k, block_len = batch["block_input_ids"].shape
    blocks = {name: batch[f"block_{name}"].reshape(batch_size * k, block_len)
              for name in ("input_ids", "input_mask", "segment_ids")}
    block_emb = self.retriever.embed_blocks(blocks, deterministic).reshape(batch_size, k, -1)
    scores = self.score_scale * jnp.einsum("bd,bkd->bk", query_emb, block_emb)
    joint = {name: batch[f"joint_{name}"] for name in ("input_ids", "input_mask", "segment_ids")}
    return scores, self.read(joint, batch["mlm_positions"], deterministic)

  def read(self, joint: dict[str, Array], mlm_positions: Array, deterministic: bool = True) -> Array:
    """The reader's log p(.|z, x) [B, K, M, V] at the masks, from joint inputs [B, K, L] and positions [B, M]."""
    batch_size, k, seq_len = joint["input_ids"].shape
    flat = {name: x.reshape(batch_size * k, seq_len) for name, x in joint.items()}
    hidden, _ = self.reader(flat["input_ids"], flat["input_mask"], flat["segment_ids"], deterministic)
    positions = jnp.repeat(mlm_positions, k, axis=0)  # [B*K, M]
    at_masks = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B*K, M, H]
    table = nn.meta.unbox(self.reader.variables["params"]["embeddings"]["word_embeddings"]["embedding"])
    log_probs = jax.nn.log_softmax(self.mlm_head(at_masks, table), axis=-1)
    return log_probs.reshape(batch_size, k, *log_probs.shape[1:])


def _marginals(scores: Array, log_probs: Array, mask_ids: Array) -> tuple[Array, Array, Array, Array]:
  """log p(z|x) [B, K]; log p(y_j|z,x) of the gold token [B, K, M]; its marginal over z [B, M]; whether the
  marginal predictive distribution's argmax is the gold token [B, M]."""
  candidate_log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  gold_log_probs = jnp.take_along_axis(log_probs, mask_ids[:, None, :, None], axis=-1)[..., 0]
  token_marginal = jax.nn.logsumexp(candidate_log_probs[:, :, None] + gold_log_probs, axis=1)
  predictive = jax.nn.logsumexp(candidate_log_probs[:, :, None, None] + log_probs, axis=1)  # [B, M, V]
  return candidate_log_probs, gold_log_probs, token_marginal, jnp.argmax(predictive, -1) == mask_ids


def marginal_loss(
    scores: Array, log_probs: Array, mask_ids: Array, mask_weights: Array, per_example_marginal: bool = False
) -> tuple[Array, dict[str, Array]]:
  """Negative marginal log-likelihood per scored mask, and REALM's metrics.

  scores [B, K] (candidate 0 = null block), log_probs [B, K, M, V] (reader), mask_ids / mask_weights [B, M].
  """
  candidate_log_probs, gold_log_probs, token_marginal, correct = _marginals(scores, log_probs, mask_ids)
  weights = mask_weights.astype(jnp.float32)
  num_masks = jnp.maximum(weights.sum(), 1.0)
  if per_example_marginal:
    sequence = (gold_log_probs * weights[:, None, :]).sum(-1)  # [B, K]
    example_marginal = jax.nn.logsumexp(candidate_log_probs + sequence, axis=1)  # [B]
    loss = -example_marginal.sum() / num_masks
  else:
    loss = -(token_marginal * weights).sum() / num_masks
  metrics = {
      # Appendix D: how much the retrieved blocks beat the null block, per masked token.
      "retrieval_utility": ((token_marginal - gold_log_probs[:, 0, :]) * weights).sum() / num_masks,
      "p_null": (jnp.exp(candidate_log_probs[:, 0]) * (weights.sum(-1) > 0)).sum()
      / jnp.maximum((weights.sum(-1) > 0).sum(), 1.0),
      "mlm_log_likelihood": (token_marginal * weights).sum() / num_masks,
      "mlm_accuracy": (correct * weights).sum() / num_masks,
  }
  return loss, metrics


def per_example_scores(scores: Array, log_probs: Array, mask_ids: Array, mask_weights: Array) -> dict[str, Array]:
  """Sums over each example's scored masks [B] (evaluation): `log_likelihood` (per-token marginal),
  `null_log_likelihood` (the null block's alone), `correct` (argmax hits), `num_masks`; and `p_null` [B]."""
  candidate_log_probs, gold_log_probs, token_marginal, correct = _marginals(scores, log_probs, mask_ids)
  weights = mask_weights.astype(jnp.float32)
  return {
      "log_likelihood": (token_marginal * weights).sum(-1),
      "null_log_likelihood": (gold_log_probs[:, 0] * weights).sum(-1),
      "correct": (correct * weights).sum(-1),
      "num_masks": weights.sum(-1),
      "p_null": jnp.exp(candidate_log_probs[:, 0]),
  }


def realm_loss(model: RealmModel, params, batch: dict[str, Array], rng: Array, per_example_marginal: bool = False,
               null_document: bool = True):
  """Loss for the Trainer: fresh scores and reader log-probs under dropout, duplicates weighted out.

  Adds `span_retrieved`: the share of scored examples whose masked span occurs in a candidate the reader
  saw (the batch's host-computed `span_retrieved`, see `data.realm.span_in_candidates`).  Without a null
  document candidate 0 is a retrieved block, so `retrieval_utility` and `p_null` are not reported.
  """
  scores, log_probs = model.apply({"params": params}, batch, False, rngs={"dropout": rng})
  weights = batch["mlm_weights"] * batch["example_weight"][:, None]
  loss, metrics = marginal_loss(scores, log_probs, batch["mlm_ids"], weights, per_example_marginal)
  scored = (weights.sum(-1) > 0).astype(jnp.float32)
  metrics["span_retrieved"] = (batch["span_retrieved"] * scored).sum() / jnp.maximum(scored.sum(), 1.0)
  if not null_document:
    del metrics["retrieval_utility"], metrics["p_null"]
  return loss, metrics


def realm_batch_shapes(data: RealmDataConfig, num_candidates: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of the batch the train step sees (after the run's candidate retrieval)."""
  b, k, i32, f32 = data.batch_size, num_candidates, jnp.int32, jnp.float32
  return {
      **{f"query_{n}": jax.ShapeDtypeStruct((b, data.query_len), i32) for n in FEATURES},
      **{f"block_{n}": jax.ShapeDtypeStruct((b, k, data.block_len), i32) for n in FEATURES},
      **{f"joint_{n}": jax.ShapeDtypeStruct((b, k, data.joint_len), i32) for n in FEATURES},
      "mlm_positions": jax.ShapeDtypeStruct((b, data.max_masks), i32),
      "mlm_ids": jax.ShapeDtypeStruct((b, data.max_masks), i32),
      "mlm_weights": jax.ShapeDtypeStruct((b, data.max_masks), f32),
      "block_id": jax.ShapeDtypeStruct((b,), i32),
      "example_weight": jax.ShapeDtypeStruct((b,), f32),
      "span_retrieved": jax.ShapeDtypeStruct((b,), f32),
  }


def _zeros(shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  return {name: jnp.zeros(x.shape, x.dtype) for name, x in shapes.items()}


def abstract_realm_params(model: RealmModel) -> dict[str, Any]:
  """Shapes of a RealmModel's parameters (no memory, no FLOPs)."""
  return abstract_params(model, _zeros(realm_batch_shapes(RealmDataConfig(batch_size=1), num_candidates=1)))


@dataclasses.dataclass(frozen=True)
class RealmSpec:
  """A REALM pre-training run: block store, retriever and reader, the masked queries, the objective's switches
  (Table 2's ablations) and where retriever and reader start (init specs, `checkpoints.init`; None: random).

  `exclude_trivial=False` keeps the query's own block among the candidates (the paper's §3.4: the reader then
  learns to copy, the retriever to match surface strings): the `keep_trivial_retrievals` ablation.
  `retrieval=False` reads the null block only (the `no_retrieval` ablation).
  `query_store`: the block store the masked queries (and held-out queries) come from, the paper's query corpus
  X (CC-News); `block_store` is the knowledge corpus Z (Wikipedia) that is indexed and retrieved.  None: X = Z.
  `rerank_depth` L > 0 (beyond the paper; Atlas's re-rank mode): the stale index's top max(L, search depth)
  blocks are re-embedded with the current block tower and re-ordered by the current inner products before the
  candidates are chosen (that many extra block-tower forward passes per query and step, in the held-out
  evaluation too).  0: the paper's stale top-k.
  """

  block_store: str
  retriever: RetrieverConfig
  reader: BertConfig
  data: RealmDataConfig = RealmDataConfig()
  retrieval: bool = True
  null_document: bool = True
  exclude_trivial: bool = True
  per_example_marginal: bool = False
  retriever_init: str | None = None
  reader_init: str | None = None
  query_store: str | None = None
  rerank_depth: int = 0

  def __post_init__(self):
    if self.rerank_depth < 0:
      raise InputError(f"RealmSpec.rerank_depth = {self.rerank_depth}: blocks to re-rank, 0 (off) or more")
    if self.data.block_len != self.retriever.block_len:
      raise InputError(f"RealmDataConfig.block_len = {self.data.block_len}, RetrieverConfig.block_len = "
                       f"{self.retriever.block_len}: candidates are the index's blocks; bind one BLOCK_LEN")

  @property
  def block_tower_path(self) -> tuple[str, str]:
    """Where the block tower lives in the model's parameters (what the refresher restores)."""
    return "retriever", self.retriever.block_tower

  @property
  def num_candidates(self) -> int:
    """Candidates per query the train step reads (the null block only without retrieval)."""
    return self.data.num_candidates if self.retrieval else 1

  def model(self) -> RealmModel:
    r = self.retriever
    return RealmModel(r.encoder, self.reader, r.projection_size, r.share_towers, r.layer_norm_eps,
                      r.projection_init, r.score_scale)

  def store(self) -> BlockStore:
    """The knowledge store Z: what the index holds and candidates are read from."""
    return BlockStore(self.block_store)

  def query_block_store(self, knowledge: BlockStore) -> BlockStore:
    """The query store X (`knowledge` itself without a `query_store`)."""
    return query_store_for(knowledge, self.query_store)

  def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    data = dataclasses.replace(self.data, batch_size=batch_size or self.data.batch_size)
    return realm_batch_shapes(data, self.num_candidates)

  def objective(self) -> Objective:
    model, example = self.model(), _zeros(self.batch_shapes(1))
    return Objective(
        init_params=lambda rng: model.init(rng, example)["params"],
        loss_fn=lambda params, batch, rng: realm_loss(model, params, batch, rng, self.per_example_marginal,
                                                        self.null_document),
        batch_size=self.data.batch_size,
    )
