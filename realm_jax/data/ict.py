"""Inverse Cloze Task examples from the block store (ORQA's `ict_dataset`).

A sentence of a block is the query `[CLS] sentence [SEP]`; the block
`[CLS] title [SEP] body [SEP]` is its positive, with the sentence removed with
probability `remove_prob` (0.9).  Only blocks with at least two sentences are
sampled (ORQA drops masked examples of one-sentence blocks).  Other blocks of the
global batch are the negatives (see `realm_jax.objectives.ict`).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import block_batches, pack
from realm_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class IctDataConfig:
  batch_size: int = 4096
  query_len: int = 96
  block_len: int = 288
  remove_prob: float = 0.9
  seed: int = 0


class IctExamples:
  """Random-access ICT example maker (block index, rng) -> features."""

  def __init__(self, store: BlockStore, config: IctDataConfig):
    self.store, self.config = store, config
    special = store.manifest["special_ids"]
    self.cls = np.asarray([special["cls"]], np.int32)
    self.sep = np.asarray([special["sep"]], np.int32)
    sentence_counts = np.diff(store.arrays["sentence_offsets"])
    self.block_ids = np.flatnonzero(sentence_counts >= 2)
    if len(self.block_ids) < config.batch_size:
      raise InputError(
          f"{store.path}: only {len(self.block_ids)} blocks have >= 2 sentences; "
          f"ICT batch_size={config.batch_size} needs at least that many"
      )

  def __call__(self, block_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c, store = self.config, self.store
    body, starts = store.body_ids(block_id), store.sentence_starts(block_id)
    bounds = np.append(starts, len(body))
    s = int(rng.integers(len(starts)))
    sentence = body[bounds[s] : bounds[s + 1]]
    removed = bool(rng.random() < c.remove_prob)
    context = np.concatenate([body[: bounds[s]], body[bounds[s + 1] :]]) if removed else body
    query = pack([self.cls, sentence[: c.query_len - 2], self.sep], c.query_len)
    title = store.title_ids(block_id)
    block_budget = c.block_len - len(title) - 3
    block = pack([self.cls, title, self.sep, context[:block_budget], self.sep], c.block_len, segment_break=3)
    return {
        **{f"query_{k}": v for k, v in query.items()},
        **{f"block_{k}": v for k, v in block.items()},
        "block_id": np.int32(block_id),
        "sentence_removed": np.int32(removed),
    }


def ict_dataset(store: BlockStore, config: IctDataConfig) -> grain.MapDataset:
  """Infinite, shuffled (per epoch), batched ICT dataset; deterministic given `config.seed`."""
  examples = IctExamples(store, config)
  return block_batches(examples.block_ids, examples, config.batch_size, config.seed)


def ict_iterator(store: BlockStore, config: IctDataConfig) -> grain.DatasetIterator:
  """Checkpointable iterator (`get_state`/`set_state`) with background prefetch."""
  dataset = ict_dataset(store, config).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  )
  return iter(dataset)
