"""Does the REALM reader read?  An oracle-retrieval probe of the knowledge-augmented encoder.

REALM can only beat its null-block baseline if the reader takes the masked span from a block it is given.
This probe trains the reader and its MLM head with the query's own block as the only candidate (an
oracle retriever: trivial retrieval on purpose) and reports, on held-out queries, the log-likelihood of
the masked word pieces with that block and with the null block.  `copy_gain` (oracle - null, nats per
masked piece) is the most any retrieved block holding the span can give; near 0 means the reader ignores
its candidates, whatever the retriever does.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from realm_jax import partitioning
from realm_jax.data.blocks import BlockStore
from realm_jax.data.realm import FEATURES, NULL_BLOCK, RealmDataConfig, candidate_inputs, realm_query_dataset
from realm_jax.models.bert import BertConfig
from realm_jax.objectives.realm import RealmModel
from realm_jax.train.optimizer import bert_adamw, subtree_multipliers
from realm_jax.train.pretrain import load_reader_init
from realm_jax.train.trainer import Trainer, TrainerConfig

MASK_FEATURES = ("mlm_positions", "mlm_ids", "mlm_weights")


def oracle_batch(store: BlockStore, queries: dict[str, np.ndarray], data: RealmDataConfig,
                 with_null: bool) -> dict[str, np.ndarray]:
  """Joint inputs [B, K, L] with the query's own block (K=1), or the null block then it (K=2)."""
  source = queries["block_id"].astype(np.int64)[:, None]
  candidates = np.concatenate([np.full_like(source, NULL_BLOCK), source], 1) if with_null else source
  _, joint = candidate_inputs(store, candidates, queries["query_input_ids"], data)
  return {name: queries[name] for name in MASK_FEATURES} | joint


def read_gold(model: RealmModel, params, batch: dict[str, jax.Array], deterministic: bool = True,
              rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """log p(gold piece | candidate, query) and the reader's argmax piece, both [B, K, M]."""
  joint = {name: batch[name] for name in FEATURES}
  log_probs = model.apply({"params": params}, joint, batch["mlm_positions"], deterministic,
                          method=RealmModel.read, rngs=None if rng is None else {"dropout": rng})
  gold = jnp.take_along_axis(log_probs, batch["mlm_ids"][:, None, :, None], axis=-1)[..., 0]
  return gold, jnp.argmax(log_probs, -1)


def copy_metrics(gold: np.ndarray, predicted: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> dict[str, float]:
  """Held-out figures from gold log-probs and argmax ids [B, 2, M] (candidate 0 = null, 1 = oracle), gold ids and
  mask weights [B, M]."""
  total = max(float(weights.sum()), 1.0)
  mean = lambda x: float((x * weights).sum() / total)  # noqa: E731
  return {
      "oracle_log_likelihood": mean(gold[:, 1]),
      "null_log_likelihood": mean(gold[:, 0]),
      "copy_gain": mean(gold[:, 1] - gold[:, 0]),
      "oracle_accuracy": mean(predicted[:, 1] == ids),
      "null_accuracy": mean(predicted[:, 0] == ids),
  }


def run_reader_copy(
    block_store: str,
    reader: BertConfig,
    mesh: jax.sharding.Mesh,
    reader_init: str | None = None,
    data: RealmDataConfig | None = None,
    num_steps: int = 1000,
    learning_rate: float = 3e-5,
    mlm_head_learning_rate: float | None = None,
    warmup_steps: int = 10,
    eval_every: int = 100,
    eval_queries: int = 256,
    seed: int = 0,
) -> list[dict[str, float]]:
  """Trains reader + MLM head on oracle candidates; held-out copy figures at step 0 and every `eval_every`.

  `reader_init` as REALM pre-training's READER_INIT ('realm:<workdir>', 'hf_realm:<dir>', a HF BERT dir or
  'minilm'; None: random).  `mlm_head_learning_rate` as in REALM pre-training.  Held-out queries come from
  `data` with another seed.
  """
  data = data or RealmDataConfig(batch_size=16)
  store = BlockStore(block_store)
  model = RealmModel(reader, reader)
  train = realm_query_dataset(store, data)
  held_out = realm_query_dataset(store, dataclasses.replace(data, seed=data.seed + 1))
  eval_batches = [oracle_batch(store, held_out[i], data, with_null=True)
                  for i in range(max(1, eval_queries // data.batch_size))]
  example = oracle_batch(store, train[0], data, with_null=False)
  joint = {name: example[name] for name in FEATURES}
  loaded = load_reader_init(reader_init, model, mesh) if reader_init else {}

  def oracle_loss(params, batch, rng):
    gold = read_gold(model, params, batch, deterministic=False, rng=rng)[0][:, 0]
    return -(gold * batch["mlm_weights"]).sum() / jnp.maximum(batch["mlm_weights"].sum(), 1.0), {}

  trainer = Trainer(
      init_params=lambda rng: model.init(rng, joint, example["mlm_positions"], method=RealmModel.read)["params"],
      loss_fn=oracle_loss,
      optimizer=bert_adamw(learning_rate, num_steps, warmup_steps=warmup_steps,
                           multipliers=subtree_multipliers(learning_rate, mlm_head=mlm_head_learning_rate)),
      mesh=mesh,
      workdir=None,
      config=TrainerConfig(num_steps, seed=seed),
  )
  state = trainer.init_state(lambda params: params | loaded)
  evaluate_batch = jax.jit(lambda p, batch: read_gold(model, p, batch))

  def evaluate(step: int, train_losses: list[float], started: float) -> dict[str, float]:
    with jax.set_mesh(mesh):
      outputs = [jax.device_get(evaluate_batch(state.params, partitioning.shard_batch(b, mesh)))
                 for b in eval_batches]
    gold, predicted = (np.concatenate(x) for x in zip(*outputs, strict=True))
    ids, weights = (np.concatenate([b[name] for b in eval_batches]) for name in ("mlm_ids", "mlm_weights"))
    row = {"step": step, **copy_metrics(gold, predicted, ids, weights),
           "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
           "seconds": time.perf_counter() - started}
    logging.info("reader copy probe %s", " ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return row

  started, losses = time.perf_counter(), []
  history = [evaluate(0, losses, started)]
  for step in range(1, num_steps + 1):
    state, metrics = trainer.step(state, oracle_batch(store, train[step - 1], data, with_null=False))
    losses.append(float(metrics["loss"]))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"reader copy probe: loss {losses[-1]} at step {step}")
    if step % eval_every == 0 or step == num_steps:
      history.append(evaluate(step, losses, started))
      losses = []
  return history


def markdown_table(history: list[dict[str, Any]]) -> str:
  """The probe's history as a markdown table."""
  lines = ["| step | train loss | oracle log-lik | null log-lik | copy gain | oracle acc | null acc |",
           "|---|---|---|---|---|---|---|"]
  for r in history:
    lines.append(f"| {r['step']} | {r['train_loss']:.3f} | {r['oracle_log_likelihood']:.3f} | "
                 f"{r['null_log_likelihood']:.3f} | {r['copy_gain']:+.3f} | {r['oracle_accuracy']:.3f} | "
                 f"{r['null_accuracy']:.3f} |")
  return "\n".join(lines)
