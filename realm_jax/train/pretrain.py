"""REALM pre-training run: masked queries -> retrieval on the live index -> marginal MLM step.

Each step: (1) the grain iterator yields salient-span masked queries; (2) `prepare_batch` embeds
them with the CURRENT query tower, searches the newest published index (stale block embeddings,
REALM's off-policy selection), removes trivial retrievals, prepends the null block and builds
candidate/joint inputs; (3) the jit step re-scores the candidates with fresh parameters so
gradients reach both towers and the reader.  Indexes are hot-swapped between steps.
Logged besides the loss: MLM accuracy, retrieval utility (marginal vs null-block log-likelihood),
p(null), `span_retrieved` (share of queries whose masked span is in a candidate the reader saw),
index step and staleness, examples/s; with held-out blocks (`eval_blocks`), the held-out `eval_*` metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning, storage
from realm_jax.checkpoints import hf_realm
from realm_jax.data.blocks import BlockStore
from realm_jax.data.realm import (
  FEATURES,
  MaskedQueries,
  RealmDataConfig,
  candidate_inputs,
  realm_query_dataset,
  select_candidates,
  span_in_candidates,
)
from realm_jax.errors import InputError
from realm_jax.eval.realm_mlm import HeldOutMlm
from realm_jax.models.bert import BertConfig
from realm_jax.objectives.ict import load_pretrained_encoder, with_pretrained_towers
from realm_jax.objectives.realm import RealmModel, realm_loss
from realm_jax.refresh.refresher import RefreshConfig, RetrieverDescription, abstract_tower_params, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.mips import SearchConfig
from realm_jax.train.optimizer import bert_adamw, subtree_multipliers
from realm_jax.train.trainer import (
  Trainer,
  TrainerConfig,
  TrainState,
  abstract_params,
  latest_checkpoint_step,
  restore_params_subtree,
)


def load_retriever_init(spec: str, encoder: BertConfig, projection_size: int, mesh) -> dict[str, Any]:
  """'ict:<workdir>' -> the ICT run's tower params; 'hf_realm:<dir>' -> a HF REALM embedder/scorer/openqa's
  towers; else a HF BERT dir / 'minilm' -> encoder weights only."""
  if spec.startswith(hf_realm.SPEC_PREFIX):
    towers = hf_realm.load_hf_realm_retriever(spec, encoder, projection_size)
    return {"tower": towers["query_tower"]} if len(towers) == 1 else {"towers": towers}
  if spec.startswith("ict:"):
    train_dir = storage.as_path(spec[4:]) / "train"
    step = latest_checkpoint_step(train_dir)
    if step is None:
      raise FileNotFoundError(f"{train_dir}: no ICT checkpoint to start the retriever from")
    tower = restore_params_subtree(train_dir, step, ("query_tower",), abstract_tower_params(encoder, projection_size),
                                   NamedSharding(mesh, P()))
    logging.info("retriever starts from ICT checkpoint %s step %d", train_dir, step)
    return {"tower": jax.device_get(tower)}
  return {"encoder": load_pretrained_encoder(spec, encoder)}


def with_retriever_init(retriever: dict[str, Any], loaded: dict[str, Any], spec: str | None) -> dict[str, Any]:
  """DualEncoder params with what `load_retriever_init(spec)` returned put in place ({} keeps them)."""
  if "tower" in loaded:
    return {t: loaded["tower"] for t in retriever}
  if "towers" in loaded:
    if set(loaded["towers"]) != set(retriever):
      raise InputError(f"retriever_init {spec}: towers {sorted(loaded['towers'])}, the model has "
                       f"{sorted(retriever)} (check share_towers)")
    return loaded["towers"]
  if "encoder" in loaded:
    return with_pretrained_towers(retriever, loaded["encoder"])
  return retriever


REALM_SPEC_PREFIX = "realm:"  # gin init specs: READER_INIT = 'realm:<REALM pre-training workdir>'


def abstract_realm_params(model: RealmModel) -> dict[str, Any]:
  """Shapes of a RealmModel's parameters (no memory, no FLOPs)."""
  spec = realm_batch_spec(RealmDataConfig(batch_size=1), num_candidates=1)
  return abstract_params(model, {name: jnp.zeros(x.shape, x.dtype) for name, x in spec.items()})


