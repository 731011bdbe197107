"""REALM pre-training: masked queries, candidates without the trivial block, the marginal loss by hand."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY_BERT as TINY
from conftest import TINY_BERT_H32 as TINY_H32

from realm_jax import partitioning
from realm_jax.data.realm import (
  NULL_BLOCK,
  MaskedQueries,
  RealmDataConfig,
  candidate_inputs,
  most_blocks_per_uid,
  search_depth,
  select_candidates,
  span_in_candidates,
)
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.realm import RealmSpec, marginal_loss
from realm_jax.retrieval import index as index_lib
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.pretrain import run_pretrain
from realm_jax.train.trainer import TrainerConfig


def test_one_salient_span_of_one_sentence_is_masked_whole(demo_store):
  config = RealmDataConfig(query_len=96)
  queries = MaskedQueries(demo_store, config)
  labels = {v: k for k, v in demo_store.manifest["span_labels"].items()}
  rng = np.random.default_rng(0)
  for block_id in queries.block_ids[:300]:
    ex = queries(int(block_id), rng)
    ids = ex["query_input_ids"][: ex["query_input_mask"].sum()]
    masked = np.flatnonzero(ids == 103)
    assert len(masked) and np.all(np.diff(masked) == 1)  # one contiguous span
    body = demo_store.body_ids(int(block_id))
    starts = list(demo_store.sentence_starts(int(block_id))) + [len(body)]
    sentence = ids[1:-1]
    candidates = [body[starts[s] : starts[s + 1]][:94] for s in range(len(starts) - 1)]  # truncated to 96 - 2
    matching = [s for s, c in enumerate(candidates)
                if len(c) == len(sentence) and np.all((c == sentence) | (sentence == 103))]
    assert matching, "the query is one sentence of its block"
    s = matching[0]
    span = (masked[0] - 1 + starts[s], masked[-1] - 1 + starts[s])  # inclusive, without [CLS]
    spans = {(a, b - 1): labels[c] for a, b, c in demo_store.spans(int(block_id))}
    assert spans.get(span) not in (None, "CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY")
    scored = int(ex["mlm_weights"].sum())
    assert scored == min(10, len(masked))
    np.testing.assert_array_equal(ex["mlm_positions"][:scored], masked[:scored])
    np.testing.assert_array_equal(ex["mlm_ids"][:scored], body[span[0] : span[0] + scored])


def test_random_token_masking_ablation_masks_15_percent_of_a_sentence(demo_store):
  queries = MaskedQueries(demo_store, RealmDataConfig(masking="random_tokens"))
  assert len(queries.block_ids) == demo_store.num_blocks  # no salient span needed
  rng = np.random.default_rng(0)
  for block_id in range(50):
    ex = queries(block_id, rng)
    length = int(ex["query_input_mask"].sum()) - 2
    masked = int((ex["query_input_ids"] == 103).sum())
    assert masked == max(1, min(10, round(0.15 * length)))
    assert int(ex["mlm_weights"].sum()) == masked


def test_random_span_masking_ablation_masks_disjoint_spans_of_one_sentence_up_to_the_budget(demo_store):
  from realm_jax.data.realm import MAX_RANDOM_SPAN, random_spans

  queries = MaskedQueries(demo_store, RealmDataConfig(masking="random_spans"))
  assert len(queries.block_ids) == demo_store.num_blocks  # no salient span needed
  lengths = []
  for block_id in range(200):
    ex = queries(block_id, np.random.default_rng(block_id))
    assert all((queries(block_id, np.random.default_rng(block_id))[k] == v).all() for k, v in ex.items())
    ids = ex["query_input_ids"][: ex["query_input_mask"].sum()]
    # Replayed: the sentence drawn, then its spans.
    replay = np.random.default_rng(block_id)
    starts = [*demo_store.sentence_starts(block_id), len(demo_store.body_ids(block_id))]
    s = int(replay.integers(len(starts) - 1))
    sentence = demo_store.body_ids(block_id)[starts[s] : starts[s + 1]][:94]
    budget = max(1, min(10, round(0.15 * len(sentence))))
    spans = random_spans(len(sentence), budget, replay)
    covered = np.concatenate([np.arange(a, b) for a, b in spans])
    assert len(covered) == len(set(covered)) == budget  # disjoint, the budget exactly
    assert all(1 <= b - a <= MAX_RANDOM_SPAN and 0 <= a and b <= len(sentence) for a, b in spans)
    masked = np.flatnonzero(ids == 103)
    np.testing.assert_array_equal(masked, np.sort(covered) + 1)  # the spans' word pieces, after [CLS]
    np.testing.assert_array_equal(np.where(ids[1:-1] == 103, sentence, ids[1:-1]), sentence)  # the rest as is
    np.testing.assert_array_equal(ex["mlm_positions"][:budget], masked)  # every mask scored, gold = the text
    np.testing.assert_array_equal(ex["mlm_ids"][:budget], sentence[masked - 1])
    assert ex["mlm_weights"].sum() == budget
    lengths += [b - a for a, b in spans]
  assert max(lengths) > 2 and np.mean(lengths) > 1.5  # spans, not single tokens
  assert any((queries(i, np.random.default_rng(i + 1000))["query_input_ids"] !=
              queries(i, np.random.default_rng(i))["query_input_ids"]).any() for i in range(20))  # other seeds
  with pytest.raises(ValueError, match="a budget of 3 masks does not fit 2 positions"):
    random_spans(2, 3, np.random.default_rng(0))


def test_held_out_blocks_never_make_training_queries_and_each_gives_one_fixed_query(demo_store):
  from realm_jax.data.realm import realm_query_dataset

  config = RealmDataConfig(batch_size=5, query_len=32, eval_blocks=12)
  queries = MaskedQueries(demo_store, config)
  uids = demo_store.arrays["uids"]
  held_uids = {bytes(uids[i]) for i in queries.eval_block_ids}
  assert len(queries.eval_block_ids) == 12
  assert not held_uids & {bytes(uids[i]) for i in queries.train_block_ids}  # nor any copy of their text
  assert len(queries.train_block_ids) + 12 <= len(queries.block_ids)
  dataset = realm_query_dataset(demo_store, config)
  trained = np.concatenate([dataset[i]["block_id"] for i in range(len(queries.train_block_ids) // 5)])
  assert not set(trained.tolist()) & set(queries.eval_block_ids.tolist())
  batches = queries.eval_batches(5)  # 12 queries -> 3 batches, the last filled with 3 unscored rows
  assert [len(b["block_id"]) for b in batches] == [5, 5, 5]
  scored = np.concatenate([b["mlm_weights"].sum(-1) > 0 for b in batches])
  assert scored.tolist() == [True] * 12 + [False] * 3
  # The same queries whatever the training seed: runs with different query orders compare on them.
  again = MaskedQueries(demo_store, RealmDataConfig(batch_size=5, query_len=32, eval_blocks=12, seed=9))
  for a, b in zip(batches, again.eval_batches(5), strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="eval_blocks=100000: .* maskable blocks"):
    MaskedQueries(demo_store, RealmDataConfig(eval_blocks=100_000))


def test_runs_with_other_training_masking_score_the_same_held_out_queries_under_one_eval_masking(demo_store):
  spans = RealmDataConfig(batch_size=5, query_len=32, eval_blocks=12)
  reference = MaskedQueries(demo_store, spans).eval_batches(5)
  for masking in ("random_tokens", "random_spans"):
    queries = MaskedQueries(demo_store, dataclasses.replace(spans, masking=masking, eval_masking="salient_spans"))
    for a, b in zip(queries.eval_batches(5), reference, strict=True):
      jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not set(queries.train_block_ids.tolist()) & set(queries.eval_block_ids.tolist())
    assert len(queries.train_block_ids) > len(MaskedQueries(demo_store, spans).train_block_ids)  # every block trains
    own = MaskedQueries(demo_store, dataclasses.replace(spans, masking=masking)).eval_batches(5)  # its own masks
    assert any((a["mlm_ids"] != b["mlm_ids"]).any() for a, b in zip(own, reference, strict=True))
  with pytest.raises(ValueError, match="eval_masking must be one of .*, got 'entities'"):
    MaskedQueries(demo_store, dataclasses.replace(spans, eval_masking="entities"))


def test_the_trivial_block_is_never_a_candidate_and_null_comes_first(demo_store):
  uids = demo_store.arrays["uids"]
  retrieved = np.array([[5, 9, 2, 7], [3, 4, 6, 8], [1, 1, 2, 3]])
  candidates, weights = select_candidates(retrieved, np.array([9, 100, 2]), uids, num_candidates=4)
  assert candidates.tolist() == [[NULL_BLOCK, 5, 2, 7], [NULL_BLOCK, 3, 4, 6], [NULL_BLOCK, 1, 1, 3]]
  assert weights.tolist() == [1.0, 1.0, 0.0]  # duplicates drop the example


def test_without_the_null_document_every_slot_holds_a_retrieved_block_and_the_example_counts(demo_store):
  """At the run's search depth, a query whose own content (all its copies) is retrieved at any rank still gets
  num_candidates retrieved blocks, none its own content nor the null block, and weight 1."""
  uids = np.asarray(demo_store.arrays["uids"])
  copies = most_blocks_per_uid(uids)
  _, group, counts = np.unique(uids, axis=0, return_inverse=True, return_counts=True)
  group = group.ravel()
  source = int(np.flatnonzero(counts[group] == copies)[0])  # a block whose content repeats most
  own = np.flatnonzero(group == group[source])
  others = np.flatnonzero(counts[group] == 1)[:20]
  assert copies > 1 and len(own) == copies
  num_candidates = 4
  depth = search_depth(num_candidates, False, True, copies, demo_store.num_blocks)
  assert depth == num_candidates + copies  # no null slot: the own content's blocks all need spares
  rows = []
  for rank in range(depth - copies + 1):  # the own content anywhere among the retrieved
    row = list(others[: depth - copies])
    rows.append(row[:rank] + list(own) + row[rank:])
  retrieved = np.asarray(rows)
  candidates, weights = select_candidates(retrieved, np.full(len(rows), source), uids, num_candidates,
                                          null_document=False)
  assert weights.tolist() == [1.0] * len(rows)
  assert (candidates == others[:num_candidates]).all()
  assert (candidates[:, :, None] != own).all() and (candidates != NULL_BLOCK).all()


def test_trivial_retrievals_stay_when_their_exclusion_is_switched_off(demo_store):
  uids = demo_store.arrays["uids"]
  candidates, weights = select_candidates(np.array([[9, 5, 2, 7]]), np.array([9]), uids, num_candidates=4,
                                          exclude_trivial=False)
  assert candidates.tolist() == [[NULL_BLOCK, 9, 5, 2]]
  assert weights.tolist() == [1.0]


def test_blocks_sharing_the_source_sha1_are_excluded_too(demo_store):
  uids = np.array(demo_store.arrays["uids"])
  uids[42] = uids[7]  # block 42 has the same title and body as the query's source block 7
  candidates, _ = select_candidates(np.array([[42, 7, 3, 4]]), np.array([7]), uids, num_candidates=3)
  assert candidates.tolist() == [[NULL_BLOCK, 3, 4]]


class _OwnContentFirst:
  """A searcher whose best hits for the batch's queries are their source block and every block with the same
  content, then blocks of content found nowhere else (records the depths it was asked for)."""

  def __init__(self, store, sources):
    uids = np.asarray(store.arrays["uids"])
    _, group, counts = np.unique(uids, axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    self.num_blocks, self.depths = store.num_blocks, []
    self.rows = [[*np.flatnonzero(group == group[s]), *np.flatnonzero(counts[group] == 1)] for s in sources]

  def search(self, queries, k):
    self.depths.append(k)
    return np.asarray([row[:k] for row in self.rows], np.int32), np.zeros((len(self.rows), k), np.float32)


@pytest.mark.parametrize("null_document", [True, False])
def test_a_query_whose_own_block_is_retrieved_still_fills_every_candidate_slot(demo_store, null_document):
  import flax.linen as nn

  from realm_jax.data.realm import most_blocks_per_uid, realm_query_dataset
  from realm_jax.train.pretrain import RealmRun

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4)
  spec = realm_spec(demo_store, data, null_document=null_document)
  run = RealmRun(spec, demo_store, partitioning.make_mesh())
  batch = realm_query_dataset(demo_store, data)[0]
  uids = np.asarray(demo_store.arrays["uids"])
  assert run.copies == most_blocks_per_uid(uids) > 1  # the demo store repeats some blocks' content
  run.live.searcher = _OwnContentFirst(demo_store, batch["block_id"])
  completed = run.complete(nn.meta.unbox(spec.objective().init_params(jax.random.key(0))), batch)
  slots = 3 if null_document else 4
  assert run.live.searcher.depths == [slots + run.copies]
  assert completed["example_weight"].tolist() == [1.0] * 8
  # The candidates: the blocks after the query's own content, the null block first where there is one.
  others = [[i for i in row if (uids[i] != uids[s]).any()][:slots]
            for row, s in zip(run.live.searcher.rows, batch["block_id"], strict=True)]
  expected = np.asarray([[NULL_BLOCK] * (4 - slots) + row for row in others])
  blocks, _ = candidate_inputs(demo_store, expected, batch["query_input_ids"], data)
  np.testing.assert_array_equal(completed["block_input_ids"], blocks["input_ids"])


def test_candidate_and_joint_inputs_follow_the_released_formats(demo_store):
  config = RealmDataConfig(query_len=16, block_len=64, joint_len=80)
  query = np.array([[101, 2000, 103, 103, 2001, 102] + [0] * 10])
  blocks, joint = candidate_inputs(demo_store, np.array([[NULL_BLOCK, 3]]), query, config)
  assert blocks["input_ids"][0, 0, :4].tolist() == [101, 102, 102, 0]  # null: [CLS] [SEP] [SEP]
  assert joint["input_ids"][0, 0, :8].tolist() == [101, 2000, 103, 103, 2001, 102, 102, 0]
  title, body = demo_store.title_ids(3), demo_store.body_ids(3)
  assert blocks["input_ids"][0, 1, : len(title) + 2].tolist() == [101, *title, 102]
  n = int(joint["input_mask"][0, 1].sum())
  assert joint["input_ids"][0, 1, 6 : n - 1].tolist() == body[: n - 7].tolist()  # title dropped
  assert joint["segment_ids"][0, 1, :6].sum() == 0 and joint["segment_ids"][0, 1, 6:n].all()


def test_span_retrieved_counts_a_masked_span_only_inside_a_candidate_body_the_reader_sees(demo_store):
  config = RealmDataConfig(query_len=16, block_len=64, joint_len=40)
  query = np.array([[101, 7777, 103, 103, 102] + [0] * 11])
  candidates = np.array([[NULL_BLOCK, 3]] * 3 + [[NULL_BLOCK, NULL_BLOCK]])
  _, joint = candidate_inputs(demo_store, candidates, np.repeat(query, 4, 0), config)
  body = demo_store.body_ids(3)
  seen = 40 - 5 - 1  # [CLS] + 3 query wordpieces + [SEP] ... body ... [SEP]
  assert 7777 not in body
  spans = [body[5:8], body[seen - 2 : seen + 1], np.array([7777]), body[5:8]]
  ids, weights = np.zeros((4, 10), np.int32), np.zeros((4, 10), np.float32)
  for b, span in enumerate(spans):
    ids[b, : len(span)], weights[b, : len(span)] = span, 1.0
  # In the body; cut off by the joint length; only in the query; no retrieved body.
  assert span_in_candidates(joint, ids, weights).tolist() == [1.0, 0.0, 0.0, 0.0]
  assert span_in_candidates(joint, ids, 0 * weights).tolist() == [0.0] * 4  # nothing scored, nothing found


def _numpy_log_softmax(x, axis):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


def _random_marginal_inputs(seed, batch, k, masks, vocab):
  """Candidate scores [B, K], reader log-probs [B, K, M, V], gold ids and 0/1 mask weights [B, M]."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(batch, k)).astype(np.float32)
  log_probs = _numpy_log_softmax(rng.normal(size=(batch, k, masks, vocab)), -1).astype(np.float32)
  ids = rng.integers(0, vocab, (batch, masks))
  weights = (rng.random((batch, masks)) < 0.7).astype(np.float32)
  return scores, log_probs, ids, weights


