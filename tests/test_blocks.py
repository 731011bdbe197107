"""Block builder and block store: packing limits, span mapping, identities, errors that name the input."""

import json

import numpy as np
import pytest
from conftest import DEMO_ENTITIES, DEMO_PASSAGES, SHARED_CORPUS

from realm_jax.data.blocks import (
  DATE_REGEX_LABEL,
  BlockPacker,
  BlockStore,
  BlockStoreError,
  block_uid,
  build_block_store,
  split_sentences,
)
from realm_jax.data.corpus import CorpusError, Document, fingerprint_files, read_documents


def test_every_block_fits_cls_title_sep_body_sep(demo_store):
  n = len(demo_store)
  lengths = np.diff(demo_store.arrays["title_offsets"]) + np.diff(demo_store.arrays["body_offsets"]) + 3
  assert lengths.max() <= 288
  assert np.diff(demo_store.arrays["body_offsets"]).min() > 0
  assert n >= 4000  # every demo passage is at least one block
  inputs = demo_store.retriever_inputs(range(n))
  assert np.all(inputs["input_ids"][:, 0] == 101)
  assert np.all(inputs["input_mask"].sum(1) == lengths)


def test_blocks_keep_document_text_and_sha1_identity(demo_store):
  first = json.loads(DEMO_PASSAGES.open(encoding="utf-8").readline())
  meta = demo_store.text(0)
  assert meta["doc_id"] == first["id"] and meta["title"] == first["title"]
  assert meta["text"] == first["text"].strip()
  assert demo_store.uid(0) == block_uid(first["title"], meta["text"])
  assert meta["uid"] == demo_store.uid(0).hex()
  by_uid = {}
  for i in range(len(demo_store)):
    t = demo_store.text(i)
    by_uid.setdefault(demo_store.uid(i), set()).add((t["title"], t["text"]))
  assert all(len(contents) == 1 for contents in by_uid.values())  # equal uid <=> equal title and body


def test_entity_spans_cover_exactly_the_entity_word_pieces(demo_store, wordpiece):
  docs = {d.doc_id: d for d in read_documents(DEMO_PASSAGES, DEMO_ENTITIES)}
  labels = {v: k for k, v in demo_store.manifest["span_labels"].items()}
  checked = 0
  for i in range(200):
    meta = demo_store.text(i)
    body = demo_store.body_ids(i)
    entity_texts = {(meta["text"].find(docs[meta["doc_id"]].text[s:e]) >= 0, lab)
                    for s, e, lab in docs[meta["doc_id"]].spans}
    for start, end, label in demo_store.spans(i):
      assert 0 <= start < end <= len(body)
      if labels[label] != DATE_REGEX_LABEL:
        assert (True, labels[label]) in entity_texts
      checked += 1
  assert checked > 1000


def test_span_of_a_known_entity_maps_to_its_word_pieces(wordpiece):
  text = "The prize went to Wilhelm Conrad Röntgen in 1901. He was German."
  start = text.index("Wilhelm")
  doc = Document("d", "Nobel", text, ((start, start + len("Wilhelm Conrad Röntgen"), "PERSON"),
                                       (text.index("1901"), text.index("1901") + 4, "DATE")))
  (block,) = BlockPacker(wordpiece).pack(doc)
  spans = block.spans.tolist()
  assert [wordpiece.decode(block.body_ids[s:e]) for s, e, _ in spans] == ["wilhelm conrad rontgen", "1901"]
  assert block.sentence_starts.tolist() == [0, len(wordpiece.encode("The prize went to Wilhelm Conrad "
                                                                      "Röntgen in 1901.")[0])]


def test_long_documents_are_packed_greedily_by_sentence(wordpiece):
  sentence = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
  doc = Document("long", "Greek letters", " ".join([sentence] * 40))
  packer = BlockPacker(wordpiece, max_block_len=64, max_title_len=8)
  blocks = packer.pack(doc)
  per_sentence = len(wordpiece.encode(sentence)[0])
  title = len(wordpiece.encode("Greek letters")[0])
  fit = (64 - 3 - title) // per_sentence
  assert [len(b.sentence_starts) for b in blocks[:-1]] == [fit] * (len(blocks) - 1)
  assert sum(len(b.body_ids) for b in blocks) == 40 * per_sentence
  assert all(len(b.body_ids) + len(b.title_ids) + 3 <= 64 for b in blocks)
  assert blocks[1].text.startswith("Alpha")


