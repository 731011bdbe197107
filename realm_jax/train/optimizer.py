"""BERT's AdamWeightDecay from optax parts, as used by ICT, REALM and ORQA.

clip by global norm 1.0 -> Adam moments WITHOUT bias correction -> + 0.01 * param
(not for LayerNorm or bias) -> * -lr(step), with lr linear warmup to `learning_rate`
over min(10000, max(100, steps // 10)) steps and linear decay (from step 0) to 0 at `num_steps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from realm_jax.errors import InputError


def bert_warmup_steps(num_steps: int) -> int:
  """The released code's warmup: min(10000, max(100, num_train_steps // 10))."""
  return min(10000, max(100, num_steps // 10))


def bert_schedule(learning_rate: float, num_steps: int, warmup_steps: int | None = None) -> optax.Schedule:
  """BERT's schedule: lr * step / warmup during warmup, else lr * (1 - step / num_steps)."""
  warmup = bert_warmup_steps(num_steps) if warmup_steps is None else warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decayed = learning_rate * jnp.maximum(0.0, 1.0 - step / num_steps)
    return jnp.where(step < warmup, learning_rate * step / max(warmup, 1), decayed)

  return schedule


class AdamMoments(NamedTuple):
  mu: Any
  nu: Any


def scale_by_adam_without_bias_correction(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6):
  """Adam's direction m / (sqrt(v) + eps) with raw (not bias-corrected) moments, as in BERT."""

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return AdamMoments(mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, AdamMoments(mu, nu)

  return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything but LayerNorm parameters and biases."""
  flat = traverse_util.flatten_dict(params)
  mask = {
      path: not (path[-1] == "bias" or any("norm" in part for part in path))
      for path in flat
  }
  return traverse_util.unflatten_dict(mask)


def subtree_multipliers(learning_rate: float, **peak_rates: float | None) -> dict[str, float] | None:
  """`scale_subtrees` multipliers that give subtrees their own peak lr, e.g. (3e-5, retriever=1e-5); None
  rates keep `learning_rate`.  None when no subtree has its own."""
  rates = {name: rate for name, rate in peak_rates.items() if rate is not None}
  if not rates:
    return None
  if learning_rate <= 0:
    raise InputError(f"subtree learning rates {rates} need learning_rate > 0, got {learning_rate}")
  return {name: rate / learning_rate for name, rate in rates.items()}


def scale_subtrees(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of top-level parameter subtrees, e.g. {'retriever': 0.1}: a per-module lr."""

  def init(params):
    unknown = sorted(set(multipliers) - set(params))
    if unknown:
      raise InputError(f"learning-rate multipliers for {unknown}: the model's parameters are {sorted(params)}")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scale = lambda tree, m: jax.tree.map(lambda u: u * m, tree)  # noqa: E731
    return {name: scale(tree, multipliers.get(name, 1.0)) for name, tree in updates.items()}, state

  return optax.GradientTransformation(init, update)


def bert_adamw(
    learning_rate: float,
    num_steps: int,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    warmup_steps: int | None = None,
    multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  """The BERT optimizer (see module docstring); `multipliers` scale the lr of top-level subtrees."""
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      scale_by_adam_without_bias_correction(),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(bert_schedule(learning_rate, num_steps, warmup_steps)),
      *([scale_subtrees(multipliers)] if multipliers else []),
  )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """BERT's AdamW on the run's schedule; `subtree_learning_rates` give top-level parameter subtrees their own peak
  lr on the same schedule, e.g. {'retriever': 1e-5, 'mlm_head': 5e-3} (gin: a dict)."""

  learning_rate: float
  warmup_steps: int | None = None  # None: the released code's min(10000, max(100, num_steps // 10))
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  subtree_learning_rates: Mapping[str, float] | None = None

  def make(self, num_steps: int) -> optax.GradientTransformation:
    """The optimizer for a run of `num_steps`."""
    multipliers = subtree_multipliers(self.learning_rate, **dict(self.subtree_learning_rates or {}))
    return bert_adamw(self.learning_rate, num_steps, self.weight_decay, self.clip_norm, self.warmup_steps,
                      multipliers)