@pytest.mark.parametrize("per_example", [False, True])
def test_marginal_loss_matches_a_direct_numpy_computation(per_example):
  batch, k, masks, vocab = 3, 4, 5, 11
  scores, log_probs, ids, weights = _random_marginal_inputs(0, batch, k, masks, vocab)
  loss, metrics = marginal_loss(scores, log_probs, ids, weights, per_example)

  p_z = np.exp(_numpy_log_softmax(scores.astype(np.float64), -1))
  p_y = np.exp(np.take_along_axis(log_probs.astype(np.float64), ids[:, None, :, None], -1)[..., 0])  # [B,K,M]
  if per_example:  # log sum_z p(z|x) prod_j p(y_j|z,x)
    expected = -sum(np.log((p_z[b] * np.prod(np.where(weights[b] > 0, p_y[b], 1.0), -1)).sum())
                    for b in range(batch)) / weights.sum()
  else:  # sum_j log sum_z p(z|x) p(y_j|z,x)
    expected = -sum(weights[b, j] * np.log((p_z[b] * p_y[b, :, j]).sum())
                    for b in range(batch) for j in range(masks)) / weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  utility = sum(weights[b, j] * (np.log((p_z[b] * p_y[b, :, j]).sum()) - np.log(p_y[b, 0, j]))
                for b in range(batch) for j in range(masks)) / weights.sum()
  np.testing.assert_allclose(float(metrics["retrieval_utility"]), utility, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["p_null"]), p_z[:, 0].mean(), rtol=1e-5)