def test_a_sentence_longer_than_a_block_is_cut(wordpiece):
  doc = Document("run-on", "T", " ".join(["word"] * 500))
  packer = BlockPacker(wordpiece, max_block_len=128, max_title_len=8)
  blocks = packer.pack(doc)
  assert [len(b.body_ids) for b in blocks] == [124, 124, 124, 124, 4]
  assert packer.stats["sentences_cut"] == 4


def test_sentence_splitter():
  text = 'He left in 1901. "Why?" she asked (twice). Then U.S. troops arrived! 3 died.'
  parts = [text[s:e] for s, e in split_sentences(text)]
  assert parts == ["He left in 1901.", '"Why?" she asked (twice).', "Then U.S. troops arrived!", "3 died."]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "title": "T"', "bad.jsonl:2: not valid JSON"),
        ('{"id": "a", "title": "T"}', "bad.jsonl:2: missing field 'text'"),
        ('{"id": "a", "title": "T", "text": 5}', "bad.jsonl:2: field 'text' must be str"),
        ('{"id": "a", "title": "T", "text": "   "}', "bad.jsonl:2: field 'text': empty document"),
        ('{"id": "p0", "title": "T", "text": "x"}', "bad.jsonl:2: field 'id': duplicate"),
    ],
)
def test_malformed_passage_lines_are_named(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"id": "p0", "title": "T", "text": "fine"}\n' + line + "\n")
  with pytest.raises(CorpusError, match=message):
    list(read_documents(path))


def test_entity_lines_must_match_their_passages(tmp_path):
  passages = tmp_path / "p.jsonl"
  passages.write_text('{"id": "p0", "title": "T", "text": "Paris is big."}\n')
  entities = tmp_path / "e.jsonl"
  entities.write_text('{"id": "p0", "ents": [[0, 50, "GPE"]]}\n')
  with pytest.raises(CorpusError, match=r"e.jsonl:1: ents\[0\] = \[0, 50, 'GPE'\] is outside"):
    list(read_documents(passages, entities))
  entities.write_text('{"id": "p9", "ents": []}\n')
  with pytest.raises(CorpusError, match="e.jsonl:1: field 'id': 'p9' does not match passage 'p0'"):
    list(read_documents(passages, entities))
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    list(read_documents(tmp_path / "missing.jsonl"))


def test_truncated_or_unfinished_stores_are_refused(demo_store, tmp_path):
  import shutil

  copy = tmp_path / "copy"
  shutil.copytree(demo_store.path, copy)
  with (copy / "body_ids.bin").open("r+b") as f:
    f.truncate(100)
  with pytest.raises(BlockStoreError, match=r"body_ids.bin: expected \d+ bytes .* found 100 bytes"):
    BlockStore(copy)
  (copy / "manifest.json").unlink()
  with pytest.raises(BlockStoreError, match="no manifest.json"):
    BlockStore(copy)


def test_tfds_builder_yields_the_same_documents_as_jsonl(tmp_path):
  from realm_jax.data.tfds_corpus import RealmCorpus, read_tfds_documents

  builder = RealmCorpus(data_dir=str(tmp_path), passages=DEMO_PASSAGES, entities=DEMO_ENTITIES)
  builder.download_and_prepare(file_format="array_record")
  via_tfds = [(d.doc_id, d.title, d.text, d.spans) for d in read_tfds_documents(builder)]
  via_jsonl = [(d.doc_id, d.title, d.text, d.spans) for d in read_documents(DEMO_PASSAGES, DEMO_ENTITIES)]
  assert via_tfds == via_jsonl


@pytest.mark.skipif(not SHARED_CORPUS.exists(), reason="../shared/data/realm_small_corpus not present")
def test_full_small_corpus_builds(tmp_path, wordpiece):
  passages = SHARED_CORPUS / "passages.jsonl"
  entities = SHARED_CORPUS / "entities_spacy_en_core_web_sm_3.8.0.jsonl"
  manifest = build_block_store(
      read_documents(passages, entities), tmp_path / "blocks", wordpiece,
      fingerprint_files(passages, entities), total=31395,
  )
  assert manifest["stats"]["documents"] == 31395
  assert manifest["num_blocks"] >= 31395
  assert manifest["stats"]["spans_kept"] > 0.99 * 277866
