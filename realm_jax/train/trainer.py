"""Generic sharded trainer: jit step on the mesh, orbax checkpoints with exact resume, metrics.

A `Trainer` owns the train state (step, params, optimizer state), sharded by the
logical-axis rules.  Each step's dropout key is `fold_in(seed key, step)` and the
data iterator's grain state is checkpointed next to the model state, so a run that
is killed and resumed reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.sharding import Mesh
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from realm_jax import partitioning, storage
from realm_jax.checkpoints import best
from realm_jax.checkpoints.train_dir import TRAIN_DIR, TRAINING_DONE, orbax_dir
from realm_jax.objectives.objective import Objective
from realm_jax.train.optimizer import OptimizerConfig


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


class CheckpointableIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """How long a run trains and how often it checkpoints, logs and evaluates (gin: `trainer.TrainerConfig`)."""

  num_steps: int
  checkpoint_every: int = 1000
  log_every: int = 50
  keep_checkpoints: int = 5
  seed: int = 0
  eval_every: int = 0  # steps between `TrainHooks.evaluate` calls; 0: only at the last step


@dataclasses.dataclass(frozen=True)
class TrainHooks:
  """A run's host-side work around each step of `Trainer.fit`.

  `pretrained(params) -> params` overwrites subtrees of fresh parameters (e.g. real BERT weights).
  `before_step(step)` runs between steps (e.g. an index hot-swap); the scalars it returns are written to
  TensorBoard every step and logged with their latest value (not a window mean).  `prepare_batch(state,
  host_batch)` completes a batch with the current parameters (REALM: retrieval of candidates for its queries).
  `after_step(step, state)` runs after each step.  `evaluate(state)` runs at the last step and every
  `TrainerConfig.eval_every` steps; its metrics join that step's logged ones.  `after_restore(state)` runs once on
  a state restored from a checkpoint, before training continues (fine-tuning: the dev evaluation a killed job
  did not record).
  """

  pretrained: Callable[[Any], Any] | None = None
  before_step: Callable[[int], dict[str, float]] | None = None
  prepare_batch: Callable[[TrainState, dict], dict] | None = None
  after_step: Callable[[int, TrainState], None] | None = None
  evaluate: Callable[[TrainState], dict[str, float]] | None = None
  after_restore: Callable[[TrainState], None] | None = None


class Trainer:
  """Runs `loss_fn(params, batch, rng) -> (loss, metrics)` under `optimizer` on `mesh`."""

  def __init__(
      self,
      objective: Objective,
      optimizer: optax.GradientTransformation,
      mesh: Mesh,
      workdir: storage.PathLike | None,
      config: TrainerConfig,
      rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
      preserve: Callable[[int], bool] | None = None,
  ):
    """`workdir=None` builds a trainer without checkpoints: to compile its step (`lower`), or to `step` it by hand.
    Orbax keeps the newest `config.keep_checkpoints` checkpoints and every one whose step `preserve(step)` is true
    (fine-tuning: the best by dev exact match)."""
    self.mesh, self.rules, self.config = mesh, rules, config
    self.workdir = storage.as_path(workdir) if workdir is not None else None
    self.optimizer = optimizer
    self.batch_size = objective.batch_size
    self._loss_fn, self._init_params = objective.loss_fn, objective.init_params
    self._rng = jax.random.key(config.seed)

    def boxed_state(rng):
      params = objective.init_params(rng)
      return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract = jax.eval_shape(boxed_state, self._rng)
    self.state_shardings = partitioning.logical_sharding(abstract, mesh, rules)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(abstract), self.state_shardings,
    )
    options = (ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True) if preserve is None
               else ocp.CheckpointManagerOptions(
                   create=True, preservation_policy=best.keep_newest_and(config.keep_checkpoints, preserve)))
    self.checkpoints = None if self.workdir is None else ocp.CheckpointManager(
        orbax_dir(self.workdir / TRAIN_DIR), options=options, item_names=("state", "data"))
    self._step_fn = jax.jit(
        self._train_step,
        in_shardings=(self.state_shardings, None),
        out_shardings=(self.state_shardings, None),
        donate_argnums=(0,),
    )

  # ---- state -------------------------------------------------------------------------------------

  def init_state(self, pretrained: Callable[[Any], Any] | None = None) -> TrainState:
    """Fresh state; `pretrained(params) -> params` may overwrite subtrees (e.g. real BERT weights)."""

    def make(rng):
      return nn.meta.unbox(TrainState(jnp.zeros((), jnp.int32), self._init_params(rng), None))

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      state = jax.jit(make, out_shardings=self.state_shardings.replace(opt_state=None))(self._rng)
      params = state.params
      if pretrained is not None:
        params = jax.device_put(pretrained(jax.device_get(params)), self.state_shardings.params)
      opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
    return TrainState(state.step, params, opt_state)

  def restore_or_init(
      self, data: CheckpointableIterator, pretrained: Callable[[Any], Any] | None = None,
      initial_state: TrainState | None = None,
  ) -> TrainState:
    """Restores the newest checkpoint (state and data position), else `initial_state` or a fresh one."""
    step = self.checkpoints.latest_step()
    if step is None:
      return initial_state if initial_state is not None else self.init_state(pretrained)
    restored = self.checkpoints.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self.abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    data.set_state(restored["data"])
    logging.info("resumed from %s at step %d", self.checkpoints.directory, step)
    return restored["state"]

  def save(self, state: TrainState, data: CheckpointableIterator) -> None:
    step = int(state.step)
    self.checkpoints.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data.get_state())),
        force=True,
    )

  # ---- step --------------------------------------------------------------------------------------

  def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
    with nn.logical_axis_rules(self.rules):
      (loss, metrics), grads = jax.value_and_grad(self._loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  def step(self, state: TrainState, host_batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
    """One step on this process's part of the batch (`partitioning.shard_batch`)."""
    with jax.set_mesh(self.mesh):
      return self._step_fn(state, partitioning.shard_batch(host_batch, self.mesh))

  def lower(self, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
    """The train step lowered for global batch shapes, without data or devices (ahead-of-time compile)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.data_sharding(self.mesh, len(v.shape)))
             for k, v in batch.items()}
    with jax.set_mesh(self.mesh):
      return self._step_fn.lower(self.abstract_state, batch)

  # ---- loop --------------------------------------------------------------------------------------

  def fit(
      self, data: CheckpointableIterator, hooks: TrainHooks = TrainHooks(), initial_state: TrainState | None = None,
  ) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains to `config.num_steps`, resuming if a checkpoint exists, else from `initial_state` or fresh parameters
    (`hooks.pretrained`).  Returns state and logged metrics; a step that evaluates is also a logging step.

    `num_steps=0` saves the starting parameters (e.g. imported weights) as checkpoint 0, so evaluation and
    `launch/ask.py` can run on them.
    """
    cfg = self.config
    before_step, prepare_batch, evaluate = hooks.before_step, hooks.prepare_batch, hooks.evaluate
    restoring = self.checkpoints.latest_step() is not None
    state = self.restore_or_init(data, hooks.pretrained, initial_state)
    if restoring and hooks.after_restore:
      hooks.after_restore(state)
    start = int(state.step)
    writer = SummaryWriter(str(self.workdir / "tensorboard")) if jax.process_index() == 0 else None
    history: list[dict[str, float]] = []
    pending: list[dict] = []
    last_good = self.checkpoints.latest_step()
    tick, tick_step = time.perf_counter(), start
    progress = tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step", mininterval=2.0,
                    disable=jax.process_index() != 0)
    try:
      for step in range(start + 1, cfg.num_steps + 1):
        extra = before_step(step) if before_step else {}
        if writer:
          for k, v in extra.items():
            writer.add_scalar(k, v, step)
        batch = next(data)
        if prepare_batch:
          batch = prepare_batch(state, batch)
        state, metrics = self.step(state, batch)
        pending.append(metrics)
        progress.update(1)
        evaluating = evaluate is not None and (
            step == cfg.num_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0))
        boundary = step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.num_steps
        if boundary or evaluating:
          fetched = jax.device_get(pending)  # one host transfer per logging window
          values = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in fetched[-1]}
          values.update({k: float(v) for k, v in extra.items()})  # e.g. index step: the current value
          pending = []
          if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"step {step}: loss is {values['loss']} (metrics {values}); stopping. "
                f"Last good checkpoint: {last_good} in {self.checkpoints.directory}"
            )
          now = time.perf_counter()
          values["steps_per_sec"] = (step - tick_step) / (now - tick)
          if self.batch_size:
            values["examples_per_sec"] = values["steps_per_sec"] * self.batch_size
          if evaluating:  # after the speed figures, which it would distort
            values.update(evaluate(state))
            now = time.perf_counter()
          tick, tick_step = now, step
          history.append({"step": step, **values})
          progress.set_postfix(loss=f"{values['loss']:.3f}")
          logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
          if writer:
            for k, v in values.items():
              writer.add_scalar(k, v, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
          self.save(state, data)
          last_good = step
        if hooks.after_step:
          hooks.after_step(step, state)
      if cfg.num_steps == 0 and last_good is None:  # nothing to train: keep the starting parameters as step 0
        self.save(state, data)
      if jax.process_index() == 0:
        self.checkpoints.wait_until_finished()
        storage.write_once(self.workdir / TRAINING_DONE, str(cfg.num_steps).encode())
    finally:
      progress.close()
      self.checkpoints.wait_until_finished()
      if writer:
        writer.close()
    return state, history


def make_trainer(objective: Objective, mesh: Mesh, workdir: storage.PathLike | None, trainer: TrainerConfig,
                 optimizer: OptimizerConfig, rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
                 preserve: Callable[[int], bool] | None = None) -> Trainer:
  """Every task's trainer (`workdir=None`: no checkpoints, for ahead-of-time compilation or stepping by hand);
  `preserve(step)`: checkpoints kept beside the newest `keep_checkpoints`."""
  return Trainer(objective, optimizer.make(trainer.num_steps), mesh, workdir, trainer, rules, preserve)