def test_per_example_scores_add_up_to_the_marginal_loss_metrics():
  from realm_jax.objectives.realm import per_example_scores

  scores, log_probs, ids, weights = _random_marginal_inputs(1, batch=4, k=3, masks=5, vocab=7)
  weights[0] = 0  # an unscored example
  loss, metrics = marginal_loss(scores, log_probs, ids, weights)
  per = jax.tree.map(np.asarray, per_example_scores(scores, log_probs, ids, weights))
  total = weights.sum()
  np.testing.assert_allclose(per["num_masks"], weights.sum(-1))
  np.testing.assert_allclose(-per["log_likelihood"].sum() / total, float(loss), rtol=1e-5)
  np.testing.assert_allclose(per["correct"].sum() / total, float(metrics["mlm_accuracy"]), rtol=1e-5)
  np.testing.assert_allclose((per["log_likelihood"] - per["null_log_likelihood"]).sum() / total,
                             float(metrics["retrieval_utility"]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(per["p_null"], np.exp(_numpy_log_softmax(scores, -1))[:, 0], rtol=1e-5)
  assert per["log_likelihood"][0] == 0 and per["correct"][0] == 0


def realm_spec(store, data=None, **switches) -> RealmSpec:
  """A REALM run over `store` with TINY retriever (projection 128) and reader."""
  data = data or RealmDataConfig()
  return RealmSpec(str(store.path), RetrieverConfig(TINY, block_len=data.block_len), TINY, data, **switches)


def test_a_run_without_the_null_document_reports_no_null_block_metrics(demo_store, tmp_path):
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4, eval_blocks=12)
  history = run_pretrain(str(tmp_path), partitioning.make_mesh(), realm_spec(demo_store, data, null_document=False),
                         TrainerConfig(2, checkpoint_every=2, log_every=1), OptimizerConfig(1e-3, 1))
  last = history[-1]  # candidate 0 is a retrieved block: "utility over the null block" would be over it
  assert "eval_loss" in last and "span_retrieved" in last
  assert not {"p_null", "retrieval_utility", "eval_p_null", "eval_retrieval_utility"} & set(last)


def test_pretraining_runs_on_the_live_index_and_logs_staleness(demo_store, tmp_path):
  from realm_jax.eval.realm_mlm import load_eval

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4, eval_blocks=12)
  history = run_pretrain(str(tmp_path), partitioning.make_mesh(), realm_spec(demo_store, data),
                         TrainerConfig(4, checkpoint_every=2, log_every=1, eval_every=3), OptimizerConfig(1e-3, 1))
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  # The held-out evaluation runs every eval_every steps and at the last, on the 12 held-out queries.
  assert ["eval_loss" in h for h in history] == [False, False, True, True]
  assert history[-1]["eval_queries"] == 12 and 0 < history[-1]["eval_p_null"] < 1
  assert history[2]["eval_loss"] != history[3]["eval_loss"]  # the parameters moved
  final = load_eval(tmp_path)
  assert final["step"] == 4 and len(final["block_id"]) == 12
  np.testing.assert_allclose(-final["log_likelihood"].sum() / final["num_masks"].sum(), history[-1]["eval_loss"],
                             rtol=1e-6)
  # Bootstrap index 0; hook scalars are logged at their latest value (step 4), not as a window mean.
  assert history[-1]["index_step"] == 0.0 and history[-1]["index_staleness"] == 4.0
  assert all(np.isfinite(h["loss"]) for h in history)
  assert 0 < history[-1]["p_null"] < 1
  assert 0 <= history[-1]["span_retrieved"] <= 1
  assert index_lib.committed_steps(tmp_path / "index") == [0] and history[-1]["index_read_failures"] == 0.0
  assert jax.device_count() == 8


