"""Bootstrap intervals for exact match over questions, and for the paired difference of two systems answering
the same questions (resampling questions, the same resample for both systems)."""

from __future__ import annotations

import numpy as np

from realm_jax.errors import InputError


def _resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(values), size=(samples, len(values)))
  return values[picks].mean(axis=1)


def interval(correct: np.ndarray, samples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
  """EM (percent) of per-question 0/1 `correct` with its `level` percentile-bootstrap interval."""
  values = np.asarray(correct, np.float64)
  if values.ndim != 1 or not len(values):
    raise InputError(f"bootstrap: expected a non-empty list of per-question results, got shape {values.shape}")
  means = _resampled_means(values, samples, seed)
  tail = 100 * (1 - level) / 2
  return {"em": 100 * float(values.mean()), "low": 100 * float(np.percentile(means, tail)),
          "high": 100 * float(np.percentile(means, 100 - tail)), "questions": float(len(values))}


def paired_difference(a: np.ndarray, b: np.ndarray, samples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
  """EM of `a` minus EM of `b` (percent points) over the same questions, with its `level` interval and the share
  of resamples in which `a` is not better (a one-sided bootstrap p-value)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise InputError(f"paired bootstrap: the two systems answered {len(a)} and {len(b)} questions; expected the same")
  if a.ndim != 1 or not len(a):
    raise InputError(f"paired bootstrap: expected non-empty lists of per-question results, got shape {a.shape}")
  means = _resampled_means(a - b, samples, seed)
  tail = 100 * (1 - level) / 2
  return {"difference": 100 * float((a - b).mean()), "low": 100 * float(np.percentile(means, tail)),
          "high": 100 * float(np.percentile(means, 100 - tail)), "questions": float(len(a)),
          "p_not_better": float(np.mean(means <= 0))}
