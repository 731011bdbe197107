"""Held-out REALM MLM evaluation: fixed held-out queries, per-query results on disk, paired run comparison."""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import TINY_BERT_H32 as TINY

from realm_jax import partitioning
from realm_jax.data.realm import MaskedQueries, RealmDataConfig, candidate_inputs
from realm_jax.eval.realm_mlm import HeldOutMlm, eval_path, load_eval, paired_difference, summarize
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.realm import RealmModel, RealmSpec, marginal_loss
from realm_jax.train.pretrain import RealmRun


def realm_spec(store, data, **switches) -> RealmSpec:
  """A REALM run over `store` with TINY retriever (projection 16) and reader."""
  return RealmSpec(str(store.path), RetrieverConfig(TINY, 16, block_len=data.block_len), TINY, data, **switches)


@pytest.fixture(scope="module")
def null_only(demo_store):
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=64, num_candidates=4, eval_blocks=13)
  mesh = partitioning.make_mesh()
  run = RealmRun(realm_spec(demo_store, data, retrieval=False), demo_store, mesh)
  batches = MaskedQueries(demo_store, data).eval_batches(data.batch_size)
  example = run.complete(None, batches[0])
  params = nn.meta.unbox(run.model.init(jax.random.key(0), example)["params"])
  return run, batches, params


def test_held_out_loss_is_the_marginal_loss_over_every_scored_held_out_mask(null_only, tmp_path):
  run, batches, params = null_only
  evaluate = HeldOutMlm(run.model, run.mesh, batches, run.complete, tmp_path)
  metrics = evaluate(params, step=7)
  log_likelihood, masks, correct = 0.0, 0.0, 0.0
  for batch in batches:  # the filler rows of the last batch have no scored mask
    full = run.complete(params, batch)
    scores, log_probs = run.model.apply({"params": params}, full, True)
    loss, m = marginal_loss(scores, log_probs, full["mlm_ids"], full["mlm_weights"])
    count = float(full["mlm_weights"].sum())
    log_likelihood -= float(loss) * count
    correct += float(m["mlm_accuracy"]) * count
    masks += count
  assert metrics["eval_queries"] == 13
  np.testing.assert_allclose(metrics["eval_loss"], -log_likelihood / masks, rtol=1e-5)
  np.testing.assert_allclose(metrics["eval_mlm_accuracy"], correct / masks, rtol=1e-5, atol=1e-7)
  assert metrics["eval_p_null"] == 1.0 and metrics["eval_retrieval_utility"] == 0.0  # the null block only
  saved = load_eval(tmp_path)  # the newest step's per-query file
  assert saved["step"] == 7 and len(saved["block_id"]) == 13 and saved["num_masks"].sum() == masks
  np.testing.assert_array_equal(np.sort(saved["block_id"]), np.sort(MaskedQueries(
      run.store, run.spec.data).eval_block_ids))


def test_held_out_queries_never_read_their_own_block_even_when_the_run_keeps_trivial_retrievals(demo_store):
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=64, num_candidates=4, eval_blocks=3)
  mesh = partitioning.make_mesh()
  run = RealmRun(realm_spec(demo_store, data, exclude_trivial=False), demo_store, mesh)
  model = run.model
  batch = MaskedQueries(demo_store, data).eval_batches(8)[0]  # 3 held-out queries + 5 unscored fillers
  example = RealmRun(realm_spec(demo_store, data, retrieval=False), demo_store, mesh).complete(None, batch)
  params = nn.meta.unbox(model.init(jax.random.key(0), example)["params"])
  # An index where the 3 held-out blocks outscore every other block for these queries: each query's top 3.
  queries = {k[len("query_"):]: v for k, v in batch.items() if k.startswith("query_")}
  query_emb = np.asarray(model.apply({"params": params}, queries, method=RealmModel.embed_queries))
  direction = query_emb[:3].sum(0)
  assert (query_emb @ direction > 0).all()
  embeddings = np.zeros((demo_store.num_blocks, 16), np.float32)
  embeddings[batch["block_id"][:3]] = 100 * direction
  run.live.install({"backend": "exact"}, run.live.prepare({"backend": "exact"}, embeddings, None))

  own = [candidate_inputs(demo_store, np.asarray([[b]]), batch["query_input_ids"][:1], data)[0]["input_ids"][0, 0]
         for b in batch["block_id"][:3]]
  reads_own = lambda full: [any((row == own[i]).all() for row in full["block_input_ids"][i]) for i in range(3)]  # noqa: E731
  assert reads_own(run.complete(params, batch)) == [True] * 3  # training keeps them (the §3.4 ablation)
  held_out = run.complete(params, batch, exclude_trivial=True)
  assert reads_own(held_out) == [False] * 3
  # The held-out loss is the marginal over these 4 candidates (null + 3 retrieved), fresh scores.
  metrics = HeldOutMlm(model, mesh, [batch], functools.partial(run.complete, exclude_trivial=True))(params, 0)
  scores, log_probs = model.apply({"params": params}, held_out, True)
  loss, expected = marginal_loss(scores, log_probs, held_out["mlm_ids"], held_out["mlm_weights"])
  np.testing.assert_allclose(metrics["eval_loss"], float(loss), rtol=1e-5)
  np.testing.assert_allclose(metrics["eval_retrieval_utility"], float(expected["retrieval_utility"]), rtol=1e-4,
                             atol=1e-6)
  assert metrics["eval_queries"] == 3 and metrics["eval_p_null"] < 1


