"""The oracle-retrieval probe: does the reader take the masked span from the block it is given?"""

import numpy as np
import pytest
from conftest import TINY_BERT as TINY

from realm_jax import partitioning
from realm_jax.data.realm import RealmDataConfig, realm_query_dataset, span_in_candidates
from realm_jax.eval.reader_copy import copy_metrics, markdown_table, oracle_batch
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.reader_copy import run_reader_copy
from realm_jax.train.trainer import TrainerConfig

DATA = RealmDataConfig(batch_size=8, query_len=32, block_len=64, joint_len=96)


def test_the_oracle_candidate_holds_the_masked_span_and_the_null_block_does_not(demo_store):
  queries = realm_query_dataset(demo_store, DATA)[0]
  batch = oracle_batch(demo_store, queries, DATA, with_null=True)
  assert batch["input_ids"].shape == (8, 2, 96)
  null = {k: batch[k][:, :1] for k in ("input_ids", "segment_ids")}
  oracle = {k: batch[k][:, 1:] for k in ("input_ids", "segment_ids")}
  assert span_in_candidates(null, batch["mlm_ids"], batch["mlm_weights"]).tolist() == [0.0] * 8
  assert span_in_candidates(oracle, batch["mlm_ids"], batch["mlm_weights"]).mean() > 0.9  # unless cut at 96


def test_copy_gain_is_oracle_minus_null_log_likelihood_per_scored_piece():
  gold = np.array([[[-5.0, -9.0], [-1.0, -99.0]],  # [B=2, K=2 (null, oracle), M=2]; unscored masks: -9, -99
                   [[-4.0, -6.0], [-2.0, -2.0]]])
  predicted = np.array([[[3, 0], [7, 0]], [[5, 8], [4, 8]]])
  ids, weights = np.array([[7, 1], [5, 8]]), np.array([[1.0, 0.0], [1.0, 1.0]])
  metrics = copy_metrics(gold, predicted, ids, weights)
  assert metrics == pytest.approx({"oracle_log_likelihood": -5 / 3, "null_log_likelihood": -5.0, "copy_gain": 10 / 3,
                                   "oracle_accuracy": 2 / 3, "null_accuracy": 2 / 3})


def test_the_probe_trains_on_a_mesh_and_reports_each_evaluation(demo_store):
  history = run_reader_copy(partitioning.make_mesh(4, 2), str(demo_store.path), TINY, TrainerConfig(3, eval_every=2),
                            OptimizerConfig(1e-3, warmup_steps=1), data=DATA, eval_queries=16)
  assert [row["step"] for row in history] == [0, 2, 3]
  assert np.isnan(history[0]["train_loss"]) and all(np.isfinite(row["train_loss"]) for row in history[1:])
  for row in history:
    assert row["oracle_log_likelihood"] < 0 and row["null_log_likelihood"] < 0
    assert row["copy_gain"] == pytest.approx(row["oracle_log_likelihood"] - row["null_log_likelihood"], abs=1e-4)
  assert history[0]["copy_gain"] != history[-1]["copy_gain"]  # the reader was trained
  assert markdown_table(history).count("\n") == 4
