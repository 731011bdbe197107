"""Block builder and block store: packing limits, span mapping, identities, errors that name the input."""

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_ENTITIES, DEMO_PASSAGES, REPO, SHARED_CORPUS, subprocess_env
from etils import epath
from gcs import local_gs_entries

from realm_jax import storage
from realm_jax.data.blocks import (
  DATE_REGEX_LABEL,
  MANIFEST,
  BlockPacker,
  BlockStore,
  BlockStoreError,
  block_uid,
  build_block_store,
  split_sentences,
)
from realm_jax.data.corpus import CorpusError, Document, fingerprint_files, read_documents
from realm_jax.data.staging import STAMP, stage_block_store, upload_block_store


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


# Block stores on pods: a manifest `files` table, gs:// uploads (manifest last), verified local staging.

SLICE_LINES = 200  # passages (and their entity lines) of the demo corpus in the gs:// tests


def _build_blocks(passages, entities, out) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "launch/build_blocks.py", f"--passages={passages}", f"--entities={entities}", f"--out={out}"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def _stage_command(source, dest) -> list[str]:
  return [sys.executable, "launch/stage_blocks.py", f"--source={source}", f"--dest={dest}"]


def _copy_objects(source: str, dest: str, skip: tuple[str, ...] = ()) -> None:
  for path in epath.Path(source).iterdir():
    if path.name not in skip:
      (epath.Path(dest) / path.name).write_bytes(path.read_bytes())


def _stats(directory) -> dict[str, tuple[int, int]]:
  return {name: (os.stat(directory / name).st_ino, os.stat(directory / name).st_mtime_ns)
          for name in os.listdir(directory)}


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory):
  """The first SLICE_LINES passages of the demo corpus and their entity lines."""
  root = tmp_path_factory.mktemp("demo_slice")
  for source in (DEMO_PASSAGES, DEMO_ENTITIES):
    with source.open(encoding="utf-8") as f:
      (root / source.name).write_text("".join(itertools.islice(f, SLICE_LINES)), encoding="utf-8")
  return root / DEMO_PASSAGES.name, root / DEMO_ENTITIES.name


@pytest.fixture(scope="module")
def local_slice_store(demo_slice, wordpiece, tmp_path_factory):
  passages, entities = demo_slice
  out = tmp_path_factory.mktemp("local_slice") / "blocks"
  build_block_store(read_documents(passages, entities), out, wordpiece, fingerprint_files(passages, entities))
  return out


@pytest.fixture(scope="module")
def gs_slice_store(gcs_server, demo_slice) -> str:
  """`gs://.../blocks` built and uploaded by launch/build_blocks.py; tests that change objects work on copies."""
  out = f"{gcs_server.create_bucket('slice-store')}/blocks"
  result = _build_blocks(*demo_slice, out)
  assert result.returncode == 0, result.stderr
  assert not local_gs_entries(REPO, Path.cwd())
  return out


