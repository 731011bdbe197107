"""The per-span block packer that `realm_jax.data.packing.BlockPacker` replaced (every span of a document tested
against every word piece, for every block: cubic in the document's length): the reference its tests compare
against exactly."""

from __future__ import annotations

import numpy as np

from realm_jax.data.packing import DATE_REGEX_LABEL, Block, BlockPacker, date_spans


class ReferencePacker(BlockPacker):
  """`BlockPacker` with the previous sentence pieces (a scan of every token per sentence) and blocks (every span
  tested against every word piece)."""

  def _sentence_pieces(self, sentence_of_token, budget):
    pieces = []
    for s in np.unique(sentence_of_token):
      tokens = np.flatnonzero(sentence_of_token == s)
      for start in range(tokens[0], tokens[-1] + 1, budget):
        pieces.append((start, min(start + budget, tokens[-1] + 1)))
        if start > tokens[0]:
          self.stats["sentences_cut"] += 1
    return pieces

  def _make_block(self, doc, title_ids, ids, offsets, sentences, doc_spans, in_order) -> Block:
    return self._reference_block(doc, title_ids, ids, offsets, sentences)

  def _reference_block(self, doc, title_ids, ids, offsets, sentences) -> Block:
    first, last = sentences[0][0], sentences[-1][1]
    char_start, char_end = int(offsets[first, 0]), int(offsets[last - 1, 1])
    spans, seen = [], set()
    extra = date_spans(doc.text[char_start:char_end]) if self.find_dates else ()
    candidates = list(doc.spans) + [(s + char_start, e + char_start, label) for s, e, label in extra]
    for cs, ce, label in candidates:
      inside = np.flatnonzero((offsets[:, 0] >= cs) & (offsets[:, 1] <= ce))
      if not len(inside):
        self.stats["spans_without_tokens"] += 1
      elif inside[0] < first or inside[-1] >= last:
        if inside[-1] >= first and inside[0] < last:
          self.stats["spans_crossing_blocks"] += 1
      elif (inside[0], inside[-1]) not in seen or label != DATE_REGEX_LABEL:
        seen.add((inside[0], inside[-1]))
        spans.append((inside[0] - first, inside[-1] + 1 - first, self.label_id(label)))
    self.stats["spans_kept"] += len(spans)
    return Block(doc_id=doc.doc_id, title=doc.title, text=doc.text[char_start:char_end], title_ids=title_ids,
                 body_ids=ids[first:last], sentence_starts=np.asarray([s - first for s, _ in sentences], np.int32),
                 spans=np.asarray(spans, np.int32).reshape(-1, 3))