def test_an_evaluation_schedule_without_held_out_blocks_is_refused(demo_store, tmp_path):
  with pytest.raises(ValueError, match=r"eval_every=5 needs held-out blocks: set RealmDataConfig.eval_blocks > 0"):
    run_pretrain(str(tmp_path), partitioning.make_mesh(), realm_spec(demo_store), TrainerConfig(10, eval_every=5),
                 OptimizerConfig(1e-3))
  assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_run_can_start_its_reader_and_mlm_head_from_another_realm_run(demo_store, tmp_path):
  from realm_jax.checkpoints.init import load_realm_reader, load_realm_run
  from realm_jax.checkpoints.train_dir import restore_params_subtree
  from realm_jax.objectives.realm import RealmModel, abstract_realm_params

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4)
  mesh = partitioning.make_mesh()
  with pytest.raises(FileNotFoundError, match="no REALM pre-training checkpoint"):
    load_realm_reader(f"realm:{tmp_path}", RealmModel(TINY, TINY, 128))
  run_pretrain(str(tmp_path), mesh, realm_spec(demo_store, data, retrieval=False),
               TrainerConfig(3, checkpoint_every=2, log_every=3), OptimizerConfig(1e-3, 1))
  model = RealmModel(TINY, TINY, 128)
  loaded = load_realm_reader(f"realm:{tmp_path}", model).subtrees
  assert set(loaded) == {"reader", "mlm_head"}
  head = restore_params_subtree(tmp_path / "train", 3, ("mlm_head",), abstract_realm_params(model)["mlm_head"],
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  jax.tree.map(np.testing.assert_array_equal, loaded["mlm_head"], jax.device_get(head))  # the newest step, 3
  shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
  assert shapes(loaded["reader"]) == shapes(abstract_realm_params(model)["reader"])
  assert np.abs(loaded["mlm_head"]["bias"]).max() > 0  # trained: a fresh head's bias is zero
  towers, step = load_realm_run(tmp_path, model, ("retriever", "reader"))  # Open-QA's start
  assert step == 3 and set(towers["retriever"]) == {"query_tower"}
  jax.tree.map(np.testing.assert_array_equal, towers["reader"], loaded["reader"])


def _batch_with_candidates(store):
  """A training batch of 8 queries with 3 candidates each (the null block and 2 fixed blocks)."""
  from realm_jax.data.realm import realm_query_dataset

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=3)
  batch = realm_query_dataset(store, data)[0]
  retrieved = np.stack([np.roll(np.arange(20), i)[:3] for i in range(8)])
  candidates, weights = select_candidates(retrieved, batch["block_id"], store.arrays["uids"], 3)
  blocks, joint = candidate_inputs(store, candidates, batch["query_input_ids"], data)
  span = span_in_candidates(joint, batch["mlm_ids"], batch["mlm_weights"])
  return {**batch, **{f"block_{k}": v for k, v in blocks.items()}, **{f"joint_{k}": v for k, v in joint.items()},
          "example_weight": weights, "span_retrieved": span}