def load_realm_checkpoint(workdir: storage.PathLike, model: RealmModel, names: tuple[str, ...],
                          mesh) -> tuple[dict[str, Any], int]:
  """The `names` subtrees ('retriever', 'reader', 'mlm_head') of a REALM run's newest checkpoint, and its step."""
  train_dir = storage.as_path(workdir) / "train"
  step = latest_checkpoint_step(train_dir)
  if step is None:
    raise FileNotFoundError(f"{train_dir}: no REALM pre-training checkpoint")
  full = abstract_realm_params(model)
  replicated = NamedSharding(mesh, P())
  params = {name: jax.device_get(restore_params_subtree(train_dir, step, (name,), full[name], replicated))
            for name in names}
  logging.info("%s start from REALM checkpoint %s step %d", "/".join(names), train_dir, step)
  return params, step


def load_reader_init(spec: str, model: RealmModel, mesh) -> dict[str, Any]:
  """RealmModel subtrees: 'realm:<workdir>' -> a REALM run's newest {'reader', 'mlm_head'}; 'hf_realm:<dir>'
  -> a RealmKnowledgeAugEncoder's {'reader', 'mlm_head'}; else a HF BERT dir / 'minilm' -> {'reader'} (the
  MLM head starts afresh)."""
  if spec.startswith(REALM_SPEC_PREFIX):
    return load_realm_checkpoint(spec[len(REALM_SPEC_PREFIX):], model, ("reader", "mlm_head"), mesh)[0]
  if spec.startswith(hf_realm.SPEC_PREFIX):
    return hf_realm.load_hf_realm_encoder(spec, model.reader_config)
  return {"reader": load_pretrained_encoder(spec, model.reader_config)}


