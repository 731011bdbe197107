"""The vectorised REALM candidate functions give exactly the arrays of the per-example reference loops."""

import numpy as np
import pytest
import reference_realm_data as reference
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax.data.realm import (
  NULL_BLOCK,
  RealmDataConfig,
  candidate_inputs,
  realm_query_dataset,
  select_candidates,
  span_in_candidates,
)
from realm_jax.errors import InputError

CLS, SEP = 101, 102
# (query_len, block_len, joint_len): the paper's; short ones that cut bodies; ones too short for some titles
# (block) or queries (joint), so that even the [CLS] head is cut.
LENGTHS = [(96, 288, 384), (16, 64, 80), (32, 48, 40), (64, 12, 24), (8, 3, 5), (4, 1, 2)]


def assert_same(actual, expected):
  """Same type, dtype, shape and values, through dicts and tuples."""
  assert type(actual) is type(expected)
  if isinstance(expected, dict):
    assert actual.keys() == expected.keys()
    for key in expected:
      assert_same(actual[key], expected[key])
  elif isinstance(expected, tuple):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
      assert_same(a, e)
  else:
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    np.testing.assert_array_equal(actual, expected)


def shared_uid_pairs(store) -> np.ndarray:
  """[P, 2] distinct blocks of the store with the same SHA1 uid."""
  uids = np.asarray(store.arrays["uids"])
  _, inverse, counts = np.unique(uids, axis=0, return_inverse=True, return_counts=True)
  pairs = [np.flatnonzero(inverse.ravel() == g)[:2] for g in np.flatnonzero(counts > 1)]
  return np.asarray(pairs).reshape(-1, 2)