def test_the_retrieval_score_scale_multiplies_the_inner_products_before_the_candidate_softmax(demo_store):
  import flax.linen as nn

  from realm_jax.objectives.realm import RealmModel

  batch = _batch_with_candidates(demo_store)
  model = RealmModel(TINY, TINY, projection_size=16)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  raw, log_probs = model.apply({"params": params}, batch)
  scaled, scaled_log_probs = RealmModel(TINY, TINY, projection_size=16, score_scale=0.25).apply({"params": params},
                                                                                                  batch)
  np.testing.assert_allclose(scaled, 0.25 * raw, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(scaled_log_probs, log_probs)  # the reader is untouched
  assert np.abs(raw).max() > 1  # not a vacuous comparison


def test_sharded_realm_step_equals_one_device(demo_store):
  import flax.linen as nn

  from realm_jax.objectives.realm import RealmModel, realm_loss

  batch = _batch_with_candidates(demo_store)
  model = RealmModel(TINY, TINY, projection_size=16)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: realm_loss(model, p, b, jax.random.key(1)), has_aux=True))
  (loss1, _), grads1 = grad_fn(params, batch)
  mesh = partitioning.make_mesh(4, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    (loss8, _), grads8 = grad_fn(params, partitioning.shard_batch(batch, mesh))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6), grads8, grads1)
  # Not a vacuous comparison (which towers get gradients: the test below).
  assert np.abs(grads1["retriever"]["query_tower"]["projection"]["kernel"]).max() > 0
  assert np.abs(grads1["reader"]["layer_0"]["intermediate"]["kernel"]).max() > 0


