"""Open-QA fine-tuning features (ORQA code path, REALM_REFERENCE §9).

Per question: `[CLS] question [SEP]` for the query tower; the top `retrieve_k` blocks of the frozen index
with their (constant) embeddings and `retriever_correct` = raw substring `HasAnswer` on the block text (the
store's `block_text` bytes: a UTF-8 substring test, no texts.jsonl parsing per block and step);
the top `reader_k` blocks as reader inputs `[CLS] question [SEP] body [SEP]` (no title, as the released
blocks) with a block mask and `span_correct` over the reader's static span grid (gold spans by
word-piece match of the tokenised answers; for CuratedTrec regexes, of the strings the regex matches).

Questions are never cut (ORQA tokenizes them whole).  A query is padded to a length bucket: `query_len` times
the smallest power of two that holds `[CLS] question [SEP]`, at most the query tower's position embeddings
(`max_query_len`); a longer question is refused, naming its file:line.  Fine-tuning pads every question to the
bucket of its longest training question (one compiled step, the same shape on every process); prediction pads
each batch to the bucket of its longest question (a few compiled shapes at most: 64, 128, 256, 512).  Buckets
rather than one length of 512 keep the query tower's cost that of the real questions (NQ's all fit in 64).

Answer text (`answer_text`) of a predicted span, three ways:
- "text": the block's original characters from the span's first word piece to its last.
- "orqa": the released code's (`orqa_model.get_predictions`): the original-case words (BERT basic tokens:
  whitespace and punctuation split) the span touches, joined by one space, then projected back onto the span
  as `squad_lib.get_final_text` does: the space-joined word pieces are looked up in the space-joined lowercased,
  accent-stripped words and, when found and aligned character for character, only the matching characters are
  kept; otherwise (a span holding a `##` piece, [UNK], a length-changing case fold) the whole words.
- "wordpieces": the span's word pieces joined by spaces with `##` continuations merged (lowercased, accents
  stripped: what Hugging Face's `RealmForOpenQA` answer decodes to, without its punctuation clean-up).
"""

from __future__ import annotations

import dataclasses
import unicodedata

import grain
import numpy as np

from realm_jax.data.blocks import BlockStore
from realm_jax.data.features import FEATURES, block_batches, pack, span_grid
from realm_jax.data.questions import Question
from realm_jax.data.tokenization import Tokenizer
from realm_jax.errors import InputError
from realm_jax.eval.answers import answer_strings_in, gold_spans

ANSWER_TEXTS = ("text", "orqa", "wordpieces")

@dataclasses.dataclass(frozen=True)
class OpenQaDataConfig:
  batch_size: int = 1  # ORQA: one question per step
  query_len: int = 64  # the first query length bucket (x2 up to the encoder's positions; questions are never cut)
  reader_len: int = 320  # 288 block + 32 question
  retrieve_k: int = 5000  # blocks in the retriever loss (ORQA/REALM); smaller corpora use less
  reader_k: int = 5  # blocks read
  max_span_width: int = 10
  seed: int = 0
  answer_text: str = "text"  # how a predicted span becomes the answer string: "text", "orqa" or "wordpieces"