def random_retrievals(rng, store, batch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, k] retrieved ids (some rows with duplicates, with the source itself or a block sharing its uid, or with
  two blocks of the same content) and the [B] source blocks."""
  n = store.num_blocks
  pairs = shared_uid_pairs(store)
  source = rng.integers(0, n, batch)
  retrieved = rng.integers(0, n, (batch, k))
  for b in range(batch):
    kind = rng.integers(7)
    if kind == 0:  # duplicates
      retrieved[b] = rng.choice(retrieved[b, : max(1, k // 2)], k)
    elif kind == 1:  # the source block itself, anywhere
      retrieved[b, rng.integers(k)] = source[b]
    elif kind == 2 and len(pairs):  # a block with the same text as the source
      pair = pairs[rng.integers(len(pairs))]
      source[b] = pair[0]
      retrieved[b, rng.choice(k, min(k, 2), replace=False)] = pair[: min(k, 2)][::-1]
    elif kind == 3:  # the source and its duplicate retrieval
      retrieved[b, rng.choice(k, min(k, 2), replace=False)] = source[b]
    elif kind == 4 and len(pairs):  # two blocks with the same text, neither the source (unless drawn so)
      retrieved[b, rng.choice(k, min(k, 2), replace=False)] = pairs[rng.integers(len(pairs))][: min(k, 2)]
  return retrieved, source


def random_queries(rng, batch: int, query_len: int) -> np.ndarray:
  """[B, query_len] `[CLS] pieces [SEP]` rows of random lengths (0 to query_len - 2), zero padded; some hold a
  second [SEP], some start with one (an empty query: the pieces after it are not part of it)."""
  out = np.zeros((batch, query_len), np.int32)
  for b in range(batch):
    length = int(rng.integers(0, query_len - 1))
    pieces = rng.integers(103, 3000, length)
    if length and rng.random() < 0.2:
      pieces[rng.integers(length)] = SEP  # only the first [SEP] ends the query
    out[b, : length + 2] = [SEP if rng.random() < 0.1 else CLS, *pieces, SEP]
  return out


def random_candidates(rng, store, batch: int, k: int) -> np.ndarray:
  """[B, K] block ids, null blocks anywhere (not only first), repeats, often the longest bodies and the first and
  last blocks (whose tokens lie at the ends of the store's arrays)."""
  n = store.num_blocks
  longest = np.argsort(np.diff(store.arrays["body_offsets"]))[-50:]
  ends = np.unique(np.clip([0, 1, 2, n - 3, n - 2, n - 1], 0, n - 1))
  draw = rng.random((batch, k))
  candidates = np.where(draw < 0.3, longest[rng.integers(0, len(longest), (batch, k))],
                        rng.integers(0, n, (batch, k)))
  candidates = np.where(draw > 0.85, ends[rng.integers(0, len(ends), (batch, k))], candidates)
  candidates[rng.random((batch, k)) < 0.2] = NULL_BLOCK
  return candidates.astype(np.int64)


@pytest.mark.parametrize("null_document", [True, False])
@pytest.mark.parametrize("exclude_trivial", [True, False])
def test_select_candidates_equals_the_per_example_loop_on_the_demo_store(demo_store, null_document, exclude_trivial):
  rng = np.random.default_rng(int(null_document) + 2 * int(exclude_trivial))
  uids = demo_store.arrays["uids"]
  zero_weights = 0
  for trial in range(150):
    num_candidates = int(rng.choice([1, 2, 4, 8]))
    k = max(1, num_candidates + int(rng.integers(-2, 3)))  # fewer, as many as or more ids than slots
    retrieved, source = random_retrievals(rng, demo_store, int(rng.integers(1, 33)), k)
    if trial % 3 == 0:
      retrieved = retrieved.astype(np.int32)  # a searcher's dtype
    args = (retrieved, source, uids, num_candidates, null_document, exclude_trivial)
    expected = reference.select_candidates(*args)
    assert_same(select_candidates(*args), expected)
    zero_weights += int((expected[1] == 0).sum())
  assert zero_weights  # the weight-0 rules were exercised


def test_select_candidates_equals_the_loop_on_blocks_sharing_the_source_uid(demo_store):
  uids = np.array(demo_store.arrays["uids"])
  uids[42] = uids[7]
  uids[43, :19] = uids[7, :19]  # all but the last uid byte: not the same text
  retrieved = np.array([[42, 7, 3, 43, 4, 5], [43, 42, 1, 2, 7, 3], [1, 2, 3, 4, 5, 6], [7, 42, 43, 7, 1, 2]])
  source = np.array([7, 42, 43, 7])
  for num_candidates in range(1, 7):
    for null_document in (True, False):
      for exclude_trivial in (True, False):
        args = (retrieved, source, uids, num_candidates, null_document, exclude_trivial)
        assert_same(select_candidates(*args), reference.select_candidates(*args))
  candidates, _ = select_candidates(retrieved, source, uids, 4)
  assert candidates[0].tolist() == [NULL_BLOCK, 3, 43, 4]


def test_candidates_with_the_same_content_under_two_block_ids_drop_the_example(demo_store):
  uids = np.array(demo_store.arrays["uids"])
  uids[42] = uids[5]  # blocks 5 and 42: the same title and body
  retrieved = np.array([[5, 42, 3, 4, 6], [5, 3, 4, 42, 6], [5, 42, 3, 4, 6]])
  args = (retrieved, np.array([9, 9, 42]), uids, 4)  # the null block and 3 retrieved
  candidates, weights = select_candidates(*args)
  # Both among the candidates: dropped; the second past the slots the reader sees: kept; both with the source's
  # content: removed as trivial, and the blocks after them fill the slots.
  assert weights.tolist() == [0.0, 1.0, 1.0]
  assert candidates.tolist() == [[NULL_BLOCK, 5, 42, 3], [NULL_BLOCK, 5, 3, 4], [NULL_BLOCK, 3, 4, 6]]
  assert_same((candidates, weights), reference.select_candidates(*args))


def test_select_candidates_refuses_no_room_for_the_null_document(demo_store):
  with pytest.raises(InputError, match="num_candidates=0"):
    select_candidates(np.zeros((2, 3), np.int64), np.zeros(2, np.int64), demo_store.arrays["uids"], 0)


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.data(), num_blocks=st.integers(1, 6), batch=st.integers(0, 5), k=st.integers(0, 7),
       num_candidates=st.integers(1, 7), null_document=st.booleans(), exclude_trivial=st.booleans())
def test_select_candidates_property_on_synthetic_uids(data, num_blocks, batch, k, num_candidates, null_document,
                                                      exclude_trivial):
  # Uids from a tiny alphabet in two bytes, so blocks often share a uid or all of it but one byte.
  byte = st.integers(0, 1)
  first = data.draw(st.lists(byte, min_size=num_blocks, max_size=num_blocks))
  last = data.draw(st.lists(byte, min_size=num_blocks, max_size=num_blocks))
  uids = np.zeros((num_blocks, 20), np.uint8)
  uids[:, 0], uids[:, 19] = first, last
  block = st.integers(0, num_blocks - 1)
  retrieved = np.array(data.draw(st.lists(st.lists(block, min_size=k, max_size=k), min_size=batch, max_size=batch)),
                       np.int64).reshape(batch, k)
  source = np.array(data.draw(st.lists(block, min_size=batch, max_size=batch)), np.int64)
  args = (retrieved, source, uids, num_candidates, null_document, exclude_trivial)
  assert_same(select_candidates(*args), reference.select_candidates(*args))