def _max_abs(tree):
  return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))


def test_separate_towers_get_gradients_the_block_tower_through_the_candidate_scores(demo_store):
  """share_towers=False: the block tower is trained through the fresh scores of the candidates (it embeds nothing
  else), the query tower through the queries' embeddings, the reader through the marginal."""
  import flax.linen as nn

  from realm_jax.objectives.realm import RealmModel, realm_loss

  batch = {k: v[:4] for k, v in _batch_with_candidates(demo_store).items()}
  assert batch["example_weight"].all() and batch["mlm_weights"].any()
  model = RealmModel(TINY_H32, TINY_H32, projection_size=16, share_towers=False)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  assert set(params["retriever"]) == {"query_tower", "block_tower"}
  grads = jax.jit(jax.grad(lambda p: realm_loss(model, p, batch, jax.random.key(1))[0]))(params)
  towers = grads["retriever"]
  for tower in ("query_tower", "block_tower"):
    for part in ("projection", "encoder"):
      assert _max_abs(towers[tower][part]) > 1e-6, (tower, part)
  assert _max_abs(grads["reader"]) > 0


@pytest.fixture(scope="module")
def query_store(tmp_path_factory, wordpiece):
  """A query corpus X of its own: demo passages 299 down to 0 (so X's block j is the demo store's block 299 - j),
  the first 150 of them (passages 299..150) retitled, so their text is X's alone; the other 150 are also in Z."""
  import json

  from conftest import DEMO_ENTITIES, DEMO_PASSAGES

  from realm_jax.data.blocks import BlockStore, build_block_store
  from realm_jax.data.corpus import fingerprint_files, read_documents

  root = tmp_path_factory.mktemp("query_corpus")
  passages = DEMO_PASSAGES.read_text().splitlines()[:300][::-1]
  entities = DEMO_ENTITIES.read_text().splitlines()[:300][::-1]
  records = [json.loads(line) for line in passages]
  for record in records[:150]:
    record["title"] = f"News: {record['title']}"
  (root / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (root / "entities.jsonl").write_text("".join(line + "\n" for line in entities))
  build_block_store(read_documents(root / "passages.jsonl", root / "entities.jsonl"), root / "blocks", wordpiece,
                    fingerprint_files(root / "passages.jsonl", root / "entities.jsonl"))
  return BlockStore(root / "blocks")


def test_trivial_retrievals_are_excluded_by_uid_across_a_separate_query_store(demo_store, query_store):
  import flax.linen as nn

  from realm_jax.data.realm import realm_query_dataset
  from realm_jax.train.pretrain import RealmRun

  uids, query_uids = np.asarray(demo_store.arrays["uids"]), np.asarray(query_store.arrays["uids"])
  assert (query_uids[150:] == uids[149::-1]).all() and not (query_uids[:150] == uids[299:149:-1]).all(-1).any()
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4, seed=3)
  run = RealmRun(realm_spec(demo_store, data), demo_store, partitioning.make_mesh(), query_store=query_store)
  batch = realm_query_dataset(query_store, data)[0]
  shared = batch["block_id"] >= 150
  assert shared.any() and (~shared).any()  # queries with and without their text in Z
  _, group, counts = np.unique(uids, axis=0, return_inverse=True, return_counts=True)
  unique = [i for i in range(3000, 4000) if counts[group.ravel()[i]] == 1][:8]  # content found once in Z
  # Each query's best hit: Z's copy of its text (shared) or a block with X's id (not X's text); then 3 others.
  first = np.where(shared, 299 - batch["block_id"], batch["block_id"])
  rows = np.stack([first, *np.asarray(unique[:3])[:, None].repeat(8, 1)], 1)
  run.live.searcher = type("Searcher", (), {"search": lambda self, q, k: (rows[:, :k], np.zeros((8, k)))})()
  completed = run.complete(nn.meta.unbox(run.spec.objective().init_params(jax.random.key(0))), batch)
  expected = [[NULL_BLOCK, *(unique[:3] if s else (int(f), *unique[:2]))] for s, f in zip(shared, first, strict=True)]
  blocks, _ = candidate_inputs(demo_store, np.array(expected), batch["query_input_ids"], data)
  np.testing.assert_array_equal(completed["block_input_ids"], blocks["input_ids"])  # Z's copy excluded, none else
  assert completed["example_weight"].tolist() == [1.0] * 8


