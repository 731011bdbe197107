"""The per-example (Python loop) REALM candidate functions that `realm_jax.data.realm` vectorised: the reference
its tests compare against exactly, and the "before" of `bench/realm_host_step.py`."""

from __future__ import annotations

import numpy as np

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES, pack
from realm_jax.data.realm import NULL_BLOCK, RealmDataConfig


def select_candidates(
    retrieved: np.ndarray, source: np.ndarray, uids: np.ndarray, num_candidates: int, null_document: bool = True,
    exclude_trivial: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Reference `realm_jax.data.realm.select_candidates`, one example at a time."""
  batch = len(retrieved)
  offset = 1 if null_document else 0
  out = np.full((batch, num_candidates), NULL_BLOCK, np.int64)
  weights = np.ones(batch, np.float32)
  for b in range(batch):
    source_uid = bytes(uids[source[b]])
    kept = [int(i) for i in retrieved[b] if not exclude_trivial or bytes(uids[int(i)]) != source_uid]
    kept = kept[: num_candidates - offset]
    if len({bytes(uids[i]) for i in kept}) != len(kept) or len(kept) < num_candidates - offset:
      weights[b] = 0.0
    out[b, offset : offset + len(kept)] = kept
  return out, weights


def span_in_candidates(joint: dict[str, np.ndarray], mlm_ids: np.ndarray, mlm_weights: np.ndarray) -> np.ndarray:
  """Reference `realm_jax.data.realm.span_in_candidates`, one candidate at a time."""
  batch, k, _ = joint["input_ids"].shape
  found = np.zeros(batch, np.float32)
  for b in range(batch):
    span = mlm_ids[b][mlm_weights[b] > 0]
    if not len(span):
      continue
    for j in range(k):
      body = joint["input_ids"][b, j][joint["segment_ids"][b, j] == 1]
      if len(body) >= len(span) and (np.lib.stride_tricks.sliding_window_view(body, len(span)) == span).all(1).any():
        found[b] = 1.0
        break
  return found


def candidate_inputs(store: BlockStore, candidates: np.ndarray, query_ids: np.ndarray, config: RealmDataConfig):
  """Reference `realm_jax.data.realm.candidate_inputs`, one `pack` per candidate."""
  special = store.manifest["special_ids"]
  cls, sep = np.asarray([special["cls"]]), np.asarray([special["sep"]])
  empty = np.zeros(0, np.int32)
  batch, k = candidates.shape
  blocks = {name: np.zeros((batch, k, config.block_len), np.int32) for name in FEATURES}
  joint = {name: np.zeros((batch, k, config.joint_len), np.int32) for name in FEATURES}
  for b in range(batch):
    query = query_ids[b][1 : int(np.flatnonzero(query_ids[b] == special["sep"])[0])]
    for j, block_id in enumerate(candidates[b]):
      title = empty if block_id == NULL_BLOCK else store.title_ids(int(block_id))
      body = empty if block_id == NULL_BLOCK else store.body_ids(int(block_id))
      block_budget = config.block_len - len(title) - 3
      packed = pack([cls, title, sep, body[: max(0, block_budget)], sep], config.block_len, segment_break=3)
      joint_budget = config.joint_len - len(query) - 3
      joined = pack([cls, query, sep, body[: max(0, joint_budget)], sep], config.joint_len, segment_break=3)
      for name in blocks:
        blocks[name][b, j] = packed[name]
        joint[name][b, j] = joined[name]
  return blocks, joint


def maskable_blocks(store: BlockStore, excluded: np.ndarray, query_len: int) -> np.ndarray:
  """Reference `realm_jax.data.realm.maskable_blocks`, one block and one span at a time."""
  found = []
  for i in range(store.num_blocks):
    bounds = np.append(store.sentence_starts(i), len(store.body_ids(i)))
    for start, end, label in store.spans(i):
      s = int(np.searchsorted(bounds, start, side="right") - 1)
      if label not in excluded and end <= bounds[s + 1] and end - bounds[s] <= query_len - 2:
        found.append(i)
        break
  return np.asarray(found, np.int64)


def held_out_split(block_ids: np.ndarray, uids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference `MaskedQueries._hold_out`: a full sort of the blocks by uid bytes, then a set lookup per block."""
  order = np.lexsort(uids[block_ids].T[::-1])
  held_out = np.sort(block_ids[order[:count]])
  held_uids = {bytes(uids[i]) for i in held_out}
  return np.asarray([i for i in block_ids if bytes(uids[i]) not in held_uids], np.int64), held_out