@pytest.mark.parametrize("lengths", LENGTHS)
def test_candidate_inputs_equal_the_per_candidate_pack(demo_store, lengths):
  query_len, block_len, joint_len = lengths
  config = RealmDataConfig(query_len=query_len, block_len=block_len, joint_len=joint_len)
  rng = np.random.default_rng(sum(lengths))
  for _ in range(8):
    batch, k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    candidates = random_candidates(rng, demo_store, batch, k)
    queries = random_queries(rng, batch, query_len)
    assert_same(candidate_inputs(demo_store, candidates, queries, config),
                reference.candidate_inputs(demo_store, candidates, queries, config))


@pytest.mark.parametrize("lengths", LENGTHS[:3])
def test_candidate_inputs_equal_the_pack_on_a_store_shorter_than_the_inputs(tmp_path, wordpiece, lengths):
  from realm_jax.data.blocks import BlockStore, build_block_store
  from realm_jax.data.corpus import Document

  documents = [Document("a", "Alpha", "One two three."), Document("b", "", "Four five."),
               Document("c", "Gamma delta", "Six.")]
  build_block_store(documents, tmp_path / "blocks", wordpiece, "tiny")
  store = BlockStore(tmp_path / "blocks")
  config = RealmDataConfig(query_len=lengths[0], block_len=lengths[1], joint_len=lengths[2])
  rng = np.random.default_rng(0)
  for _ in range(5):
    candidates = random_candidates(rng, store, 3, 4)
    queries = random_queries(rng, 3, config.query_len)
    assert_same(candidate_inputs(store, candidates, queries, config),
                reference.candidate_inputs(store, candidates, queries, config))


def test_candidate_inputs_cut_long_bodies_as_the_loop_does(demo_store):
  config = RealmDataConfig(query_len=96, block_len=64, joint_len=80)
  longest = np.argsort(np.diff(demo_store.arrays["body_offsets"]))[-16:].reshape(2, 8)
  queries = random_queries(np.random.default_rng(0), 2, 96)
  blocks, joint = candidate_inputs(demo_store, longest, queries, config)
  assert_same((blocks, joint), reference.candidate_inputs(demo_store, longest, queries, config))
  assert blocks["input_mask"].all()  # every body was cut to fill the block


def test_candidate_inputs_refuse_a_query_without_sep(demo_store):
  queries = np.array([[CLS, 2000, SEP, 0], [CLS, 2000, 2001, 2002]])
  with pytest.raises(InputError, match=r"query rows \[1\] have no \[SEP\]"):
    candidate_inputs(demo_store, np.zeros((2, 1), np.int64), queries, RealmDataConfig())


def _span_cases(rng, joint: dict[str, np.ndarray], max_masks: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, M] mlm ids and weights: spans of 1 to M pieces taken from a candidate's body (found), from the joint
  input beyond or across the body's ends (mostly not found), random ids, with gaps in the weights, or none."""
  batch, k, length = joint["input_ids"].shape
  ids = rng.integers(103, 3000, (batch, max_masks)).astype(np.int32)
  weights = np.zeros((batch, max_masks), np.float32)
  for b in range(batch):
    m = int(rng.integers(1, max_masks + 1))
    kind = rng.integers(5)
    j = int(rng.integers(k))
    row, body = joint["input_ids"][b, j], np.flatnonzero(joint["segment_ids"][b, j] == 1)
    if kind == 0 and len(body):  # inside a body (with its final [SEP], or cut at its end)
      start = int(rng.choice(body))
      ids[b, :m] = np.pad(row[start : start + m], (0, max(0, start + m - length)))
    elif kind == 1:  # anywhere in the joint input: the query, the boundaries, the padding
      start = int(rng.integers(length))
      ids[b, :m] = np.pad(row[start : start + m], (0, max(0, start + m - length)))
    weights[b, :m] = 1.0
    if kind == 3 and len(body):  # gaps: the span is the scored pieces in order, here from a body
      weights[b] = rng.random(max_masks) < 0.5
      scored = np.flatnonzero(weights[b])
      start = int(rng.choice(body))
      ids[b, scored] = np.pad(row[start : start + len(scored)], (0, max(0, start + len(scored) - length)))
    elif kind == 4:
      weights[b] = 0.0
  return ids, weights


