"""Documents -> retrieval blocks (`BlockPacker`), the packing half of `realm_jax.data.blocks`.

A block is `[CLS] title [SEP] body [SEP]` with at most `max_block_len` (288) word pieces.  Sentences of a document
are packed greedily; a sentence longer than the body budget is cut at word-piece boundaries.  Entity spans are
mapped to the word pieces that lie fully inside them (REALM's rule, `DocumentSpans`: linear in the document's
length); spans that cross a block boundary or cover no word piece are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from realm_jax.data.corpus import CorpusError, Document
from realm_jax.data.tokenization import Tokenizer

TOKENIZER_BATCH = 64  # documents tokenized per batch call

# Sentence ends: . ! ? (plus closing quotes/brackets) followed by space and an upper-case/digit/quote start.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")


# Dates for salient-span masking (REALM's NER spans + "a regular expression to identify dates").
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
DATE_PATTERN = re.compile(
    rf"\b(?:{_MONTH}\s+\d{{1,2}},?\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}}|{_MONTH}\s+\d{{4}}"
    rf"|(?:1[0-9]|20)\d{{2}}s?)\b"
)
DATE_REGEX_LABEL = "DATE_REGEX"


def date_spans(text: str) -> tuple[tuple[int, int, str], ...]:
  """Character spans of dates: "May 18, 2018", "13 August 1949", "October 2014", "1901", "1990s"."""
  return tuple((m.start(), m.end(), DATE_REGEX_LABEL) for m in DATE_PATTERN.finditer(text))


def split_sentences(text: str) -> list[tuple[int, int]]:
  """Character spans of sentences (heuristic splitter; whitespace between sentences is dropped)."""
  spans, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    spans.append((start, m.start() + len(m.group(0).rstrip())))
    start = m.end()
  spans.append((start, len(text)))
  return [(s, e) for s, e in spans if text[s:e].strip()]


def block_uid(title: str, body: str) -> bytes:
  """SHA1 of "title <sep> body", as the released REALM code identifies documents."""
  return hashlib.sha1(f"{title} <sep> {body}".encode()).digest()


@dataclasses.dataclass
class Block:
  doc_id: str
  title: str
  text: str  # body text (the characters the body word pieces come from)
  title_ids: np.ndarray
  body_ids: np.ndarray
  sentence_starts: np.ndarray  # body-relative token index of each sentence start
  spans: np.ndarray  # [S, 3] body-relative (start, end, label id)

  @property
  def uid(self) -> bytes:
    return block_uid(self.title, self.text)


class BlockPacker:
  """Packs documents into blocks of <= max_block_len word pieces.

  A document without word pieces (empty or whitespace-only text, ...) is a `CorpusError`, or, with
  `skip_empty_documents`, skipped and counted in `stats["documents_skipped_empty"]`.
  """

  def __init__(self, tokenizer: Tokenizer, max_block_len: int = 288, max_title_len: int = 64,
               find_dates: bool = True, skip_empty_documents: bool = False):
    if max_block_len < max_title_len + 3 + 8:
      raise ValueError(f"max_block_len={max_block_len} is too short for {max_title_len}-token titles")
    self.tokenizer = tokenizer
    self.max_block_len = max_block_len
    self.max_title_len = max_title_len
    self.find_dates = find_dates
    self.skip_empty_documents = skip_empty_documents
    self.labels: dict[str, int] = {}
    self.stats: Counter = Counter()

  def label_id(self, label: str) -> int:
    return self.labels.setdefault(label, len(self.labels))

  def pack_batch(self, docs: Sequence[Document]) -> list[list[Block]]:
    """`pack` of each document, their texts and titles tokenized in one batch each (the tokenizer's batch call)."""
    texts = self.tokenizer.encode_batch([doc.text for doc in docs])
    titles = self.tokenizer.encode_batch([doc.title for doc in docs])
    return [self.pack(doc, (*text, title[0])) for doc, text, title in zip(docs, texts, titles, strict=True)]

  def pack(self, doc: Document, encoded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[Block]:
    """Greedy packing of one document's sentences (no blocks for a skipped empty document); `encoded`: its
    (ids, offsets, title ids) if already tokenized."""
    ids, offsets, title_ids = encoded or (*self.tokenizer.encode(doc.text), self.tokenizer.encode(doc.title)[0])
    if not len(ids):
      if self.skip_empty_documents:
        self.stats["documents_skipped_empty"] += 1
        return []
      where = f"{doc.source}: " if doc.source else ""
      raise CorpusError(f"{where}field 'text': document {doc.doc_id!r} is empty (has no word pieces); pass "
                        "--skip_empty_documents to skip and count such documents")
    if len(title_ids) > self.max_title_len:
      self.stats["titles_truncated"] += 1
      title_ids = title_ids[: self.max_title_len]
    budget = self.max_block_len - 3 - len(title_ids)
    # Token ranges of sentences (a token belongs to the sentence holding its first character).
    sentence_bounds = split_sentences(doc.text)
    ends = np.asarray([e for _, e in sentence_bounds])
    sentence_of_token = np.minimum(np.searchsorted(ends, offsets[:, 0], side="right"), len(ends) - 1)
    pieces = self._sentence_pieces(sentence_of_token, budget)
    groups, current = [], []
    for start, end in pieces:
      if current and end - current[0][0] > budget:
        groups.append(current)
        current = []
      current.append((start, end))
    groups.append(current)
    in_order = bool((np.diff(offsets[:, 0]) >= 0).all() and (np.diff(offsets[:, 1]) >= 0).all())
    doc_spans = DocumentSpans(offsets, doc.spans, in_order)
    return [self._make_block(doc, title_ids, ids, offsets, g, doc_spans, in_order) for g in groups]

  def _sentence_pieces(self, sentence_of_token: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """(token_start, token_end) of each sentence (its first to its last token), long ones cut to the budget."""
    pieces = []
    _, first_token = np.unique(sentence_of_token, return_index=True)
    last_token = len(sentence_of_token) - 1 - np.unique(sentence_of_token[::-1], return_index=True)[1]
    for first, last in zip(first_token.tolist(), last_token.tolist(), strict=True):
      for start in range(first, last + 1, budget):
        pieces.append((start, min(start + budget, last + 1)))
        if start > first:
          self.stats["sentences_cut"] += 1
    return pieces

  def _make_block(self, doc, title_ids, ids, offsets, sentences, doc_spans: DocumentSpans, in_order: bool) -> Block:
    first, last = sentences[0][0], sentences[-1][1]
    char_start, char_end = int(offsets[first, 0]), int(offsets[last - 1, 1])
    extra = date_spans(doc.text[char_start:char_end]) if self.find_dates else ()
    dates = DocumentSpans(offsets, [(s + char_start, e + char_start, label) for s, e, label in extra], in_order)
    spans, seen = [], set()
    for candidates in (doc_spans, dates):
      self.stats["spans_without_tokens"] += candidates.without_tokens
      inside, crossing = candidates.in_tokens(first, last)
      self.stats["spans_crossing_blocks"] += crossing
      for i in inside:
        start, end, label = candidates.first[i], candidates.last[i], candidates.labels[i]
        if (start, end) not in seen or label != DATE_REGEX_LABEL:
          seen.add((start, end))
          spans.append((start - first, end + 1 - first, self.label_id(label)))
    self.stats["spans_kept"] += len(spans)
    return Block(
        doc_id=doc.doc_id,
        title=doc.title,
        text=doc.text[char_start:char_end],
        title_ids=title_ids,
        body_ids=ids[first:last],
        sentence_starts=np.asarray([s - first for s, _ in sentences], np.int32),
        spans=np.asarray(spans, np.int32).reshape(-1, 3),
    )


class DocumentSpans:
  """A document's character spans as word-piece ranges, found once per document: span i covers the word pieces
  `first[i]..last[i]` (inclusive) wholly inside its characters; `without_tokens` spans hold none.

  With word-piece offsets in order (the tokenizer's), those pieces are one run, found by two binary searches,
  and `in_tokens` answers per block in O(log spans + its spans): building is linear in the document's length.
  Offsets out of order (`in_order` False) fall back to testing every piece (same answers)."""

  def __init__(self, offsets: np.ndarray, spans: Sequence[tuple[int, int, str]], in_order: bool):
    chars = np.asarray([(s, e) for s, e, _ in spans], np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    if in_order:
      first = np.searchsorted(starts, chars[:, 0], side="left")
      last = np.searchsorted(ends, chars[:, 1], side="right") - 1
    else:
      inside = [np.flatnonzero((starts >= s) & (ends <= e)) for s, e in chars]
      first = np.asarray([i[0] if len(i) else 1 for i in inside], np.int64)
      last = np.asarray([i[-1] if len(i) else 0 for i in inside], np.int64)
    has_tokens = first <= last
    self.without_tokens = int(np.count_nonzero(~has_tokens))
    self.first, self.last = first.tolist(), last.tolist()
    self.labels = [label for _, _, label in spans]
    self.order = np.flatnonzero(has_tokens)[np.argsort(first[has_tokens], kind="stable")]  # spans by first piece
    self.sorted_first, self.sorted_last = first[self.order], np.sort(last[has_tokens])

  def in_tokens(self, begin: int, end: int) -> tuple[list[int], int]:
    """(indices, in span order, of the spans wholly inside pieces [begin, end); how many others overlap them)."""
    lo, hi = np.searchsorted(self.sorted_first, [begin, end], side="left").tolist()
    starting_here = self.order[lo:hi]
    ends_inside = np.asarray([self.last[i] < end for i in starting_here.tolist()], bool)
    from_before = lo - int(np.searchsorted(self.sorted_last, begin, side="left"))  # start before, reach begin
    crossing = int(np.count_nonzero(~ends_inside)) + from_before
    return sorted(starting_here[ends_inside].tolist()), crossing
