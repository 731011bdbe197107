"""The reader-copy probe run: the REALM reader and MLM head trained on oracle candidates (`eval.reader_copy`)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from realm_jax import partitioning
from realm_jax.checkpoints import init as init_lib
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.realm import RealmDataConfig, realm_query_dataset
from realm_jax.eval.reader_copy import copy_metrics, oracle_batch, read_gold
from realm_jax.models.bert import BertConfig
from realm_jax.objectives.objective import Objective
from realm_jax.objectives.realm import RealmModel
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, make_trainer


def run_reader_copy(mesh: jax.sharding.Mesh, block_store: str, reader: BertConfig, trainer: TrainerConfig,
                    optimizer: OptimizerConfig, reader_init: str | None = None, data: RealmDataConfig | None = None,
                    eval_queries: int = 256) -> list[dict[str, float]]:
  """Trains reader + MLM head on oracle candidates; held-out copy figures at step 0 and every
  `trainer.eval_every` steps (no checkpoints).

  `reader_init` as REALM pre-training's ('realm:<workdir>', 'hf_realm:<dir>', a HF BERT dir or 'minilm'; None:
  random).  Held-out queries come from `data` with another seed.
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
  loaded = init_lib.load_realm_reader(reader_init, model).subtrees if reader_init else {}

  def oracle_loss(params, batch, rng):
    gold = read_gold(model, params, batch, deterministic=False, rng=rng)[0][:, 0]
    return -(gold * batch["mlm_weights"]).sum() / jnp.maximum(batch["mlm_weights"].sum(), 1.0), {}

  objective = Objective(
      init_params=lambda rng: model.init(rng, joint, example["mlm_positions"], method=RealmModel.read)["params"],
      loss_fn=oracle_loss, batch_size=data.batch_size)
  probe = make_trainer(objective, mesh, None, trainer, optimizer)
  state = probe.init_state(lambda params: params | loaded)
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
  for step in range(1, trainer.num_steps + 1):
    state, metrics = probe.step(state, oracle_batch(store, train[step - 1], data, with_null=False))
    losses.append(float(metrics["loss"]))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"reader copy probe: loss {losses[-1]} at step {step}")
    if (trainer.eval_every and step % trainer.eval_every == 0) or step == trainer.num_steps:
      history.append(evaluate(step, losses, started))
      losses = []
  return history
