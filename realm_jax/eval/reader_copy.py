"""Does the REALM reader read?  The oracle-retrieval probe's batches, loss and figures (run: `train.reader_copy`).

REALM can only beat its null-block baseline if the reader takes the masked span from a block it is given.
This probe trains the reader and its MLM head with the query's own block as the only candidate (an
oracle retriever: trivial retrieval on purpose) and reports, on held-out queries, the log-likelihood of
the masked word pieces with that block and with the null block.  `copy_gain` (oracle - null, nats per
masked piece) is the most any retrieved block holding the span can give; near 0 means the reader ignores
its candidates, whatever the retriever does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES
from realm_jax.data.realm import NULL_BLOCK, RealmDataConfig, candidate_inputs
from realm_jax.objectives.realm import RealmModel

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


def markdown_table(history: list[dict[str, Any]]) -> str:
  """The probe's history as a markdown table."""
  lines = ["| step | train loss | oracle log-lik | null log-lik | copy gain | oracle acc | null acc |",
           "|---|---|---|---|---|---|---|"]
  for r in history:
    lines.append(f"| {r['step']} | {r['train_loss']:.3f} | {r['oracle_log_likelihood']:.3f} | "
                 f"{r['null_log_likelihood']:.3f} | {r['copy_gain']:+.3f} | {r['oracle_accuracy']:.3f} | "
                 f"{r['null_accuracy']:.3f} |")
  return "\n".join(lines)
