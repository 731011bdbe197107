"""Open-QA fine-tuning features (ORQA code path, REALM_REFERENCE §9).

Per question: `[CLS] question [SEP]` for the query tower; the top `retrieve_k` blocks of the frozen index
with their (constant) embeddings and `retriever_correct` = raw substring `HasAnswer` on the block text (the
store's `block_text` bytes: a UTF-8 substring test, no texts.jsonl parsing per block and step);
the top `reader_k` blocks as reader inputs `[CLS] question [SEP] body [SEP]` (no title, as the released
blocks) with a block mask and `span_correct` over the reader's static span grid (gold spans by
word-piece match of the tokenised answers; for CuratedTrec regexes, of the strings the regex matches).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES, block_batches, pack, span_grid
from realm_jax.data.questions import Question
from realm_jax.data.tokenization import Tokenizer
from realm_jax.eval.answers import answer_strings_in, gold_spans


@dataclasses.dataclass(frozen=True)
class OpenQaDataConfig:
  batch_size: int = 1  # ORQA: one question per step
  query_len: int = 64  # questions are cut here (ORQA never cuts; 64 word pieces covers NQ/WQ/CT)
  reader_len: int = 320  # 288 block + 32 question
  retrieve_k: int = 5000  # blocks in the retriever loss (ORQA/REALM); smaller corpora use less
  reader_k: int = 5  # blocks read
  max_span_width: int = 10
  seed: int = 0


class OpenQaFeaturizer:
  """Questions + retrieval results -> the model's numpy inputs."""

  def __init__(self, store: BlockStore, tokenizer: Tokenizer, config: OpenQaDataConfig):
    store.check_tokenizer(tokenizer)
    self.store, self.tokenizer, self.config = store, tokenizer, config
    self.starts, self.ends = span_grid(config.reader_len, config.max_span_width)

  def query(self, question: str) -> dict[str, np.ndarray]:
    t = self.tokenizer
    ids, _ = t.encode(question)
    return pack([np.asarray([t.cls_id]), ids[: self.config.query_len - 2], np.asarray([t.sep_id])],
                self.config.query_len)

  def queries(self, questions: list[str]) -> dict[str, np.ndarray]:
    rows = [self.query(q) for q in questions]
    return {name: np.stack([r[name] for r in rows]) for name in FEATURES}

  def reader_inputs(self, question_ids: np.ndarray, block_ids: np.ndarray) -> dict[str, np.ndarray]:
    """[k, reader_len] inputs plus `block_mask` (1 on body tokens) and `block_start` (first body position)."""
    t, c = self.tokenizer, self.config
    question = question_ids[1 : int(np.flatnonzero(question_ids == t.sep_id)[0])]
    out = {name: np.zeros((len(block_ids), c.reader_len), np.int32) for name in (*FEATURES, "block_mask")}
    block_start = len(question) + 2
    for j, block_id in enumerate(block_ids):
      body = self.store.body_ids(int(block_id))[: max(0, c.reader_len - block_start - 1)]
      packed = pack([np.asarray([t.cls_id]), question, np.asarray([t.sep_id]), body, np.asarray([t.sep_id])],
                    c.reader_len, segment_break=3)
      for name in FEATURES:
        out[name][j] = packed[name]
      out["block_mask"][j, block_start : block_start + len(body)] = 1
    return out

  def answer_ids(self, question: Question, block_id: int) -> list[np.ndarray]:
    """The tokenised answers (for a regex: the strings it matches in the block's text)."""
    if question.is_regex:
      strings = answer_strings_in(self.store.text_bytes(block_id).decode(), question.answers, True)
    else:
      strings = question.answers
    return [ids for ids, _ in self.tokenizer.encode_batch(sorted(set(strings)))] if strings else []

  def span_correct(self, question: Question, reader: dict[str, np.ndarray], block_ids: np.ndarray) -> np.ndarray:
    """[k, num_spans] bool: the span equals a gold span of that block."""
    c = self.config
    out = np.zeros((len(block_ids), len(self.starts)), bool)
    for j, block_id in enumerate(block_ids):
      answers = self.answer_ids(question, int(block_id))
      for start, end in gold_spans(reader["input_ids"][j], reader["block_mask"][j], answers):
        if end - start < c.max_span_width:
          out[j, start * c.max_span_width + (end - start)] = True
    return out

  def retriever_correct(self, question: Question, block_ids: np.ndarray) -> np.ndarray:
    """[k] `has_answer` of each block: a plain answer's UTF-8 bytes in the block's (a substring of a UTF-8 text
    is one of its bytes, and only then); a regex runs on the decoded text."""
    if question.is_regex:
      return np.asarray([bool(answer_strings_in(self.store.text_bytes(int(i)).decode(), question.answers, True))
                         for i in block_ids])
    answers = [a.encode() for a in question.answers if a]
    return np.asarray([any(a in text for a in answers) for text in map(self.store.text_bytes, block_ids.tolist())])

  def training_features(
      self, questions: list[Question], query_ids: np.ndarray, retrieved: np.ndarray, embeddings: np.ndarray
  ) -> dict[str, np.ndarray]:
    """retrieved [B, retrieve_k] ids (best first) -> retriever and reader supervision for the step."""
    c = self.config
    readers = [self.reader_inputs(query_ids[b], retrieved[b, : c.reader_k]) for b in range(len(questions))]
    return {
        **{f"reader_{name}": np.stack([r[name] for r in readers]) for name in (*FEATURES, "block_mask")},
        "block_embeddings": embeddings[retrieved].astype(np.float32),
        "retriever_correct": np.stack([self.retriever_correct(q, retrieved[b]) for b, q in enumerate(questions)]),
        "span_correct": np.stack([self.span_correct(q, readers[b], retrieved[b, : c.reader_k])
                                  for b, q in enumerate(questions)]),
    }

  def answer_text(self, block_id: int, question_ids: np.ndarray, start: int, end: int) -> str:
    """Original-case text of reader positions [start, end] of `block_id` (body offsets from re-tokenising)."""
    block_start = int(np.flatnonzero(question_ids == self.tokenizer.sep_id)[0]) + 1
    text = self.store.text_bytes(block_id).decode()
    ids, offsets = self.tokenizer.encode(text)
    body = self.store.body_ids(block_id)
    s, e = start - block_start, end - block_start
    if len(ids) >= len(body) and np.array_equal(ids[: len(body)], body) and 0 <= s <= e < len(body):
      return text[offsets[s, 0] : offsets[e, 1]]
    return self.tokenizer.decode(body[max(s, 0) : e + 1])


def question_dataset(questions: list[Question], featurizer: OpenQaFeaturizer, config: OpenQaDataConfig
                     ) -> grain.MapDataset:
  """Infinite shuffled batches of question indices + query features (retrieval happens per step)."""
  def example(index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng
    return {"question_index": np.int32(index),
            **{f"query_{k}": v for k, v in featurizer.query(questions[index].question).items()}}

  return block_batches(np.arange(len(questions)), example, config.batch_size, config.seed)