def test_pretraining_reads_queries_from_the_query_store_and_candidates_from_the_knowledge_store(
    demo_store, query_store, tmp_path):
  from realm_jax.eval.realm_mlm import load_eval

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4, eval_blocks=10)
  spec = dataclasses.replace(realm_spec(demo_store, data), query_store=str(query_store.path))
  history = run_pretrain(str(tmp_path), partitioning.make_mesh(), spec, TrainerConfig(2, log_every=1),
                         OptimizerConfig(1e-3, 1))
  assert all(np.isfinite(h["loss"]) for h in history) and history[-1]["eval_queries"] == 10
  # The held-out queries are X's; the index holds Z's blocks.
  held_out = MaskedQueries(query_store, data).eval_block_ids
  assert sorted(load_eval(tmp_path)["block_id"].tolist()) == sorted(held_out.tolist())
  assert index_lib.load_index(tmp_path / "index", 0, demo_store)[1].shape[0] == demo_store.num_blocks
  # A restart whose queries would come from another store (its grain state indexes X's blocks) is refused.
  with pytest.raises(ValueError, match=rf"queries.json: this run's queries came from {query_store.path} "
                     rf"\(corpus_fingerprint .*\), now from {demo_store.path}/manifest.json"):
    run_pretrain(str(tmp_path), partitioning.make_mesh(), realm_spec(demo_store, data), TrainerConfig(4),
                 OptimizerConfig(1e-3, 1))