def test_paired_difference_is_the_per_token_loss_difference_with_its_standard_error():
  baseline = {"block_id": np.arange(4), "mlm_ids": np.arange(8).reshape(4, 2),
              "num_masks": np.array([1.0, 2.0, 3.0, 2.0]), "log_likelihood": np.array([-2.0, -5.0, -6.0, -4.0])}
  run = {**baseline, "log_likelihood": np.array([-1.0, -5.0, -7.5, -2.0])}
  d = paired_difference(run, baseline)
  gain = np.array([1.0, 0.0, -1.5, 2.0])
  ratio = gain.sum() / 8.0
  assert d["loss_difference"] == pytest.approx(-ratio)
  expected_error = np.sqrt(4 / 3 * ((gain - ratio * baseline["num_masks"]) ** 2).sum()) / 8.0
  assert d["standard_error"] == pytest.approx(expected_error)
  assert (d["queries"], d["masks"], d["queries_better"], d["queries_worse"]) == (4, 8, 0.5, 0.25)
  # With equal mask counts the standard error is the textbook one of a mean of per-query differences.
  equal = {**baseline, "num_masks": np.full(4, 2.0)}
  d = paired_difference({**equal, "log_likelihood": baseline["log_likelihood"] + gain}, equal)
  assert d["standard_error"] == pytest.approx(np.std(gain / 2, ddof=1) / np.sqrt(4))
  assert np.isnan(paired_difference({k: v[:1] for k, v in run.items()}, {k: v[:1] for k, v in baseline.items()})[
      "standard_error"])
  for field, other in (("block_id", np.arange(1, 5)), ("mlm_ids", np.arange(1, 9).reshape(4, 2))):
    with pytest.raises(ValueError, match="different masked tokens"):
      paired_difference({**run, field: other}, baseline)


def test_the_held_out_retrieval_utility_comes_with_its_standard_error_over_queries():
  queries = {"num_masks": np.array([1.0, 1.0, 2.0]), "log_likelihood": np.array([-3.0, -4.0, -4.0]),
             "null_log_likelihood": np.array([-4.0, -3.0, -6.0]), "correct": np.zeros(3), "p_null": np.zeros(3),
             "span_retrieved": np.ones(3)}
  summary = summarize(queries)
  assert summary["eval_retrieval_utility"] == 0.5  # (1 - 1 + 2) nats over 4 masks
  # Residuals of the ratio estimator: gain - 0.5 * masks = (0.5, -1.5, 1.0).
  np.testing.assert_allclose(summary["eval_retrieval_utility_se"], np.sqrt(3 / 2 * 3.5) / 4)
  assert np.isnan(summarize({k: v[:1] for k, v in queries.items()})["eval_retrieval_utility_se"])


def test_a_missing_or_damaged_evaluation_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no held-out evaluation"):
    load_eval(tmp_path)
  path = eval_path(tmp_path, 3)
  path.parent.mkdir(parents=True)
  path.write_text('{"step": 3, "block_id": [1, 2]')
  with pytest.raises(ValueError, match=r"mlm_step_3\.json: unreadable"):
    load_eval(tmp_path)
  path.write_text(json.dumps({"step": 3, "block_id": [1, 2]}))
  with pytest.raises(ValueError, match=r"mlm_step_3\.json: missing field\(s\) \['mlm_ids', 'log_likelihood'"):
    load_eval(tmp_path, 3)
  fields = ("mlm_ids", "log_likelihood", "null_log_likelihood", "correct", "num_masks", "p_null", "span_retrieved")
  ragged = {"step": 3, "block_id": [1, 2], **{k: [0.0, 1.0] for k in fields}, "mlm_ids": [[5, 6], [7]]}
  path.write_text(json.dumps(ragged))
  with pytest.raises(ValueError, match=r"mlm_step_3\.json: malformed per-query values"):
    load_eval(tmp_path, 3)
