"""Held-out REALM MLM evaluation: fixed masked queries from held-out blocks, read with the current index.

Every evaluation of a run, and of every run on the same block store with the same query settings (see
`data.realm`), scores the same masked tokens (`MaskedQueries.eval_batches`), so two runs (e.g. retrieval vs
the null block only) compare query by query: `paired_difference` gives the loss difference and its standard
error over queries (the spread of the held-out queries, not of training seeds).  Unlike training, examples
whose candidates hold one text twice, or that are short of blocks (filled up with null blocks), are
scored too, so every run scores the same tokens.  Per-query results go to `<workdir>/eval/mlm_step_<N>.json`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning, storage
from realm_jax.errors import InputError
from realm_jax.objectives.realm import RealmModel, per_example_scores

EVAL_DIR = "eval"
PER_QUERY = ("block_id", "mlm_ids", "log_likelihood", "null_log_likelihood", "correct", "num_masks", "p_null",
             "span_retrieved")


def eval_path(workdir: storage.PathLike, step: int) -> epath.Path:
  return storage.as_path(workdir) / EVAL_DIR / f"mlm_step_{step}.json"


class HeldOutMlm:
  """`held_out(params, step) -> {'eval_loss', ...}` over fixed global batches of held-out queries.

  `prepare_batch(params, host_batch)` completes this process's rows of a batch with candidates
  (`RealmRun.complete`); `workdir` (process 0 writes) receives the per-query JSON of each step.  Without a
  `null_document` candidate 0 is a retrieved block: its `null_log_likelihood` / `p_null` in the per-query file are
  that block's, and the summary leaves out the retrieval utility and p(null).
  """

  def __init__(self, model: RealmModel, mesh: jax.sharding.Mesh, batches: list[dict[str, np.ndarray]],
               prepare_batch: Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]],
               workdir: storage.PathLike | None = None, null_document: bool = True):
    if not batches:
      raise ValueError("held-out evaluation needs at least one batch (RealmDataConfig.eval_blocks > 0)")
    self.mesh, self.batches, self.prepare_batch, self.workdir = mesh, batches, prepare_batch, workdir
    self.null_document = null_document

    def score(params, batch):
      scores, log_probs = model.apply({"params": params}, batch, True)
      scored = per_example_scores(scores, log_probs, batch["mlm_ids"], batch["mlm_weights"])
      return {**scored, "span_retrieved": batch["span_retrieved"]}

    self._score = jax.jit(score, out_shardings=NamedSharding(mesh, P()))

  def per_query(self, params: Any) -> dict[str, np.ndarray]:
    """Per-query sums over scored masks (see `per_example_scores`), `block_id`, `mlm_ids` and `span_retrieved`;
    the filler rows of the last batch (no scored mask; a real query always has one) are dropped."""
    rows = partitioning.process_rows(self.mesh, len(self.batches[0]["block_id"]))
    parts = []
    for batch in self.batches:
      local = self.prepare_batch(params, {k: v[rows] for k, v in batch.items()})
      with jax.set_mesh(self.mesh):
        scored = jax.device_get(self._score(params, partitioning.shard_batch(local, self.mesh)))
      parts.append({**scored, "block_id": batch["block_id"], "mlm_ids": batch["mlm_ids"] * (batch["mlm_weights"] > 0),
                    "scored": batch["mlm_weights"].sum(-1) > 0})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = out.pop("scored")
    return {k: np.asarray(v[keep]) for k, v in out.items()}

  def __call__(self, params: Any, step: int) -> dict[str, float]:
    """Evaluation metrics (`eval_*`) at `step`; writes the per-query file when a workdir is set."""
    queries = self.per_query(params)
    if self.workdir is not None and jax.process_index() == 0:
      # One write: a sweep reading it sees all of it or nothing (an object store has no rename).
      storage.write_json_once(eval_path(self.workdir, step),
                              {"step": step, **{k: queries[k].tolist() for k in PER_QUERY}})
    summary = summarize(queries)
    if not self.null_document:
      del summary["eval_retrieval_utility"], summary["eval_retrieval_utility_se"], summary["eval_p_null"]
    return summary


def summarize(queries: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-token means over all scored masks (the retrieval utility with its standard error over queries), per-query
  means of p(null) and span_retrieved."""
  masks = float(np.sum(queries["num_masks"]))
  utility, utility_error = per_mask_mean(queries["log_likelihood"] - queries["null_log_likelihood"],
                                         queries["num_masks"])
  return {
      "eval_loss": -float(np.sum(queries["log_likelihood"])) / masks,
      "eval_mlm_accuracy": float(np.sum(queries["correct"])) / masks,
      "eval_retrieval_utility": utility,
      "eval_retrieval_utility_se": utility_error,
      "eval_p_null": float(np.mean(queries["p_null"])),
      "eval_span_retrieved": float(np.mean(queries["span_retrieved"])),
      "eval_queries": float(len(queries["num_masks"])),
  }


