"""Open-QA fine-tuning run (ORQA/REALM §9): frozen block index, query tower + reader trained.

The index is built once from the starting retriever (REALM's pre-trained block tower) and published
in `<workdir>/index` (reused on resume).  Each step: the batch's questions are embedded with the
CURRENT query tower, the frozen index gives the top `retrieve_k` blocks, and the jit step re-scores them
exactly (gradients reach the query tower only) and reads the top `reader_k`.

ORQA's recipe (`FinetuneRecipe`): the training questions are resplit into train and dev (ORQA: 1 in 10 by a hash
of the question text) or a dev file is given; fine-tuning never sees a dev question.  Every
`TrainerConfig.eval_every` steps (a multiple of `checkpoint_every`) and at the last, dev exact match is measured
with the current parameters, and the best step (highest dev EM, ties to the later step) is recorded once its
checkpoint is saved (`<workdir>/dev_eval/step_<N>.json`, `checkpoints.best`) and kept from orbax's clean-up;
evaluation, `launch/ask.py` and `launch/convert.py` load it.  A restart refuses another dev set or stale records
(`best.resume_record`) and first evaluates a restored evaluation step left without a record.  The dev evaluation
runs on one JAX process only.  `num_epochs` gives the length in epochs over the train resplit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from realm_jax import partitioning, storage
from realm_jax.checkpoints import best
from realm_jax.checkpoints import init as init_lib
from realm_jax.checkpoints.train_dir import TRAIN_DIR, latest_checkpoint_step
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.openqa import OpenQaFeaturizer, question_dataset
from realm_jax.data.questions import Question, read_questions, resplit
from realm_jax.errors import InputError
from realm_jax.eval.answers import exact_match
from realm_jax.eval.predict import Predictor
from realm_jax.objectives.openqa import OpenQaModel, OpenQaSpec
from realm_jax.objectives.realm import RealmModel
from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import Searcher, get_backend
from realm_jax.retrieval.index import INDEX_DIR
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, TrainHooks, TrainState, make_trainer


@dataclasses.dataclass
class OpenQaRun:
  """Retrieval on the frozen index + featurisation for each training batch."""

  model: OpenQaModel
  featurizer: OpenQaFeaturizer
  questions: list[Question]
  embeddings: np.ndarray
  searcher: Searcher
  mesh: Any

  def __post_init__(self):
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
                 pretrained_index: tuple[storage.PathLike, int] | None = None) -> tuple[np.ndarray, Searcher]:
  """The fine-tuning index: `<workdir>/index`'s newest; else `pretrained_index` ((index dir, step): the REALM run's
  index of the very checkpoint fine-tuning starts from); else embedded now from `tower`.  Published in
  `<workdir>/index` (each process its rows, with the assets of `refresh.search`'s backend) and returned as a memory
  map of the published file(s) with a searcher of that backend."""
  index_dir = storage.as_path(workdir) / INDEX_DIR
  steps = index_lib.committed_steps(index_dir)
  if steps:
    return index_lib.load_searcher(index_dir, steps[-1], store, mesh, refresh.search, refresh.rules)
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
  index_lib.publish_index(index_dir, 0, rows, store, get_backend(refresh.search), writer="finetune")
  return index_lib.load_searcher(index_dir, 0, store, mesh, refresh.search, refresh.rules)


def starting_weights(spec: OpenQaSpec) -> tuple[Any, tuple[storage.PathLike, int] | None]:
  """`TrainHooks.pretrained` for the spec's inits, and (index dir, step) of the REALM run whose index of that very
  checkpoint fine-tuning can reuse (`init='realm:<workdir>'`; else None)."""
  if spec.init is not None:
    if init_lib.kind(spec.init) != init_lib.REALM:
      raise InputError(f"init={spec.init!r}: expected '{init_lib.REALM}<REALM pre-training workdir>'")
    realm_dir = storage.as_path(spec.init[len(init_lib.REALM):])
    r = spec.retriever
    realm_model = RealmModel(r.encoder, spec.reader, r.projection_size, r.share_towers)
    realm, step = init_lib.load_realm_run(realm_dir, realm_model, ("retriever", "reader"))
    return (lambda params: {**params, "retriever": realm["retriever"],
                            "reader": {**params["reader"], "encoder": realm["reader"]}}), (realm_dir / INDEX_DIR, step)
  retriever = init_lib.load_retriever(spec.retriever_init, spec.retriever) if spec.retriever_init else None
  reader = (init_lib.load_openqa_reader(spec.reader_init, spec.reader, spec.span_hidden_size,
                                        spec.data.max_span_width, spec.reader_layer_norm_eps)
            if spec.reader_init else {})

  def pretrained(params):
    params = dict(params)
    if retriever is not None:
      params["retriever"] = retriever.into_retriever(params["retriever"])
    params["reader"] = {**params["reader"], **reader}
    return params

  return pretrained, None


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
  """ORQA's fine-tuning recipe (gin: `finetune.FinetuneRecipe`).

  `dev_fraction`: the share of the training questions held out as dev (`questions.resplit`, by a hash of the
  question text; ORQA: 0.1); 0 with `dev_questions` None: no dev evaluation.  `dev_questions`: a dev JSONL file
  instead (e.g. ORQA's published resplit); training questions with a dev question's text are dropped.
  `num_epochs`: when set, the run's length in epochs over the train resplit (ceil(epochs * questions /
  batch_size) steps), replacing `TrainerConfig.num_steps`.  `dev_batch_size`: questions answered at a time.
  """

  dev_fraction: float = 0.0
  dev_questions: str | None = None
  num_epochs: float | None = None
  dev_batch_size: int = 8


def split_questions(train_questions: str, recipe: FinetuneRecipe) -> tuple[list[Question], list[Question]]:
  """(train, dev) questions of the recipe; neither may be empty when asked for."""
  questions = read_questions(train_questions, skip_unanswerable=True)
  if recipe.dev_questions is not None:
    if recipe.dev_fraction:
      raise InputError(f"FinetuneRecipe: dev_fraction={recipe.dev_fraction} and dev_questions="
                       f"{recipe.dev_questions!r} both given; choose one")
    dev = read_questions(recipe.dev_questions)
    texts = {q.question for q in dev}
    train = [q for q in questions if q.question not in texts]
    if len(train) < len(questions):
      logging.info("%s: %d training questions are dev questions of %s: not trained on", train_questions,
                   len(questions) - len(train), recipe.dev_questions)
  else:
    train, dev = resplit(questions, recipe.dev_fraction)
    if recipe.dev_fraction and not dev:
      raise InputError(f"{train_questions}: dev_fraction={recipe.dev_fraction} holds out none of its "
                       f"{len(questions)} questions; raise it or give dev_questions")
  if not train:
    raise InputError(f"{train_questions}: no training question left after the dev split")
  logging.info("fine-tuning questions: %d train, %d dev", len(train), len(dev))
  return train, dev


def epochs_to_steps(trainer: TrainerConfig, recipe: FinetuneRecipe, num_train: int, batch_size: int
                    ) -> TrainerConfig:
  """`trainer` with `num_steps` from `recipe.num_epochs` when set (logged), else unchanged."""
  if recipe.num_epochs is None:
    logging.info("fine-tuning length: num_steps=%d = %.3g epochs of %d train questions at batch %d",
                 trainer.num_steps, trainer.num_steps * batch_size / num_train, num_train, batch_size)
    return trainer
  if recipe.num_epochs <= 0:
    raise InputError(f"FinetuneRecipe.num_epochs={recipe.num_epochs}: must be > 0")
  steps = math.ceil(recipe.num_epochs * num_train / batch_size)
  logging.info("fine-tuning length: num_epochs=%g over %d train questions at batch %d = %d steps "
               "(TrainerConfig.num_steps=%d not used)", recipe.num_epochs, num_train, batch_size, steps,
               trainer.num_steps)
  return dataclasses.replace(trainer, num_steps=steps)


class BestCheckpoint:
  """The best dev evaluation so far (`checkpoints.best.DevRecord`) on the run's dev set: proposed at each
  evaluation, recorded once that step's checkpoint is saved; `keep(step)` tells orbax not to delete the best (or a
  proposed) checkpoint."""

  def __init__(self, workdir: storage.PathLike, record: best.DevRecord | None, dev: best.DevSet):
    self.workdir, self.record, self.dev = workdir, record, dev
    self.pending: best.DevRecord | None = None

  def keep(self, step: int) -> bool:
    """Whether checkpoint `step` is the recorded or the proposed best (orbax's `KeepSteps`)."""
    return any(r is not None and r.best_step == step for r in (self.record, self.pending))

  def propose(self, step: int, exact_match: float) -> best.DevRecord:
    """The record of an evaluation at `step` scoring `exact_match` (%), pending until `commit(step, ...)`."""
    self.pending = (best.DevRecord.first(step, exact_match, self.dev) if self.record is None
                    else self.record.after(step, exact_match))
    return self.pending

  def commit(self, step: int, checkpoints: ocp.CheckpointManager) -> None:
    """After step `step`'s save: its proposal is written once the checkpoint is on disk (process 0)."""
    if self.pending is None or self.pending.step != step:
      return
    checkpoints.wait_until_finished()
    if jax.process_index() == 0:
      best.write_record(self.workdir, self.pending)
    self.record, self.pending = self.pending, None


def dev_evaluation(run: OpenQaRun, spec: OpenQaSpec, dev: list[Question], tracker: BestCheckpoint,
                   batch_size: int) -> Callable[[TrainState], dict[str, float]]:
  """`TrainHooks.evaluate`: dev exact match (%) of the state's parameters, proposed to `tracker`."""
  predictor: list[Predictor] = []

  def evaluate(state: TrainState) -> dict[str, float]:
    if predictor:
      predictor[0].set_params(state.params)
    else:
      predictor.append(Predictor(run.model, state.params, run.featurizer.store, run.featurizer.tokenizer,
                                 run.embeddings, run.searcher, spec.data, run.mesh))
    answers = predictor[0].answer([q.question for q in dev], batch_size=batch_size)
    em = 100.0 * float(np.mean([exact_match(p.answer, q.answers, q.is_regex)
                                for p, q in zip(answers, dev, strict=True)]))
    record = tracker.propose(int(state.step), em)
    return {"dev_exact_match": em, "dev_best_exact_match": record.best_dev_exact_match,
            "dev_best_step": float(record.best_step)}

  return evaluate


def evaluate_restored(evaluate: Callable[[TrainState], dict[str, float]], tracker: BestCheckpoint,
                      trainer: TrainerConfig, checkpoints: ocp.CheckpointManager) -> Callable[[TrainState], None]:
  """`TrainHooks.after_restore`: a restored evaluation step newer than the newest dev record (the job died
  between its checkpoint and its record) is evaluated and recorded before training continues."""

  def after_restore(state: TrainState) -> None:
    step = int(state.step)
    due = step == trainer.num_steps or (trainer.eval_every > 0 and step % trainer.eval_every == 0)
    if not due or (tracker.record is not None and tracker.record.step >= step):
      return
    metrics = evaluate(state)
    tracker.commit(step, checkpoints)
    logging.info("restored step %d had no dev record: %s", step,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

  return after_restore


def run_finetune(workdir: str, mesh: jax.sharding.Mesh, spec: OpenQaSpec, trainer: TrainerConfig,
                 optimizer: OptimizerConfig, train_questions: str, index_batch_size: int = 256,
                 recipe: FinetuneRecipe = FinetuneRecipe()) -> list[dict[str, float]]:
  """ORQA fine-tuning (gin/runs/openqa.gin: lr 1e-5, one question per step) from the spec's inits, on the train
  part of `train_questions` (`recipe`: dev split, dev evaluation, length in epochs).  `index_batch_size` (gin:
  INDEX_BATCH_SIZE, the refresh job's too) is the frozen index's embedding batch."""
  workdir_path = storage.as_path(workdir)
  store = spec.store()
  featurizer = OpenQaFeaturizer(store, spec.tokenizer(), spec.data, spec.retriever.encoder.max_position_embeddings)
  questions, dev = split_questions(train_questions, recipe)
  query_len = featurizer.check_questions(questions)
  if dev:
    if jax.process_count() > 1:
      raise InputError(f"FinetuneRecipe: a dev evaluation ({len(dev)} dev questions) runs on one JAX process only, "
                       f"this run has {jax.process_count()}: set FinetuneRecipe.dev_fraction = 0.0, dev_questions = "
                       "None and TrainerConfig.eval_every = 0, and evaluate checkpoints with launch/evaluate.py")
    featurizer.check_questions(dev)
    if trainer.eval_every % trainer.checkpoint_every:
      raise InputError(f"TrainerConfig.eval_every={trainer.eval_every}: must be a multiple of checkpoint_every="
                       f"{trainer.checkpoint_every} (the best dev step must have a checkpoint)")
  elif trainer.eval_every:
    raise InputError(f"TrainerConfig.eval_every={trainer.eval_every} needs dev questions: set "
                     "FinetuneRecipe.dev_fraction > 0 or FinetuneRecipe.dev_questions")
  trainer = epochs_to_steps(trainer, recipe, len(questions), spec.data.batch_size)
  pretrained, pretrained_index = starting_weights(spec)
  dev_set = best.DevSet.of([q.question for q in dev], spec.data.answer_text) if dev else None
  record = best.resume_record(workdir_path, latest_checkpoint_step(workdir_path / TRAIN_DIR), dev_set)
  tracker = BestCheckpoint(workdir_path, record, dev_set) if dev_set is not None else None
  train = make_trainer(spec.objective(), mesh, workdir, trainer, optimizer,
                       preserve=tracker.keep if tracker is not None else None)
  state, tower = None, None  # no tower: the published index is reused
  if train.checkpoints.latest_step() is None and not index_lib.committed_steps(workdir_path / INDEX_DIR):
    state = train.init_state(pretrained)
    tower = jax.device_get(state.params["retriever"][spec.retriever.block_tower])
  refresh = RefreshConfig(spec.retriever, ("retriever", spec.retriever.block_tower), index_batch_size,
                          search=spec.search, rules=train.rules)
  embeddings, searcher = frozen_index(workdir_path, tower, refresh, store, mesh, pretrained_index)
  run = OpenQaRun(spec.model(), featurizer, questions, embeddings, searcher, mesh)
  batches = iter(question_dataset(questions, featurizer, spec.data, query_len).to_iter_dataset())
  hooks = TrainHooks(pretrained=pretrained, prepare_batch=run.prepare_batch)
  if tracker is not None:
    evaluate = dev_evaluation(run, spec, dev, tracker, recipe.dev_batch_size)
    hooks = dataclasses.replace(hooks, evaluate=evaluate,
                                after_step=lambda step, _: tracker.commit(step, train.checkpoints),
                                after_restore=evaluate_restored(evaluate, tracker, trainer, train.checkpoints))
  _, history = train.fit(batches, hooks, initial_state=state)
  return history