def test_manifest_files_table_holds_size_and_sha256_of_every_file(demo_store):
  files = {name: (demo_store.path / name).read_bytes() for name in os.listdir(demo_store.path) if name != MANIFEST}
  assert demo_store.manifest["files"] == {
      name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
  assert len(files) == len(demo_store.manifest["arrays"]) + 1  # every .bin and texts.jsonl


def test_a_gs_block_store_is_refused_with_the_staging_command():
  command = "python launch/stage_blocks.py --source=gs://bucket/blocks --dest=/local/dir"
  with pytest.raises(storage.StorageError, match=rf"^gs://bucket/blocks: .*{re.escape(command)}, then point "
                                                 "BLOCK_STORE at /local/dir"):
    BlockStore("gs://bucket/blocks")


def test_a_store_built_to_gs_and_staged_equals_a_local_build(gs_slice_store, local_slice_store, tmp_path):
  dest = tmp_path / "staged"
  result = subprocess.run(_stage_command(gs_slice_store, dest), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(dest)
  staged, local = (json.loads((d / MANIFEST).read_text()) for d in (dest, local_slice_store))
  assert {k: v for k, v in staged.items() if k != "created"} == {k: v for k, v in local.items() if k != "created"}
  assert sorted(os.listdir(dest)) == sorted([*staged["files"], MANIFEST, STAMP])
  assert all((dest / name).read_bytes() == (local_slice_store / name).read_bytes() for name in staged["files"])
  assert len(BlockStore(dest)) == staged["num_blocks"]


def test_a_remote_store_without_its_manifest_is_refused(gs_slice_store, gcs_bucket, tmp_path):
  _copy_objects(gs_slice_store, f"{gcs_bucket}/blocks", skip=(MANIFEST,))
  with pytest.raises(BlockStoreError, match=rf"{gcs_bucket}/blocks: no manifest.json, so not a finished block store"):
    stage_block_store(f"{gcs_bucket}/blocks", tmp_path / "staged")
  assert os.listdir(tmp_path) == []


def test_a_corrupted_remote_file_fails_staging_naming_it_and_stages_nothing(gs_slice_store, gcs_bucket, tmp_path):
  _copy_objects(gs_slice_store, f"{gcs_bucket}/blocks")
  body = epath.Path(f"{gcs_bucket}/blocks/body_ids.bin")
  body.write_bytes(bytes(b ^ 0xFF for b in body.read_bytes()))  # same size, other bytes
  with pytest.raises(BlockStoreError, match=rf"{gcs_bucket}/blocks/body_ids.bin: sha256 \w+, the manifest says"):
    stage_block_store(f"{gcs_bucket}/blocks", tmp_path / "staged")
  assert os.listdir(tmp_path) == []  # neither the destination nor a temporary copy


def test_two_concurrent_stagings_into_one_dest_both_succeed(demo_store, gcs_bucket, tmp_path):
  source = upload_block_store(demo_store.path, f"{gcs_bucket}/blocks")  # some MB: the two copies overlap
  dest = tmp_path / "staged"
  processes = [subprocess.Popen(_stage_command(source, dest), cwd=REPO, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
  assert [out.strip() for out, _ in outputs] == [str(dest)] * 2
  assert os.listdir(tmp_path) == ["staged"]  # the loser removed its own temporary copy
  assert stage_block_store(source, dest) == dest and len(BlockStore(dest)) == len(demo_store)


def test_restaging_a_staged_store_is_a_no_op(gs_slice_store, gcs_bucket, tmp_path):
  source, dest = f"{gcs_bucket}/blocks", tmp_path / "staged"
  _copy_objects(gs_slice_store, source)
  stage_block_store(source, dest)
  before = _stats(dest)
  for path in epath.Path(source).iterdir():  # only the manifest stays: nothing can be copied again
    if path.name != MANIFEST:
      path.unlink()
  assert stage_block_store(source, dest) == dest
  assert _stats(dest) == before  # no file copied, and the sha256 stamp not rewritten (nothing re-hashed)


def test_a_dest_holding_something_else_is_refused_and_left_alone(gs_slice_store, local_slice_store, tmp_path):
  folder = tmp_path / "notes"
  folder.mkdir()
  (folder / "keep.txt").write_text("mine")
  with pytest.raises(BlockStoreError, match=rf"{folder}: exists and is not a block store .* never deletes"):
    stage_block_store(gs_slice_store, folder)
  assert os.listdir(folder) == ["keep.txt"]
  other = tmp_path / "other"
  shutil.copytree(local_slice_store, other)  # the same blocks, another build: its manifest differs
  manifest = json.loads((other / "manifest.json").read_text())
  (other / "manifest.json").write_text(json.dumps({**manifest, "created": "2000-01-01T00:00:00Z"}))
  before = _stats(other)
  with pytest.raises(BlockStoreError, match=rf"{other}: holds another block store than {gs_slice_store}"):
    stage_block_store(gs_slice_store, other)
  assert _stats(other) == before
  staged = stage_block_store(gs_slice_store, tmp_path / "staged")
  with open(staged / "texts.jsonl", "r+b") as f:
    f.truncate(10)
  with pytest.raises(BlockStoreError, match=rf"{staged}/texts.jsonl: 10 bytes, the manifest says \d+"):
    stage_block_store(gs_slice_store, staged)
  assert os.path.getsize(staged / "texts.jsonl") == 10


def test_a_store_without_a_files_table_opens_but_cannot_be_staged(local_slice_store, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(local_slice_store, old)
  manifest = json.loads((old / MANIFEST).read_text())
  del manifest["files"]
  (old / MANIFEST).write_text(json.dumps(manifest))
  assert len(BlockStore(old)) == manifest["num_blocks"]
  with pytest.raises(BlockStoreError, match="no 'files' table .* rebuild it with launch/build_blocks.py"):
    stage_block_store(old, tmp_path / "staged")
  assert sorted(os.listdir(tmp_path)) == ["old"]


def test_building_into_a_non_empty_gs_prefix_is_refused_and_overwrites_nothing(gcs_bucket, demo_slice):
  existing = epath.Path(f"{gcs_bucket}/blocks/{MANIFEST}")
  existing.write_bytes(b"not built by this run")
  result = _build_blocks(*demo_slice, f"{gcs_bucket}/blocks")
  assert result.returncode != 0
  assert f"{gcs_bucket}/blocks: already exists" in result.stderr
  assert [p.name for p in existing.parent.iterdir()] == [MANIFEST]
  assert existing.read_bytes() == b"not built by this run"
