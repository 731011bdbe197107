"""Retrieval baselines for the results table: BM25 (bm25s) and all-MiniLM-L6-v2 zero-shot.

BM25 follows the small corpus's reference setting (k1 0.9, b 0.4, English stop words, title + text).
MiniLM zero-shot is the sentence-transformers recipe: mean of the last hidden states over the
non-padding tokens, L2-normalised, cosine similarity.  NB: all-MiniLM-L6-v2 was trained on NQ and
SQuAD question-passage pairs, so its NQ numbers are not zero-shot in the usual sense.

Both hold the whole corpus on this host (BM25: every text and its inverted index; MiniLM: an [N, 384] float32
matrix embedded here), so both are refused above `MAX_BASELINE_BLOCKS` (`check_baseline_size`).
"""

from __future__ import annotations

import dataclasses

import bm25s
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from realm_jax import partitioning
from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import embedding_batches
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer
from realm_jax.data.tokenization import Tokenizer
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder
from realm_jax.retrieval.mips import ExactSearcher

MAX_BASELINE_BLOCKS = 2_000_000


def check_baseline_size(name: str, store: BlockStore) -> None:
  """Refuses an in-memory baseline over a store larger than `MAX_BASELINE_BLOCKS`, saying how to leave it out."""
  if store.num_blocks > MAX_BASELINE_BLOCKS:
    raise InputError(f"{store.path}: {store.num_blocks:,} blocks; the {name} baseline holds the whole corpus in "
                     f"memory and is refused above {MAX_BASELINE_BLOCKS:,} blocks: leave it out with "
                     "--gin_bindings='openqa_eval.EvaluationConfig.baselines = []'")


class Bm25Retriever:
  def __init__(self, store: BlockStore, k1: float = 0.9, b: float = 0.4):
    check_baseline_size("bm25", store)
    texts = [f"{t['title']} {t['text']}" for t in store.iter_texts()]
    self.bm25 = bm25s.BM25(k1=k1, b=b)
    self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    self.num_blocks = len(texts)

  def search(self, questions: list[str], k: int) -> np.ndarray:
    tokens = bm25s.tokenize(questions, stopwords="en", show_progress=False)
    ids, _ = self.bm25.retrieve(tokens, k=min(k, self.num_blocks), show_progress=False)
    return np.asarray(ids)


class MeanPoolRetriever:
  """A BERT sentence encoder used as sentence-transformers does (mean pooling, cosine)."""

  def __init__(self, encoder: BertConfig, params: dict, store: BlockStore, tokenizer: Tokenizer, mesh,
               block_len: int = 288, batch_size: int = 64, length_bucket: int = 32,
               rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES):
    check_baseline_size("minilm", store)
    self.store, self.mesh = store, mesh
    self.featurizer = OpenQaFeaturizer(store, tokenizer, OpenQaDataConfig(), encoder.max_position_embeddings)
    model = BertEncoder(dataclasses.replace(encoder, pooling="mean"))

    @jax.jit
    def embed(p, b):
      with nn.logical_axis_rules(rules):
        _, mean = model.apply({"params": p}, b["input_ids"], b["input_mask"], b["segment_ids"], True)
      mean = mean.astype(jnp.float32)
      return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)

    self._embed = embed
    with jax.set_mesh(mesh):
      self.params = jax.device_put(params, NamedSharding(mesh, P()))
    batch_size = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
    blocks = np.zeros((store.num_blocks, encoder.hidden_size), np.float32)
    batches = embedding_batches(store.retriever_lengths(block_len), batch_size, block_len, length_bucket)
    for length, ids in tqdm(batches, desc="MiniLM block embeddings", unit="batch", mininterval=2.0):
      inputs = store.retriever_inputs(np.pad(ids, (0, batch_size - len(ids)), mode="edge"), length)
      blocks[ids] = self._run(inputs)[: len(ids)]
    self.searcher = ExactSearcher(blocks, mesh)

  def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with jax.set_mesh(self.mesh):
      return np.asarray(self._embed(self.params, partitioning.shard_batch(inputs, self.mesh)))

  def search(self, questions: list[str], k: int) -> np.ndarray:
    out = []
    data_size = self.mesh.shape["data"]
    for first in range(0, len(questions), 64):
      chunk = questions[first : first + 64]
      padded = chunk + [chunk[-1]] * (-len(chunk) % data_size)
      ids, _ = self.searcher.search(self._run(self.featurizer.queries(padded)), k)
      out.append(ids[: len(chunk)])
    return np.concatenate(out)
