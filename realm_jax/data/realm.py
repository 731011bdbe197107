"""REALM pre-training examples: salient-span masked queries, candidate post-processing, joint inputs.

Query (released `example_generator` / `featurization.mask_query`): one sentence of a block that
holds a salient span (entity or date) wholly inside it; one such span is chosen uniformly at random
and ALL its word pieces become [MASK]; at most `max_masks` (10) positions are scored.  Blocks with
no valid span are never sampled (no fallback).  Table 2's masking ablations mask one random sentence's word
pieces, 15% of them (at least 1, at most `max_masks`): `masking="random_tokens"` (BERT) at random positions,
`masking="random_spans"` (SpanBERT) as contiguous spans of Geometric(0.2) lengths (at most 10) at random free
positions until that budget is met (`random_spans`; SpanBERT's spans are whole words, the store's word pieces
carry no word boundaries, so lengths count word pieces here).

Candidates: the top `search_depth` blocks of the published index (stale), every block with the query's own
content removed (trivial retrieval), the null document prepended at index 0, truncated to `num_candidates`
(8).  Queries may come from a block store of their own (the paper's X = CC-News, Z = Wikipedia:
`RealmSpec.query_store`, `query_store_for`): the query block's SHA1 uid is then compared with the knowledge
store's, so a text present in both corpora is still never its own candidate.  Examples whose candidates hold
the same content twice (SHA1 uid) get weight 0 (the released code drops them).

Held-out evaluation (`eval_blocks` > 0; the paper has none): the first `eval_blocks` maskable blocks in
SHA1-uid order (a pseudo-random choice that depends on the text only) never make training queries; each
makes one fixed query (`MaskedQueries.eval_batches`).  Runs on the same block store with the same
`eval_blocks`, held-out masking (`eval_masking`, else `masking`), `query_len`, `max_masks` and `excluded_labels`
share these queries, whatever their `seed` or training masking.  The blocks stay in the index: other queries may
retrieve them, their own queries never do (the evaluation excludes trivial retrievals even in the keep-trivial
ablation).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import grain
import numpy as np

from realm_jax.data.blocks import BlockStore, pack_rows
from realm_jax.data.features import block_batches, pack
from realm_jax.errors import InputError

NULL_BLOCK = -1  # candidate id of the null document
MASKINGS = ("salient_spans", "random_tokens", "random_spans")
MAX_RANDOM_SPAN = 10  # SpanBERT's longest span


@dataclasses.dataclass(frozen=True)
class RealmDataConfig:
  batch_size: int = 512
  query_len: int = 96
  block_len: int = 288
  joint_len: int = 384
  max_masks: int = 10
  num_candidates: int = 8  # including the null document
  masking: str = "salient_spans"  # or "random_tokens" / "random_spans" (Table 2 ablations)
  random_mask_rate: float = 0.15  # random_tokens / random_spans: the share of the sentence masked
  random_span_p: float = 0.2  # random_spans: span lengths ~ Geometric(p), at most MAX_RANDOM_SPAN (SpanBERT's)
  excluded_labels: tuple[str, ...] = ("CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY")
  seed: int = 0
  eval_blocks: int = 0  # source blocks held out of training for a fixed evaluation query set
  # The held-out queries' masking; None: `masking`.  Table 2's masking ablations set "salient_spans", so that
  # every variant of a sweep scores the same held-out queries (gin/ablations/random_*_masking.gin).
  eval_masking: str | None = None


def maskable_blocks(store: BlockStore, excluded: np.ndarray, query_len: int,
                    chunk_blocks: int = 1 << 18) -> np.ndarray:
  """Ids of the blocks with a salient span `MaskedQueries._valid_spans` accepts (label not `excluded`, inside
  one sentence, its sentence's start to the span's end fitting a query of `query_len`), ascending; vectorised
  over the store's CSR arrays a chunk of blocks at a time, chunks on one thread per core (numpy releases the GIL),
  memory: a few chunks' spans, not the store's."""
  firsts = range(0, store.num_blocks, chunk_blocks)
  with concurrent.futures.ThreadPoolExecutor(min(len(firsts), os.cpu_count() or 1) or 1) as pool:
    found = list(pool.map(lambda first: _maskable_in(store, excluded, query_len, first,
                                                     min(first + chunk_blocks, store.num_blocks)), firsts))
  return np.concatenate(found or [np.zeros(0, np.int64)]).astype(np.int64)


def _maskable_in(store: BlockStore, excluded: np.ndarray, query_len: int, first: int, last: int) -> np.ndarray:
  """`maskable_blocks` of blocks [first, last), indices local to the chunk (int32: every index here is below the
  chunk's sentence or span count)."""
  a = store.arrays
  span_rows = np.asarray(a["span_offsets"][first : last + 1])
  spans = np.asarray(a["spans"][span_rows[0] : span_rows[-1]])
  span_block = np.repeat(np.arange(last - first, dtype=np.int32), np.diff(span_rows))
  # Each block's sentence bounds (its sentence starts, then its body length) laid end to end: block b's are
  # bounds[base[b] : base[b] + count[b]], ascending, so one searchsorted over (block, position) keys finds every
  # span's sentence.
  sentence_rows = np.asarray(a["sentence_offsets"][first : last + 1])
  starts = np.asarray(a["sentence_starts"][sentence_rows[0] : sentence_rows[-1]], np.int32)
  body_len = np.diff(np.asarray(a["body_offsets"][first : last + 1])).astype(np.int32)
  count = (np.diff(sentence_rows) + 1).astype(np.int32)
  end = np.cumsum(count, dtype=np.int32)
  base = end - count
  is_end = np.zeros(int(end[-1]) if len(end) else 0, bool)
  is_end[end - 1] = True
  bounds = np.empty(len(is_end), np.int32)
  bounds[is_end], bounds[~is_end] = body_len, starts
  scale = np.int32(int(body_len.max(initial=0)) + 1)
  keys = np.repeat(np.arange(last - first, dtype=np.int32), count) * scale + bounds
  local = base[span_block]
  # As in _valid_spans: the last sentence starting at or before the span's start (-1: none, whose "start" is the
  # body length, bounds[-1], and whose end is the first bound).
  sentence = np.searchsorted(keys, span_block * scale + spans[:, 0], side="right").astype(np.int32) - 1
  sentence_end = bounds[sentence + 1]
  sentence_start = np.where(sentence >= local, bounds[np.maximum(sentence, 0)], body_len[span_block])
  labels = np.ones(int(max(spans[:, 2].max(initial=0), excluded.max(initial=0))) + 1, bool)
  labels[excluded] = False
  valid = labels[spans[:, 2]] & (spans[:, 1] <= sentence_end) & (spans[:, 1] - sentence_start <= query_len - 2)
  has_valid = np.zeros(last - first, bool)
  has_valid[span_block[valid]] = True
  return first + np.flatnonzero(has_valid)


class MaskedQueries:
  """Random-access maker of masked queries: (block id, rng) -> features."""

  def __init__(self, store: BlockStore, config: RealmDataConfig):
    self.eval_masking = config.eval_masking or config.masking
    for field, masking in (("masking", config.masking), ("eval_masking", self.eval_masking)):
      if masking not in MASKINGS:
        raise InputError(f"{field} must be one of {', '.join(map(repr, MASKINGS))}, got {masking!r}")
    self.store, self.config = store, config
    special = store.manifest["special_ids"]
    self.cls, self.sep, self.mask = special["cls"], special["sep"], special["mask"]
    excluded = {store.manifest["span_labels"][x] for x in config.excluded_labels if x in store.manifest["span_labels"]}
    self.excluded = np.asarray(sorted(excluded), np.int32)
    self.block_ids = self._sources(config.masking)
    other = config.eval_blocks and self.eval_masking != config.masking
    pool = self._sources(self.eval_masking) if other else self.block_ids
    self.train_block_ids, self.eval_block_ids = self._hold_out(config.eval_blocks, pool)

  def _sources(self, masking: str) -> np.ndarray:
    """The blocks that can make a query under `masking`: those with a usable salient span, or every block."""
    ids = (maskable_blocks(self.store, self.excluded, self.config.query_len) if masking == "salient_spans"
           else np.arange(self.store.num_blocks))
    if not len(ids):
      raise InputError(f"{self.store.path}: no block has a salient span usable for masking")
    return ids

  def _hold_out(self, count: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training source blocks, `count` held-out ones from `pool`): blocks sharing a held-out uid never train."""
    if count == 0:
      return self.block_ids, self.block_ids[:0]
    if not 0 < count < len(pool):
      raise InputError(f"eval_blocks={count}: {self.store.path} has {len(pool)} maskable blocks; "
                       "hold out fewer so some are left to train on")
    uids = self.store.arrays["uids"]
    prefix = lambda rows: np.ascontiguousarray(rows[:, :8]).view(">u8")[:, 0]  # noqa: E731
    pool_prefixes = prefix(uids[pool])
    # The `count` smallest uids (by bytes; ties keep block order): only blocks whose 8-byte prefix is at most the
    # count-th smallest prefix can be among them, so only those are sorted by all 20 bytes.
    maybe_first = np.flatnonzero(pool_prefixes <= np.partition(pool_prefixes, count - 1)[count - 1])
    order = maybe_first[np.lexsort(uids[pool[maybe_first]].T[::-1])]
    held_out = np.sort(pool[order[:count]])
    held_uids = {bytes(uids[i]) for i in held_out}
    prefixes = prefix(uids[self.block_ids])
    maybe_held = np.flatnonzero(np.isin(prefixes, prefix(uids[held_out])))
    shares_uid = [j for j in maybe_held if bytes(uids[self.block_ids[j]]) in held_uids]
    return np.delete(self.block_ids, shares_uid), held_out

  def eval_batches(self, batch_size: int) -> list[dict[str, np.ndarray]]:
    """One fixed query per held-out block (its rng seeded by the block id), in global batches of `batch_size`;
    the last is filled up with copies of the first query whose masks are not scored (`mlm_weights` 0)."""
    examples = [self(int(i), np.random.default_rng(int(i)), self.eval_masking) for i in self.eval_block_ids]
    filler = {**examples[0], "mlm_weights": np.zeros_like(examples[0]["mlm_weights"])}
    examples += [filler] * (-len(examples) % batch_size)
    return [{k: np.stack([e[k] for e in examples[i : i + batch_size]]) for k in examples[0]}
            for i in range(0, len(examples), batch_size)]

  def _sentence_bounds(self, block_id: int) -> np.ndarray:
    return np.append(self.store.sentence_starts(block_id), len(self.store.body_ids(block_id)))

  def _valid_spans(self, block_id: int) -> list[tuple[int, int, int]]:
    """(span start, span end, sentence index) of spans wholly inside one sentence that survive truncation."""
    spans = self.store.spans(block_id)
    if not len(spans):
      return []
    bounds = self._sentence_bounds(block_id)
    valid = []
    for start, end, label in spans:
      if label in self.excluded:
        continue
      s = int(np.searchsorted(bounds, start, side="right") - 1)
      if end <= bounds[s + 1] and end - bounds[s] <= self.config.query_len - 2:
        valid.append((int(start), int(end), s))
    return valid

  def __call__(self, block_id: int, rng: np.random.Generator, masking: str | None = None) -> dict[str, np.ndarray]:
    """The masked query of `block_id` under `masking` (None: the training masking)."""
    c = self.config
    masking = masking or c.masking
    body = self.store.body_ids(block_id)
    bounds = self._sentence_bounds(block_id)
    if masking == "salient_spans":
      valid = self._valid_spans(block_id)
      start, end, s = valid[int(rng.integers(len(valid)))]
      sentence = body[bounds[s] : bounds[s + 1]][: c.query_len - 2].copy()
      masked = np.arange(start - bounds[s], end - bounds[s])
    else:
      s = int(rng.integers(len(bounds) - 1))
      sentence = body[bounds[s] : bounds[s + 1]][: c.query_len - 2].copy()
      budget = min(len(sentence), max(1, min(c.max_masks, int(round(c.random_mask_rate * len(sentence))))))
      if masking == "random_tokens":
        masked = np.sort(rng.choice(len(sentence), size=budget, replace=False))
      else:
        covered = np.zeros(len(sentence), bool)
        for start, end in random_spans(len(sentence), budget, rng, c.random_span_p):
          covered[start:end] = True
        masked = np.flatnonzero(covered)
    targets = sentence[masked].copy()
    sentence[masked] = self.mask
    query = pack([np.asarray([self.cls]), sentence, np.asarray([self.sep])], c.query_len)
    scored = masked[: c.max_masks]
    positions = np.zeros(c.max_masks, np.int32)
    ids = np.zeros(c.max_masks, np.int32)
    weights = np.zeros(c.max_masks, np.float32)
    positions[: len(scored)] = scored + 1  # + [CLS]
    ids[: len(scored)] = targets[: c.max_masks]
    weights[: len(scored)] = 1.0
    return {
        **{f"query_{k}": v for k, v in query.items()},
        "mlm_positions": positions, "mlm_ids": ids, "mlm_weights": weights,
        "block_id": np.int32(block_id),
    }


def random_spans(length: int, budget: int, rng: np.random.Generator, p: float = 0.2) -> list[tuple[int, int]]:
  """SpanBERT-style spans [(start, end)] over positions [0, length): disjoint, `budget` (<= length) positions in
  all.  Each span's length is drawn from Geometric(p), at most MAX_RANDOM_SPAN and what is left of the budget, and
  its start uniformly among the starts where it covers no masked position (shortened while there is none)."""
  if not 0 <= budget <= length:
    raise ValueError(f"a budget of {budget} masks does not fit {length} positions")
  free, spans, left = np.ones(length, bool), [], budget
  while left > 0:
    span = min(int(rng.geometric(p)), MAX_RANDOM_SPAN, left)
    while not (starts := np.flatnonzero(np.lib.stride_tricks.sliding_window_view(free, span).all(1))).size:
      span -= 1  # stops at 1 at the latest: fewer than `length` positions are masked so far
    start = int(starts[rng.integers(len(starts))])
    free[start : start + span] = False
    spans.append((start, start + span))
    left -= span
  return spans


def realm_query_dataset(store: BlockStore, config: RealmDataConfig,
                        queries: MaskedQueries | None = None) -> grain.MapDataset:
  """Infinite, shuffled, batched masked training queries (candidates come later: `select_candidates`);
  `queries`: an already built `MaskedQueries(store, config)`."""
  queries = queries or MaskedQueries(store, config)
  return block_batches(queries.train_block_ids, queries, config.batch_size, config.seed)


def query_store_for(knowledge: BlockStore, query_store: str | None) -> BlockStore:
  """The store the masked queries come from: `knowledge` itself (None) or the block store at `query_store`,
  which must share the knowledge store's tokenizer and special ids (the reader joins a query with a retrieved
  body, so both must be the same word pieces)."""
  if query_store is None:
    return knowledge
  queries = BlockStore(query_store)
  for field in ("tokenizer", "special_ids"):
    if queries.manifest[field] != knowledge.manifest[field]:
      raise InputError(f"{queries.path}/manifest.json: {field} {queries.manifest[field]!r} differs from the "
                       f"knowledge store's {knowledge.manifest[field]!r} ({knowledge.path}): build both block stores "
                       "with one --vocab")
  return queries


def most_blocks_per_uid(uids: np.ndarray) -> int:
  """The most blocks of the store [N, 20] that share one SHA1 uid (the same title and body): 1 where no content
  repeats.  Counted by the uids' first 8 bytes (an over-count only if two texts' SHA1s share them)."""
  if not len(uids):
    return 1
  prefixes = np.ascontiguousarray(np.asarray(uids)[:, :8]).view(">u8")[:, 0]
  return int(np.unique(prefixes, return_counts=True)[1].max())


def search_depth(num_candidates: int, null_document: bool, exclude_trivial: bool, copies: int,
                 num_blocks: int) -> int:
  """How many blocks to retrieve per query so that removing the blocks with the query's own content (`copies`:
  at most that many, `most_blocks_per_uid`) still leaves every candidate slot filled, at most the index's
  `num_blocks`.  The released code's 8 (7 retrieved + the null document, one spare for the source block) where
  content is unique; one more without the null document."""
  slots = num_candidates - (1 if null_document else 0)
  return min(num_blocks, slots + (copies if exclude_trivial else 0))


def select_candidates(
    retrieved: np.ndarray, source: np.ndarray, uids: np.ndarray, num_candidates: int, null_document: bool = True,
    exclude_trivial: bool = True, query_uids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """[B, k] retrieved ids -> ([B, num_candidates] ids, NULL_BLOCK first if `null_document`; [B] weights).

  Every block whose SHA1 uid (`uids` [N, 20], from the knowledge block store) equals the source block's (its
  row of `query_uids`, the query store's uids, where queries come from a store of their own; None: `uids`) is
  removed (trivial retrieval; `exclude_trivial=False` keeps them, the paper's §3.4 counter-example); the
  first blocks left fill the slots in order.  Examples whose candidates hold two blocks of the same uid (the
  same content under two block ids, or one block twice), or with too few blocks left, get weight 0 (the
  released code skips examples whose retrieved uids repeat).  Vectorised over the batch.
  """
  retrieved = np.asarray(retrieved)
  offset = 1 if null_document else 0
  slots = num_candidates - offset
  if slots < 0:
    raise InputError(f"num_candidates={num_candidates}: the null document alone needs 1")
  batch, k = retrieved.shape
  keep = np.ones((batch, k), bool)
  if exclude_trivial:
    source_uids = (uids if query_uids is None else query_uids)[np.asarray(source)]
    keep = (uids[retrieved] != source_uids[:, None]).any(-1)
  rank = np.cumsum(keep, 1) - 1  # position among the kept blocks
  rows, cols = np.nonzero(keep & (rank < slots))
  out = np.full((batch, num_candidates), NULL_BLOCK, np.int64)
  out[rows, offset + rank[rows, cols]] = retrieved[rows, cols]
  chosen = out[:, offset:]
  content = np.ascontiguousarray(uids[np.maximum(chosen, 0)]).view(f"V{uids.shape[1]}")[..., 0]  # [B, slots]
  real = chosen != NULL_BLOCK
  same = (content[:, :, None] == content[:, None, :]) & real[:, :, None] & real[:, None, :]
  duplicates = np.triu(same, 1).any((1, 2))
  weights = np.where(duplicates | (keep.sum(1) < slots), 0, 1).astype(np.float32)
  return out, weights


def span_in_candidates(joint: dict[str, np.ndarray], mlm_ids: np.ndarray, mlm_weights: np.ndarray) -> np.ndarray:
  """[B] 1.0 where the scored masked wordpieces, in order and contiguous, occur in the block part (segment 1)
  of some candidate's joint input [B, K, L] as the reader sees it, else 0.0.

  With salient-span masking this says whether retrieval brought the reader the masked entity at all (the
  null block has an empty body, so it never counts).  Vectorised: the candidates' segment-1 wordpieces are
  listed row by row, and only where a span's first wordpiece occurs are the rest compared.
  """
  ids = np.asarray(joint["input_ids"])
  batch, k, length = ids.shape
  found = np.zeros(batch, np.float32)
  scored = np.asarray(mlm_weights) > 0
  span_len = scored.sum(1)
  if not span_len.any():
    return found
  spans = np.take_along_axis(np.asarray(mlm_ids), np.argsort(~scored, 1, kind="stable"), 1)  # scored ids first
  body = np.asarray(joint["segment_ids"]) == 1
  where = np.flatnonzero(body)  # flat positions of the body wordpieces, row after row
  counts = body.reshape(batch * k, length).sum(1)
  row_start = np.cumsum(counts) - counts  # each row's first entry in `where`
  hits = np.flatnonzero(body & (ids == spans[:, :1, None]))  # the first scored wordpiece in a body
  rank = np.searchsorted(where, hits)
  row = hits // length
  b = row // k
  m = span_len[b]
  starts = (m > 0) & (rank - row_start[row] + m <= counts[row])  # the span would end inside the body
  offsets = np.arange(spans.shape[1])
  tokens = ids.reshape(-1)[where[np.minimum(rank[:, None] + offsets, len(where) - 1)]]
  match = starts & ((tokens == spans[b]) | (offsets >= m[:, None])).all(1)
  found[b[match]] = 1.0
  return found


def block_inputs(store: BlockStore, ids: np.ndarray, block_len: int) -> dict[str, np.ndarray]:
  """Block-tower inputs [*ids.shape, block_len] (`[CLS] title [SEP] body [SEP]`, null = `[CLS] [SEP] [SEP]`) of
  block ids of any shape, packed straight from the memory-mapped CSR arrays (see `candidate_inputs`)."""
  special = store.manifest["special_ids"]
  flat = np.asarray(ids).reshape(-1)
  real = flat != NULL_BLOCK
  safe = np.where(real, flat, 0)
  arrays = store.arrays
  title_start, body_start = arrays["title_offsets"][safe], arrays["body_offsets"][safe]
  title_len = np.where(real, arrays["title_offsets"][safe + 1] - title_start, 0)
  body_len = np.where(real, arrays["body_offsets"][safe + 1] - body_start, 0)
  body_kept = np.minimum(body_len, np.maximum(0, block_len - title_len - 3))
  rows = pack_rows(block_len, special["cls"], special["sep"], arrays["title_ids"], title_start, title_len,
                   arrays["body_ids"], body_start, body_kept)
  return {n: x.reshape(*np.shape(ids), block_len) for n, x in rows.items()}


def rerank(retrieved: np.ndarray, query_emb: np.ndarray, block_emb: np.ndarray) -> np.ndarray:
  """[B, L] retrieved ids reordered by the current towers' inner products (`query_emb` [B, d] with `block_emb`
  [B, L, d]), best first; ties keep the stale index's order."""
  scores = np.einsum("bd,bld->bl", np.asarray(query_emb, np.float32), np.asarray(block_emb, np.float32))
  return np.take_along_axis(np.asarray(retrieved), np.argsort(-scores, axis=1, kind="stable"), axis=1)


