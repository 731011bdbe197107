"""Input helpers every task's data shares: BERT feature names, packing id pieces, batches over blocks, span grids,
blocks grouped by length for embedding."""

from __future__ import annotations

import grain
import jax
import numpy as np

from realm_jax import partitioning
from realm_jax.errors import InputError

FEATURES = ("input_ids", "input_mask", "segment_ids")  # a BERT input, as every batch names its parts


def pack(pieces: list[np.ndarray], max_len: int, segment_break: int | None = None) -> dict[str, np.ndarray]:
  """Concatenates id pieces, pads to max_len; segment 1 starts at piece `segment_break`."""
  ids = np.zeros(max_len, np.int32)
  segments = np.zeros(max_len, np.int32)
  position = 0
  for k, piece in enumerate(pieces):
    piece = piece[: max_len - position]
    if segment_break is not None and k >= segment_break:
      segments[position : position + len(piece)] = 1
    ids[position : position + len(piece)] = piece
    position += len(piece)
  mask = (np.arange(max_len) < position).astype(np.int32)
  return {"input_ids": ids, "input_mask": mask, "segment_ids": segments * mask}


def block_batches(block_ids: np.ndarray, make_example, batch_size: int, seed: int) -> grain.MapDataset:
  """Infinite batches of `make_example(block_id, rng)` over blocks shuffled per epoch; deterministic in `seed`.

  With several JAX processes each process makes only its part of every global batch of `batch_size`:
  process p gets rows [p * b, (p + 1) * b), b = batch_size / process_count (`partitioning.process_rows`).
  """
  processes = jax.process_count()
  if batch_size % processes:
    raise InputError(f"batch_size {batch_size} does not split over {processes} processes")
  batches = (
      grain.MapDataset.source(block_ids)
      .shuffle(seed=seed)
      .repeat(None)
      .random_map(lambda block_id, rng: make_example(int(block_id), rng), seed=seed)
      .batch(batch_size // processes, drop_remainder=True)
  )
  return batches[jax.process_index()::processes] if processes > 1 else batches


def span_grid(seq_len: int, max_span_width: int) -> tuple[np.ndarray, np.ndarray]:
  """Static candidate spans: starts, ends [seq_len * max_span_width] (ends may run past the sequence)."""
  starts = np.repeat(np.arange(seq_len), max_span_width)
  ends = starts + np.tile(np.arange(max_span_width), seq_len)
  return starts.astype(np.int32), ends.astype(np.int32)


def embedding_batches(lengths: np.ndarray, batch_size: int, block_len: int, length_bucket: int,
                      part: int = 0, parts: int = 1) -> list[tuple[int, np.ndarray]]:
  """(input length, block ids) batches covering every block once: blocks grouped by their length rounded up
  to a multiple of `length_bucket` (capped at `block_len`); `length_bucket=0` pads every block to `block_len`.

  With `parts` processes, process `part`'s share of each global batch of `batch_size`: at most
  batch_size / parts of its own blocks (`partitioning.process_block_range`, so it keeps and writes one
  contiguous range of the index).  Every part gets the same lengths in the same order (each batch is one global
  step); where a part has fewer blocks of a length than another, its last batches of that length are short or
  empty."""
  if length_bucket > 0:
    padded = np.minimum(block_len, -(-np.asarray(lengths) // length_bucket) * length_bucket)
  else:
    padded = np.full(len(lengths), block_len)
  bounds = [partitioning.process_block_range(len(padded), q, parts) for q in range(parts)]
  start, stop = bounds[part]
  local = batch_size // parts
  batches = []
  for length in np.unique(padded):
    count = max(-(-int(np.count_nonzero(padded[a:b] == length)) // local) for a, b in bounds)
    ids = start + np.flatnonzero(padded[start:stop] == length)
    batches += [(int(length), ids[i * local : (i + 1) * local]) for i in range(count)]
  return batches