@pytest.mark.parametrize("lengths", LENGTHS[:4])
def test_span_in_candidates_equals_the_sliding_window_loop(demo_store, lengths):
  query_len, block_len, joint_len = lengths
  config = RealmDataConfig(query_len=query_len, block_len=block_len, joint_len=joint_len)
  rng = np.random.default_rng(sum(lengths))
  found = 0.0
  for _ in range(20):
    batch, k = int(rng.integers(1, 17)), int(rng.integers(1, 9))
    _, joint = candidate_inputs(demo_store, random_candidates(rng, demo_store, batch, k),
                                random_queries(rng, batch, query_len), config)
    for max_masks in (1, 3, 10):
      ids, weights = _span_cases(rng, joint, max_masks)
      expected = reference.span_in_candidates(joint, ids, weights)
      assert_same(span_in_candidates(joint, ids, weights), expected)
      found += expected.sum()
  assert 0 < found


def test_span_in_candidates_equals_the_loop_on_any_segment_layout():
  rng = np.random.default_rng(0)
  for _ in range(50):
    batch, k, length, max_masks = (int(x) for x in rng.integers(1, [6, 4, 12, 4]))
    joint = {"input_ids": rng.integers(0, 3, (batch, k, length)).astype(np.int32),
             "segment_ids": rng.integers(0, 3, (batch, k, length)).astype(np.int32)}  # segment 1 anywhere
    ids, weights = rng.integers(0, 3, (batch, max_masks)), rng.integers(0, 2, (batch, max_masks)).astype(np.float32)
    assert_same(span_in_candidates(joint, ids, weights), reference.span_in_candidates(joint, ids, weights))
  empty = {"input_ids": np.zeros((2, 0, 5), np.int32), "segment_ids": np.zeros((2, 0, 5), np.int32)}
  assert_same(span_in_candidates(empty, np.ones((2, 3)), np.ones((2, 3))), np.zeros(2, np.float32))


def test_a_training_batch_completes_as_with_the_loops(demo_store):
  config = RealmDataConfig(batch_size=32, query_len=32, block_len=48, joint_len=80, num_candidates=8)
  batch = realm_query_dataset(demo_store, config)[0]
  rng = np.random.default_rng(1)
  retrieved, _ = random_retrievals(rng, demo_store, 32, 8)
  retrieved[:, 0] = batch["block_id"]  # the query's own block, top of the list
  retrieved[:16, 1] = batch["block_id"][:16]  # and twice
  outputs = []
  for module in (reference, None):
    select = module.select_candidates if module else select_candidates
    inputs = module.candidate_inputs if module else candidate_inputs
    span = module.span_in_candidates if module else span_in_candidates
    candidates, weights = select(retrieved, batch["block_id"], demo_store.arrays["uids"], 8)
    blocks, joint = inputs(demo_store, candidates, batch["query_input_ids"], config)
    outputs.append((candidates, weights, blocks, joint, span(joint, batch["mlm_ids"], batch["mlm_weights"])))
  assert_same(outputs[1], outputs[0])
  candidates, weights = outputs[1][:2]
  assert not (candidates == batch["block_id"][:, None]).any()  # the query's own block is gone
  assert not weights[:16].any()  # it was retrieved twice


@pytest.mark.parametrize("query_len, excluded", [(96, []), (16, []), (8, ["DATE"]), (32, ["PERSON", "ORG"])])
def test_maskable_blocks_and_the_held_out_split_equal_the_per_block_loops(demo_store, query_len, excluded):
  from realm_jax.data.realm import MaskedQueries, maskable_blocks

  labels = demo_store.manifest["span_labels"]
  ids = np.asarray(sorted(labels[x] for x in excluded if x in labels), np.int32)
  expected = reference.maskable_blocks(demo_store, ids, query_len)
  assert 0 < len(expected) < demo_store.num_blocks
  for chunk_blocks in (1 << 20, 7, 1):  # chunk edges anywhere
    assert_same(maskable_blocks(demo_store, ids, query_len, chunk_blocks), expected)
  queries = MaskedQueries(demo_store, RealmDataConfig(query_len=query_len, excluded_labels=tuple(excluded),
                                                      eval_blocks=40))
  train, held_out = reference.held_out_split(expected, demo_store.arrays["uids"], 40)
  assert_same(queries.block_ids, expected)
  assert_same((queries.train_block_ids, queries.eval_block_ids), (train, held_out))