def test_a_query_store_with_another_tokenizer_is_refused_naming_the_field(demo_store, query_store, tmp_path):
  import json
  import shutil

  from realm_jax.data.realm import query_store_for
  from realm_jax.errors import InputError

  copy = tmp_path / "blocks"
  shutil.copytree(query_store.path, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["tokenizer"] = "wordpiece:cased:0123456789abcdef"
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(InputError, match=r"blocks/manifest.json: tokenizer 'wordpiece:cased:0123456789abcdef' differs "
                     r"from the knowledge store's 'wordpiece:uncased:[0-9a-f]+'"):
    query_store_for(demo_store, str(copy))
  assert query_store_for(demo_store, None) is demo_store


def test_rerank_orders_the_retrieved_blocks_by_the_current_inner_products_ties_in_index_order():
  from realm_jax.data.realm import rerank

  retrieved = np.array([[7, 3, 9, 1]])
  query = np.array([[1.0, 0.0]])
  blocks = np.array([[[0.1, 5.0], [0.9, 0.0], [0.1, -1.0], [0.9, 2.0]]])
  assert rerank(retrieved, query, blocks).tolist() == [[3, 1, 7, 9]]


def test_reranking_chooses_the_candidates_by_the_current_block_tower_not_the_stale_index(demo_store):
  import flax.linen as nn

  from realm_jax.data.realm import block_inputs, realm_query_dataset
  from realm_jax.objectives.realm import RealmModel
  from realm_jax.train.pretrain import RealmRun

  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4)
  spec = dataclasses.replace(realm_spec(demo_store, data), rerank_depth=24)
  run = RealmRun(spec, demo_store, partitioning.make_mesh())
  batch = realm_query_dataset(demo_store, data)[0]
  _, group, counts = np.unique(np.asarray(demo_store.arrays["uids"]), axis=0, return_inverse=True, return_counts=True)
  sources = {int(i) for i in batch["block_id"]}
  unique = np.asarray([i for i in range(1000, 2000) if counts[group.ravel()[i]] == 1 and i not in sources][:24])
  stale = np.stack([np.roll(unique, r) for r in range(8)])  # the stale index's order, one per query
  asked = []
  run.live.searcher = type("Searcher", (), {"search": lambda self, q, k: (asked.append(k), (stale[:, :k], None))[1]})()
  params = nn.meta.unbox(spec.objective().init_params(jax.random.key(0)))
  completed = run.complete(params, batch)
  assert asked == [24]
  model = RealmModel(TINY, TINY, 128)
  queries = {k: batch[f"query_{k}"] for k in ("input_ids", "input_mask", "segment_ids")}
  query_emb = np.asarray(model.apply({"params": params}, queries, method=RealmModel.embed_queries))
  flat = {k: v.reshape(-1, 48) for k, v in block_inputs(demo_store, stale, 48).items()}
  block_emb = np.asarray(model.apply({"params": params}, flat, method=RealmModel.embed_blocks)).reshape(8, 24, -1)
  best = np.take_along_axis(stale, np.argsort(-np.einsum("bd,bld->bl", query_emb, block_emb), 1)[:, :3], 1)
  assert (best != stale[:, :3]).any()  # the current tower's choice is not the stale one
  expected, _ = candidate_inputs(demo_store, np.concatenate([np.full((8, 1), NULL_BLOCK), best], 1),
                                 batch["query_input_ids"], data)
  np.testing.assert_array_equal(completed["block_input_ids"], expected["input_ids"])
  with pytest.raises(ValueError, match=r"RealmSpec.rerank_depth = -1"):
    dataclasses.replace(spec, rerank_depth=-1)
