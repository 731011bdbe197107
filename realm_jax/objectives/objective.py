"""What every task gives the trainer (`train.trainer.make_trainer`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """`init_params(rng) -> params`, `loss_fn(params, batch, rng) -> (loss, metrics)` and the global batch size
  (for examples/s)."""

  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  batch_size: int | None = None
