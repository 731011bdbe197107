"""Packing documents into blocks: the linear span matching gives exactly the blocks of the per-span packer."""

import itertools

import numpy as np
from conftest import DEMO_ENTITIES, DEMO_PASSAGES
from reference_blocks import ReferencePacker

from realm_jax.data.corpus import Document, read_documents
from realm_jax.data.packing import BlockPacker, DocumentSpans


def _long_documents(documents, per_document):
  """Documents made of `per_document` consecutive ones, their spans moved along: long articles (many blocks)."""
  for i in range(0, len(documents) - per_document + 1, per_document):
    parts, text, spans = documents[i : i + per_document], "", []
    for part in parts:
      spans += [(s + len(text), e + len(text), label) for s, e, label in part.spans]
      text += part.text + " "
    yield Document(f"long{i}", parts[0].title, text, tuple(spans))


def test_the_linear_span_matching_packs_exactly_the_blocks_of_the_per_span_packer(wordpiece):


  documents = list(itertools.islice(read_documents(DEMO_PASSAGES, DEMO_ENTITIES), 600))
  inputs = documents[:300] + list(_long_documents(documents[300:], 30))  # 300 passages, 10 articles of 30
  new, old = BlockPacker(wordpiece), ReferencePacker(wordpiece)
  for doc in inputs:
    got, want = new.pack(doc), old.pack(doc)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
      for field in ("doc_id", "title", "text"):
        assert getattr(a, field) == getattr(b, field)
      for field in ("title_ids", "body_ids", "sentence_starts", "spans"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert new.stats == old.stats and new.labels == old.labels
  assert new.stats["spans_crossing_blocks"] > 0 and new.stats["spans_kept"] > 1000 and new.stats["sentences_cut"] >= 0


def test_span_ranges_of_pieces_out_of_order_are_found_by_testing_every_piece():
  offsets = np.array([[0, 3], [4, 9], [10, 12], [13, 20], [21, 25]])
  spans = [(0, 9, "A"), (4, 12, "B"), (5, 8, "C"), (13, 25, "D"), (0, 25, "E")]
  fast = DocumentSpans(offsets, spans, in_order=True)
  slow = DocumentSpans(offsets, spans, in_order=False)
  holding = [0, 1, 3, 4]  # "C" holds no whole piece
  assert [fast.first[i] for i in holding] == [slow.first[i] for i in holding] == [0, 1, 3, 0]
  assert [fast.last[i] for i in holding] == [slow.last[i] for i in holding] == [1, 2, 4, 4]
  assert fast.without_tokens == slow.without_tokens == 1
  assert fast.in_tokens(1, 3) == slow.in_tokens(1, 3) == ([1], 2)  # B inside; A and E overlap, D starts at 3
  shuffled = DocumentSpans(offsets[[1, 0, 2, 3, 4]], spans, in_order=False)
  assert shuffled.first[0] == 0 and shuffled.last[0] == 1  # the pieces holding 0:9 are rows 0 and 1, either order
