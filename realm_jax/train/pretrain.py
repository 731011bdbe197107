"""REALM pre-training run: masked queries -> retrieval on the live index -> marginal MLM step.

Each step: (1) the grain iterator yields salient-span masked queries; (2) `prepare_batch` embeds
them with the CURRENT query tower, searches the newest published index (stale block embeddings,
REALM's off-policy selection), removes trivial retrievals, prepends the null block and builds
candidate/joint inputs; (3) the jit step re-scores the candidates with fresh parameters so
gradients reach both towers and the reader.  Indexes are hot-swapped between steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning
from realm_jax.checkpoints import hf_realm
from realm_jax.data.blocks import BlockStore
from realm_jax.data.realm import FEATURES, RealmDataConfig, candidate_inputs, realm_query_dataset, select_candidates
from realm_jax.models.bert import BertConfig
from realm_jax.objectives.ict import load_pretrained_encoder, with_pretrained_towers
from realm_jax.objectives.realm import RealmModel, realm_loss
from realm_jax.refresh.refresher import RefreshConfig, abstract_tower_params, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.train.optimizer import bert_adamw
from realm_jax.train.trainer import Trainer, TrainerConfig, TrainState, latest_checkpoint_step, restore_params_subtree


def load_retriever_init(spec: str, encoder: BertConfig, projection_size: int, mesh) -> dict[str, Any]:
  """'ict:<workdir>' -> the ICT run's tower params; 'hf_realm:<dir>' -> a HF REALM embedder/scorer/openqa's
  towers; else a HF BERT dir / 'minilm' -> encoder weights only."""
  if spec.startswith(hf_realm.SPEC_PREFIX):
    towers = hf_realm.load_hf_realm_retriever(spec, encoder, projection_size)
    return {"tower": towers["query_tower"]} if len(towers) == 1 else {"towers": towers}
  if spec.startswith("ict:"):
    train_dir = Path(spec[4:]) / "train"
    step = latest_checkpoint_step(train_dir)
    if step is None:
      raise FileNotFoundError(f"{train_dir}: no ICT checkpoint to start the retriever from")
    tower = restore_params_subtree(train_dir, step, ("query_tower",), abstract_tower_params(encoder, projection_size),
                                   NamedSharding(mesh, P()))
    logging.info("retriever starts from ICT checkpoint %s step %d", train_dir, step)
    return {"tower": jax.device_get(tower)}
  return {"encoder": load_pretrained_encoder(spec, encoder)}


def load_reader_init(spec: str, reader: BertConfig) -> dict[str, Any]:
  """RealmModel subtrees: 'hf_realm:<dir>' -> a RealmKnowledgeAugEncoder's {'reader', 'mlm_head'};
  else a HF BERT dir / 'minilm' -> {'reader'} (the MLM head starts afresh)."""
  if spec.startswith(hf_realm.SPEC_PREFIX):
    return hf_realm.load_hf_realm_encoder(spec, reader)
  return {"reader": load_pretrained_encoder(spec, reader)}


@dataclasses.dataclass
class RealmRun:
  """Everything a REALM pre-training run needs besides the trainer loop."""

  model: RealmModel
  store: BlockStore
  data_config: RealmDataConfig
  retrieval: bool
  null_document: bool
  mesh: Any

  def __post_init__(self):
    self._embed_queries = jax.jit(lambda p, q: self.model.apply(
        {"params": p}, q, True, method=RealmModel.embed_queries))
    self.live = index_lib.LiveIndex(self.mesh)

  def prepare_batch(self, state: TrainState, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = self.data_config
    size = len(batch["block_id"])
    if not self.retrieval:  # ablation: the null block only
      candidates, weights = np.full((size, 1), -1, np.int64), np.ones(size, np.float32)
    else:
      queries = {k: batch[f"query_{k}"] for k in FEATURES}
      with jax.set_mesh(self.mesh):
        query_emb = np.asarray(self._embed_queries(state.params, partitioning.shard_batch(queries, self.mesh)))
      retrieved, _ = self.live.searcher.search(query_emb, c.num_candidates)
      candidates, weights = select_candidates(retrieved, batch["block_id"], self.store.arrays["uids"],
                                              c.num_candidates, self.null_document)
    blocks, joint = candidate_inputs(self.store, candidates, batch["query_input_ids"], c)
    return {
        **batch,
        **{f"block_{k}": v for k, v in blocks.items()},
        **{f"joint_{k}": v for k, v in joint.items()},
        "example_weight": weights,
    }


def run_pretrain(
    workdir: str,
    block_store: str,
    retriever: BertConfig,
    reader: BertConfig,
    mesh: jax.sharding.Mesh,
    data: RealmDataConfig | None = None,
    retriever_init: str | None = None,
    reader_init: str | None = None,
    projection_size: int = 128,
    share_towers: bool = True,
    retriever_layer_norm_eps: float = 1e-3,
    retrieval: bool = True,
    null_document: bool = True,
    per_example_marginal: bool = False,
    bootstrap_index: bool = True,
    index_wait_seconds: float | None = 3600.0,
    index_poll_seconds: float = 5.0,
    num_steps: int = 200_000,
    learning_rate: float = 3e-5,
    warmup_steps: int | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    seed: int = 0,
) -> list[dict[str, float]]:
  """REALM pre-training (paper: batch 512, 200k steps, lr 3e-5, 8 candidates incl. null)."""
  data = data or RealmDataConfig()
  store = BlockStore(block_store)
  model = RealmModel(retriever, reader, projection_size, share_towers, retriever_layer_norm_eps)
  run = RealmRun(model, store, data, retrieval, null_document, mesh)
  k = 1 if not retrieval else data.num_candidates
  shapes = {
      **{f"query_{n}": (1, data.query_len) for n in FEATURES},
      **{f"block_{n}": (1, k, data.block_len) for n in FEATURES},
      **{f"joint_{n}": (1, k, data.joint_len) for n in FEATURES},
      "mlm_positions": (1, data.max_masks), "mlm_ids": (1, data.max_masks),
  }
  example = {name: jnp.zeros(shape, jnp.int32) for name, shape in shapes.items()}

  retriever_params = load_retriever_init(retriever_init, retriever, projection_size, mesh) if retriever_init else {}
  reader_params = load_reader_init(reader_init, reader) if reader_init else {}

  def pretrained(params):
    params = dict(params)
    if "tower" in retriever_params:
      params["retriever"] = {t: retriever_params["tower"] for t in params["retriever"]}
    elif "towers" in retriever_params:
      if set(retriever_params["towers"]) != set(params["retriever"]):
        raise ValueError(f"retriever_init {retriever_init}: towers {sorted(retriever_params['towers'])}, the model "
                         f"has {sorted(params['retriever'])} (check share_towers)")
      params["retriever"] = retriever_params["towers"]
    elif "encoder" in retriever_params:
      params["retriever"] = with_pretrained_towers(params["retriever"], retriever_params["encoder"])
    return params | reader_params

  trainer = Trainer(
      init_params=lambda rng: model.init(rng, example)["params"],
      loss_fn=lambda params, batch, rng: realm_loss(model, params, batch, rng, per_example_marginal),
      optimizer=bert_adamw(learning_rate, num_steps, warmup_steps=warmup_steps),
      mesh=mesh,
      workdir=workdir,
      config=TrainerConfig(num_steps, checkpoint_every, log_every, seed=seed),
  )
  queries = iter(realm_query_dataset(store, data).to_iter_dataset())
  index_dir = Path(workdir) / "index"
  reader_thread, state = None, None
  if retrieval:
    if bootstrap_index and not index_lib.committed_steps(index_dir) and trainer.checkpoints.latest_step() is None:
      state = trainer.init_state(pretrained)  # also the first train state: initialised once
      tower = jax.device_get(state.params["retriever"]["block_tower" if not share_towers else "query_tower"])
      embeddings = embed_all_blocks(tower, RefreshConfig(retriever, projection_size, retriever_layer_norm_eps,
                                                         block_len=data.block_len,
                                                         batch_size=max(64, mesh.shape["data"])), store, mesh,
                                    desc="bootstrap index")
      index_lib.publish_index(index_dir, 0, embeddings, store, writer="bootstrap")
    reader_thread = run.live.reader(index_dir, store, index_poll_seconds).start()
    reader_thread.wait_for_first(index_wait_seconds)
  try:
    _, history = trainer.fit(
        queries, pretrained, batch_size=data.batch_size, prepare_batch=run.prepare_batch,
        before_step=reader_thread.maybe_swap if reader_thread else None, initial_state=state,
    )
  finally:
    if reader_thread:
      reader_thread.close()
  return history