def candidate_inputs(store: BlockStore, candidates: np.ndarray, query_ids: np.ndarray,
                     config: RealmDataConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Block inputs [B, K, block_len] (`[CLS] title [SEP] body [SEP]`, null = `[CLS] [SEP] [SEP]`) and joint
  reader inputs [B, K, joint_len] (`[CLS] query [SEP] body [SEP]`, title dropped, as released).

  Vectorised: each row is one copy out of a sliding-window view of the memory-mapped CSR title/body arrays,
  starting where the candidate's tokens land at their positions, then masked; no padded [num_blocks, block_len]
  copy of the store (15 GB at 13.35M blocks), so memory is O(B K joint_len).
  """
  special = store.manifest["special_ids"]
  cls, sep = special["cls"], special["sep"]
  candidates, query_ids = np.asarray(candidates), np.asarray(query_ids)
  batch, k = candidates.shape
  is_sep = query_ids == sep
  if not is_sep.any(1).all():
    raise InputError(f"query rows {np.flatnonzero(~is_sep.any(1)).tolist()} have no [SEP] ({sep})")
  blocks = block_inputs(store, candidates, config.block_len)
  query_len = np.repeat(np.maximum(is_sep.argmax(1) - 1, 0), k)  # [CLS] query [SEP]
  query_start = np.repeat(np.arange(batch, dtype=np.int64) * query_ids.shape[1] + 1, k)
  ids = candidates.reshape(-1)
  real = ids != NULL_BLOCK
  safe = np.where(real, ids, 0)
  arrays = store.arrays
  body_start = arrays["body_offsets"][safe]
  body_len = np.where(real, arrays["body_offsets"][safe + 1] - body_start, 0)
  joint_body = np.minimum(body_len, np.maximum(0, config.joint_len - query_len - 3))
  joint = pack_rows(config.joint_len, cls, sep, query_ids.reshape(-1), query_start, query_len,
                     arrays["body_ids"], body_start, joint_body)
  return blocks, {n: x.reshape(batch, k, config.joint_len) for n, x in joint.items()}