class OpenQaFeaturizer:
  """Questions + retrieval results -> the model's numpy inputs; `max_query_len`: the query tower's
  `max_position_embeddings` (the longest query it can embed)."""

  def __init__(self, store: BlockStore, tokenizer: Tokenizer, config: OpenQaDataConfig, max_query_len: int = 512):
    store.check_tokenizer(tokenizer)
    if config.answer_text not in ANSWER_TEXTS:
      raise InputError(f"OpenQaDataConfig.answer_text={config.answer_text!r}: expected one of {ANSWER_TEXTS}")
    if config.answer_text != "text" and not hasattr(tokenizer, "lowercase"):
      raise InputError(f"OpenQaDataConfig.answer_text={config.answer_text!r} needs a WordPiece vocabulary "
                       f"(## continuations); this block store's tokenizer is {tokenizer.fingerprint}")
    if not 2 < config.query_len <= max_query_len:
      raise InputError(f"OpenQaDataConfig.query_len={config.query_len}: must be in (2, {max_query_len}], the query "
                       "tower's max_position_embeddings")
    self.store, self.tokenizer, self.config, self.max_query_len = store, tokenizer, config, max_query_len
    self.starts, self.ends = span_grid(config.reader_len, config.max_span_width)

  def query_length(self, num_ids: int) -> int:
    """The bucket of a query of `num_ids` ids ([CLS] and [SEP] included): query_len * 2^k, capped at max_query_len."""
    length = self.config.query_len
    while length < num_ids:
      length *= 2
    return min(length, self.max_query_len)

  def question_ids(self, question: str, where: str = "question") -> np.ndarray:
    """The question's word pieces, whole; InputError (naming `where`) when the query tower cannot take them."""
    ids, _ = self.tokenizer.encode(question)
    if len(ids) + 2 > self.max_query_len:
      raise InputError(f"{where}: field 'question': {len(ids)} word pieces + [CLS] [SEP] exceed the query tower's "
                       f"{self.max_query_len} positions (max_position_embeddings); questions are never cut")
    return ids

  def check_questions(self, questions: list[Question]) -> int:
    """The bucket of the longest of `questions` (InputError naming file:line for one the model cannot take)."""
    ids = self.tokenizer.encode_batch([q.question for q in questions])
    longest = max(range(len(questions)), key=lambda i: len(ids[i][0]))
    self.question_ids(questions[longest].question, questions[longest].source or "question")
    return self.query_length(len(ids[longest][0]) + 2)

  def query(self, question: str, length: int | None = None, where: str = "question") -> dict[str, np.ndarray]:
    """`[CLS] question [SEP]` padded to `length` (None: the question's own bucket)."""
    t = self.tokenizer
    ids = self.question_ids(question, where)
    length = length or self.query_length(len(ids) + 2)
    if len(ids) + 2 > length:
      raise InputError(f"{where}: field 'question': {len(ids)} word pieces + [CLS] [SEP] exceed the query length "
                       f"{length} of its batch")
    return pack([np.asarray([t.cls_id]), ids, np.asarray([t.sep_id])], length)

  def queries(self, questions: list[str]) -> dict[str, np.ndarray]:
    """A batch of queries padded to the bucket of its longest."""
    ids = [self.question_ids(q, f"question {i + 1} of the batch") for i, q in enumerate(questions)]
    length = self.query_length(max(len(i) for i in ids) + 2)
    t = self.tokenizer
    rows = [pack([np.asarray([t.cls_id]), i, np.asarray([t.sep_id])], length) for i in ids]
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
    """The answer string of reader positions [start, end] of `block_id`, as `config.answer_text` forms it (body
    offsets from re-tokenising the block's text; a block whose text no longer gives its ids: decoded ids)."""
    block_start = int(np.flatnonzero(question_ids == self.tokenizer.sep_id)[0]) + 1
    text = self.store.text_bytes(block_id).decode()
    ids, offsets = self.tokenizer.encode(text)
    body = self.store.body_ids(block_id)
    s, e = start - block_start, end - block_start
    if not (len(ids) >= len(body) and np.array_equal(ids[: len(body)], body) and 0 <= s <= e < len(body)):
      return self.tokenizer.decode(body[max(s, 0) : e + 1])
    if self.config.answer_text == "text":
      return text[offsets[s, 0] : offsets[e, 1]]
    pieces = [self.tokenizer.id_to_token(int(i)) for i in ids]
    if self.config.answer_text == "wordpieces":
      return join_wordpieces(pieces[s : e + 1])
    return orqa_answer(text, pieces, offsets, s, e, self.tokenizer.lowercase)


def join_wordpieces(pieces: list[str]) -> str:
  """Word pieces joined by spaces, each `##` continuation glued to the piece before it."""
  out = ""
  for piece in pieces:
    out += piece[2:] if piece.startswith("##") else (" " + piece if out else piece)
  return out


def _basic_normalized(word: str, lowercase: bool) -> str:
  """A word as BERT's basic tokenizer makes it: lowercased, NFD, combining marks dropped (uncased vocabularies)."""
  if not lowercase:
    return word
  return "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")


def orqa_answer(text: str, pieces: list[str], offsets: np.ndarray, start: int, end: int, lowercase: bool) -> str:
  """ORQA's answer string for word pieces [start, end] of `text` (`pieces[i]` spans `offsets[i]`): see the module
  docstring ("orqa")."""
  first, last = start, end
  while first > 0 and pieces[first].startswith("##"):
    first -= 1
  while last + 1 < len(pieces) and pieces[last + 1].startswith("##"):
    last += 1
  word_starts = [i for i in range(first, last + 1) if i == first or not pieces[i].startswith("##")]
  word_ends = [*(i - 1 for i in word_starts[1:]), last]
  words = [text[offsets[a, 0] : offsets[b, 1]] for a, b in zip(word_starts, word_ends, strict=True)]
  original = " ".join(words)
  normalized = " ".join(_basic_normalized(w, lowercase) for w in words)
  predicted = " ".join(pieces[start : end + 1])
  found = normalized.find(predicted)
  original_chars = [i for i, c in enumerate(original) if c != " "]
  normalized_chars = {i: k for k, i in enumerate(k for k, c in enumerate(normalized) if c != " ")}
  if found < 0 or len(original_chars) != len(normalized_chars):
    return original
  return original[original_chars[normalized_chars[found]] : original_chars[normalized_chars[found + len(predicted) - 1]]
                  + 1]


def question_dataset(questions: list[Question], featurizer: OpenQaFeaturizer, config: OpenQaDataConfig,
                     query_len: int) -> grain.MapDataset:
  """Infinite shuffled batches of question indices + query features padded to `query_len` (retrieval happens per
  step)."""
  def example(index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng
    q = questions[index]
    return {"question_index": np.int32(index),
            **{f"query_{k}": v for k, v in featurizer.query(q.question, query_len, q.source or "question").items()}}

  return block_batches(np.arange(len(questions)), example, config.batch_size, config.seed)