def eval_steps(workdir: storage.PathLike) -> list[int]:
  """The steps of a run's held-out evaluations (`<workdir>/eval/mlm_step_<N>.json`), in order."""
  directory = storage.as_path(workdir) / EVAL_DIR
  names = [p.name for p in directory.iterdir()] if directory.exists() else []
  return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"mlm_step_(\d+)\.json", n)))


def load_eval(workdir: storage.PathLike, step: int | None = None) -> dict[str, Any]:
  """A run's per-query evaluation at `step` (None: its newest) as arrays, with 'step'."""
  if step is None:
    steps = eval_steps(workdir)
    if not steps:
      raise FileNotFoundError(f"{storage.as_path(workdir) / EVAL_DIR}: no held-out evaluation (mlm_step_<N>.json); "
                              "set eval_blocks and eval_every")
    step = steps[-1]
  path = eval_path(workdir, step)
  try:
    value = json.loads(storage.read_bytes(path))
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: unreadable held-out evaluation: {e}") from e
  missing = [k for k in ("step", *PER_QUERY) if k not in value]
  if missing:
    raise InputError(f"{path}: missing field(s) {missing}")
  lengths = {len(value[k]) for k in PER_QUERY}
  if len(lengths) != 1:
    raise InputError(f"{path}: per-query fields have different lengths {sorted(lengths)}")
  try:
    return {"step": int(value["step"]), **{k: np.asarray(value[k], np.float64) for k in PER_QUERY}}
  except (TypeError, ValueError) as e:
    raise InputError(f"{path}: malformed per-query values: {e}") from e


def paired_difference(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
  """`run`'s held-out loss minus `baseline`'s (nats per masked token) over the same queries, with the standard
  error of that difference over queries (a ratio estimator, as queries hold different numbers of masks; nan
  for one query).  It measures how much the held-out queries could move the figure, not seed-to-seed noise."""
  same = all(np.array_equal(run[k], baseline[k]) for k in ("block_id", "mlm_ids", "num_masks"))
  if not same:
    raise InputError("the two evaluations scored different masked tokens (block store, eval_blocks or the "
                     "query settings differ)")
  gain = run["log_likelihood"] - baseline["log_likelihood"]  # per query, summed over its masks
  mean, error = per_mask_mean(gain, run["num_masks"])
  return {"loss_difference": -mean, "standard_error": error, "queries": float(len(gain)),
          "masks": float(np.sum(run["num_masks"])), "queries_better": float(np.mean(gain > 0)),
          "queries_worse": float(np.mean(gain < 0))}


def held_out_loss(evaluation: dict[str, Any]) -> tuple[float, float]:
  """(held-out loss per masked token, its standard error over queries) of one evaluation (`load_eval`)."""
  return per_mask_mean(-evaluation["log_likelihood"], evaluation["num_masks"])


def per_mask_mean(per_query: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
  """sum(per_query) / sum(masks) and its standard error over queries (the ratio estimator's linearisation: queries
  hold different numbers of masks; nan for one query)."""
  total, count = float(np.sum(masks)), len(per_query)
  mean = float(np.sum(per_query)) / total
  residual = per_query - mean * masks
  error = math.sqrt(count / (count - 1) * float(np.sum(residual**2))) / total if count > 1 else math.nan
  return mean, error
