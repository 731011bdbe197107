"""Inverse Cloze Task warm start of the retriever (ORQA): loss over global in-batch negatives, and its spec.

Each query is scored against every block of the GLOBAL batch (the jit step sees
global arrays, so XLA gathers block embeddings across the "data" axis, as the
released TPU code's `cross_shard_concat`).  Label = own position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.ict import IctDataConfig
from realm_jax.errors import InputError
from realm_jax.models.retriever import DualEncoder, RetrieverConfig
from realm_jax.objectives.objective import Objective


def _features(batch: dict[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
  return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}


def ict_loss(
    model: DualEncoder, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax cross-entropy of each query against all blocks of the global batch."""
  q_rng, b_rng = jax.random.split(rng)
  queries = model.apply({"params": params}, _features(batch, "query_"), not train,
                        method=DualEncoder.embed_queries, rngs={"dropout": q_rng})
  blocks = model.apply({"params": params}, _features(batch, "block_"), not train,
                       method=DualEncoder.embed_blocks, rngs={"dropout": b_rng})
  logits = jnp.einsum("qd,bd->qb", queries, blocks)
  logits = nn.with_logical_constraint(logits, ("batch", None))
  labels = jnp.arange(logits.shape[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  removed = batch["sentence_removed"].astype(jnp.float32)
  metrics = {
      "accuracy": correct.mean(),
      "accuracy_removed": (correct * removed).sum() / jnp.maximum(removed.sum(), 1.0),
      "chance": 1.0 / logits.shape[0],
  }
  return loss, metrics


def ict_batch_shapes(batch_size: int, query_len: int, block_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of an ICT batch (`realm_jax.data.ict.IctExamples`)."""
  return {
      **{f"query_{k}": jax.ShapeDtypeStruct((batch_size, query_len), jnp.int32) for k in FEATURES},
      **{f"block_{k}": jax.ShapeDtypeStruct((batch_size, block_len), jnp.int32) for k in FEATURES},
      "block_id": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "sentence_removed": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }


@dataclasses.dataclass(frozen=True)
class IctSpec:
  """An ICT run: the block store, the retriever it trains (whose `block_len` is the blocks'), the examples, and
  where the towers' encoder starts (`init`: an encoder init spec, `checkpoints.init`; None: random)."""

  block_store: str
  retriever: RetrieverConfig
  data: IctDataConfig = IctDataConfig()
  init: str | None = None

  def __post_init__(self):
    if self.data.block_len != self.retriever.block_len:
      raise InputError(f"IctDataConfig.block_len = {self.data.block_len}, RetrieverConfig.block_len = "
                       f"{self.retriever.block_len}: the blocks ICT trains on are the index's; bind one BLOCK_LEN")

  def model(self) -> DualEncoder:
    return self.retriever.dual_encoder()

  def store(self) -> BlockStore:
    return BlockStore(self.block_store)

  def batch_shapes(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    return ict_batch_shapes(batch_size or self.data.batch_size, self.data.query_len, self.data.block_len)

  def objective(self) -> Objective:
    model, shapes = self.model(), self.batch_shapes(1)
    zeros = lambda prefix: {k[len(prefix):]: jnp.zeros(v.shape, v.dtype)  # noqa: E731
                            for k, v in shapes.items() if k.startswith(prefix)}
    return Objective(
        init_params=lambda rng: model.init(rng, zeros("query_"), zeros("block_"))["params"],
        loss_fn=lambda params, batch, rng: ict_loss(model, params, batch, rng),
        batch_size=self.data.batch_size,
    )