@dataclasses.dataclass
class RealmRun:
  """Everything a REALM pre-training run needs besides the trainer loop."""

  model: RealmModel
  store: BlockStore
  data_config: RealmDataConfig
  retrieval: bool
  null_document: bool
  mesh: Any
  exclude_trivial: bool = True
  search: SearchConfig = SearchConfig()

  def __post_init__(self):
    self._embed_queries = jax.jit(lambda p, q: self.model.apply(
        {"params": p}, q, True, method=RealmModel.embed_queries), out_shardings=NamedSharding(self.mesh, P()))
    self.live = index_lib.LiveIndex(self.mesh, search=self.search)

  def prepare_batch(self, state: TrainState, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Completes this process's part of the batch; all processes search the whole batch's queries."""
    return self.complete(state.params, batch)

  def complete(self, params: Any, batch: dict[str, np.ndarray],
               exclude_trivial: bool | None = None) -> dict[str, np.ndarray]:
    """`prepare_batch` with the given parameters; `exclude_trivial` (None: the run's) overrides the run's
    setting (the held-out evaluation always excludes the query's own block)."""
    c = self.data_config
    exclude_trivial = self.exclude_trivial if exclude_trivial is None else exclude_trivial
    size = len(batch["block_id"])
    if not self.retrieval:  # ablation: the null block only
      candidates, weights = np.full((size, 1), -1, np.int64), np.ones(size, np.float32)
    else:
      queries = {k: batch[f"query_{k}"] for k in FEATURES}
      with jax.set_mesh(self.mesh):
        query_emb = np.asarray(self._embed_queries(params, partitioning.shard_batch(queries, self.mesh)))
      retrieved, _ = self.live.searcher.search(query_emb, c.num_candidates)
      retrieved = retrieved[partitioning.process_rows(self.mesh, len(retrieved))]
      candidates, weights = select_candidates(retrieved, batch["block_id"], self.store.arrays["uids"],
                                              c.num_candidates, self.null_document, exclude_trivial)
    blocks, joint = candidate_inputs(self.store, candidates, batch["query_input_ids"], c)
    return {
        **batch,
        **{f"block_{k}": v for k, v in blocks.items()},
        **{f"joint_{k}": v for k, v in joint.items()},
        "example_weight": weights,
        "span_retrieved": span_in_candidates(joint, batch["mlm_ids"], batch["mlm_weights"]),
    }


def realm_batch_spec(data: RealmDataConfig, num_candidates: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of the batch the train step sees (after `RealmRun.prepare_batch`)."""
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


def realm_trainer(
    model: RealmModel, data: RealmDataConfig, mesh: jax.sharding.Mesh, workdir: str | None, retrieval: bool = True,
    per_example_marginal: bool = False, num_steps: int = 200_000, learning_rate: float = 3e-5,
    warmup_steps: int | None = None, checkpoint_every: int = 1000, log_every: int = 100, seed: int = 0,
    retriever_learning_rate: float | None = None, mlm_head_learning_rate: float | None = None, eval_every: int = 0,
) -> Trainer:
  """The REALM trainer (`workdir=None`: no checkpoints, for ahead-of-time compilation)."""
  multipliers = subtree_multipliers(learning_rate, retriever=retriever_learning_rate, mlm_head=mlm_head_learning_rate)
  spec = realm_batch_spec(dataclasses.replace(data, batch_size=1), data.num_candidates if retrieval else 1)
  example = {name: jnp.zeros(x.shape, x.dtype) for name, x in spec.items()}
  return Trainer(
      init_params=lambda rng: model.init(rng, example)["params"],
      loss_fn=lambda params, batch, rng: realm_loss(model, params, batch, rng, per_example_marginal),
      optimizer=bert_adamw(learning_rate, num_steps, warmup_steps=warmup_steps, multipliers=multipliers),
      mesh=mesh,
      workdir=workdir,
      config=TrainerConfig(num_steps, checkpoint_every, log_every, seed=seed, eval_every=eval_every),
  )


def run_pretrain(
    workdir: str,
    block_store: str,
    retriever: BertConfig,
    reader: BertConfig,
    mesh: jax.sharding.Mesh,
    data: RealmDataConfig | None = None,
    search: SearchConfig | None = None,
    retriever_init: str | None = None,
    reader_init: str | None = None,
    projection_size: int = 128,
    share_towers: bool = True,
    retriever_layer_norm_eps: float = 1e-3,
    projection_init: str = "normal",
    retrieval_score_scale: float = 1.0,
    retrieval: bool = True,
    null_document: bool = True,
    exclude_trivial: bool = True,
    per_example_marginal: bool = False,
    bootstrap_index: bool = True,
    index_batch_size: int = 256,
    index_wait_seconds: float | None = 3600.0,
    index_poll_seconds: float = 5.0,
    index_max_failures: int = 5,
    max_index_staleness: int | None = None,
    num_steps: int = 200_000,
    learning_rate: float = 3e-5,
    retriever_learning_rate: float | None = None,
    mlm_head_learning_rate: float | None = None,
    warmup_steps: int | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    eval_every: int = 0,
    seed: int = 0,
) -> list[dict[str, float]]:
  """REALM pre-training (paper: batch 512, 200k steps, lr 3e-5, 8 candidates incl. null).

  `retriever_learning_rate` (None: `learning_rate`, as the paper) is the retriever's peak lr, on the same
  schedule: a reader whose MLM head starts from scratch wants a higher lr than a pretrained retriever can take.
  `mlm_head_learning_rate` (None: `learning_rate`) likewise for the MLM head: one that starts from scratch
  needs to move its bias by several nats, which Adam at a BERT lr (<= lr per step) cannot do in a short run.

  `retrieval_score_scale` multiplies the inner products before the softmax over candidates (1.0: the released
  code).  A retriever whose embeddings are LayerNorm'd sentence vectors (MiniLM: 384-d, identity projection)
  has inner products of ~384 x cosine, so p(z|x) is one-hot on the top block and the null block never gets
  weight; 20 / 384 gives softmax(20 cosine), the scale MiniLM's contrastive loss was trained at.

  `exclude_trivial=False` keeps the query's own block among the candidates (the paper's §3.4: the reader
  then learns to copy, the retriever to match surface strings): the `keep_trivial_retrievals` ablation.

  With `data.eval_blocks` > 0 the held-out MLM evaluation (`eval.realm_mlm`) runs every `eval_every` steps
  (0: at the last step only) on the live index, never retrieving a query's own block; its `eval_*` metrics
  join the logged ones (an evaluation step is also a logging step).

  `max_index_staleness` (None: unbounded, as the paper) makes a step wait for the refresh job when the
  installed index is more than that many steps old, for at most `index_wait_seconds`.  `index_max_failures`
  consecutive failed index reads (after retries) stop the run with an error naming the index.
  `index_batch_size` (gin: INDEX_BATCH_SIZE, the refresh job's too) is the bootstrap index's embedding batch.

  `search` (None: exact) is how the live index is searched: exact as a running top-k over row chunks, or
  `lax.approx_max_k` with a recall target (`SearchConfig.approximate`).
  """
  data = data or RealmDataConfig()
  if eval_every and not data.eval_blocks:
    raise InputError(f"eval_every={eval_every} needs held-out blocks: set RealmDataConfig.eval_blocks > 0")
  store = BlockStore(block_store)
  model = RealmModel(retriever, reader, projection_size, share_towers, retriever_layer_norm_eps, projection_init,
                     retrieval_score_scale)
  tower_path = ("retriever", "query_tower" if share_towers else "block_tower")
  description = RetrieverDescription(retriever, tower_path, data.block_len, projection_size, projection_init,
                                     retriever_layer_norm_eps, share_towers, retrieval_score_scale,
                                     store.manifest["tokenizer"])
  description.write(workdir)
  run = RealmRun(model, store, data, retrieval, null_document, mesh, exclude_trivial, search or SearchConfig())
  retriever_params = load_retriever_init(retriever_init, retriever, projection_size, mesh) if retriever_init else {}
  reader_params = load_reader_init(reader_init, model, mesh) if reader_init else {}

  def pretrained(params):
    params = dict(params)
    params["retriever"] = with_retriever_init(params["retriever"], retriever_params, retriever_init)
    return params | reader_params

  trainer = realm_trainer(model, data, mesh, workdir, retrieval, per_example_marginal, num_steps, learning_rate,
                          warmup_steps, checkpoint_every, log_every, seed, retriever_learning_rate,
                          mlm_head_learning_rate, eval_every)
  masked = MaskedQueries(store, data)
  evaluate = None
  if data.eval_blocks:
    held_out = HeldOutMlm(model, mesh, masked.eval_batches(data.batch_size),
                          functools.partial(run.complete, exclude_trivial=True), workdir)
    evaluate = lambda state: held_out(state.params, int(state.step))  # noqa: E731
  queries = iter(realm_query_dataset(store, data, masked).to_iter_dataset())
  index_dir = storage.as_path(workdir) / "index"
  reader_thread, state = None, None
  if retrieval:
    fresh = not index_lib.committed_steps(index_dir) and trainer.checkpoints.latest_step() is None
    if bootstrap_index and partitioning.agree(fresh):
      state = trainer.init_state(pretrained)  # also the first train state: initialised once
      tower = jax.device_get(state.params["retriever"][tower_path[1]])
      rows = embed_all_blocks(tower, RefreshConfig(retriever, projection_size, retriever_layer_norm_eps, tower_path,
                                                   data.block_len, batch_size=index_batch_size), store, mesh,
                              desc="bootstrap index")
      if jax.process_index() == 0:
        index_lib.remove_uncommitted(index_dir, writer="bootstrap")  # a bootstrap killed mid-publish
      partitioning.barrier("bootstrap index: stale data removed")
      index_lib.publish_index(index_dir, 0, rows, store, writer="bootstrap")  # each process its rows; all load it
    reader_thread = run.live.reader(index_dir, store, index_poll_seconds, max_index_staleness,
                                    index_wait_seconds, index_max_failures).start()
    reader_thread.wait_for_first(index_wait_seconds)
  try:
    _, history = trainer.fit(
        queries, pretrained, batch_size=data.batch_size, prepare_batch=run.prepare_batch,
        before_step=reader_thread.maybe_swap if reader_thread else None, initial_state=state, evaluate=evaluate,
    )
  finally:
    if reader_thread:
      reader_thread.close()
  return history

