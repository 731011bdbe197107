"""Block builder and block store: packing limits, span mapping, identities, errors that name the input."""

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_ENTITIES, DEMO_PASSAGES, REPO, SHARED_CORPUS, subprocess_env
from etils import epath
from gcs import local_gs_entries
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax import storage
from realm_jax.data.blocks import (
  MANIFEST,
  BlockStore,
  BlockStoreError,
  build_block_store,
  check_block_store_destination,
)
from realm_jax.data.corpus import CorpusError, Document, fingerprint_files, read_documents
from realm_jax.data.packing import DATE_REGEX_LABEL, BlockPacker, block_uid, split_sentences
from realm_jax.data.staging import STAMP, stage_block_store, upload_block_store
from realm_jax.data.verify import verify_block_store
from realm_jax.errors import InputError


def test_every_block_fits_cls_title_sep_body_sep(demo_store):
  n = len(demo_store)
  lengths = np.diff(demo_store.arrays["title_offsets"]) + np.diff(demo_store.arrays["body_offsets"]) + 3
  assert lengths.max() <= 288
  assert np.diff(demo_store.arrays["body_offsets"]).min() > 0
  assert n >= 4000  # every demo passage is at least one block
  inputs = demo_store.retriever_inputs(range(n))
  assert np.all(inputs["input_ids"][:, 0] == 101)
  assert np.all(inputs["input_mask"].sum(1) == lengths)


def _retriever_inputs_one_by_one(store, ids, max_len):
  """`BlockStore.retriever_inputs` block by block: the specification the vectorised one must equal."""
  special = store.manifest["special_ids"]
  out = {k: np.zeros((len(ids), max_len), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
  for row, i in enumerate(ids):
    head = np.concatenate([[special["cls"]], store.title_ids(i), [special["sep"]]])
    tokens = np.concatenate([head, store.body_ids(i)[: max(0, max_len - len(head) - 1)], [special["sep"]]])[:max_len]
    out["input_ids"][row, : len(tokens)] = tokens
    out["input_mask"][row, : len(tokens)] = 1
    out["segment_ids"][row, len(head) : len(tokens)] = 1
  return out


@pytest.mark.parametrize("max_len", [1, 3, 6, 40, 128, 288])
def test_vectorised_retriever_inputs_equal_block_by_block_ones(demo_store, wordpiece, tmp_path, max_len):
  ids = np.random.default_rng(max_len).integers(0, len(demo_store), 700)  # repeats, any order
  got, want = demo_store.retriever_inputs(ids, max_len), _retriever_inputs_one_by_one(demo_store, ids, max_len)
  assert all(got[k].dtype == np.int32 and np.array_equal(got[k], want[k]) for k in want)
  build_block_store([Document("a", "", "one two three."), Document("b", "", "four.")], tmp_path / "untitled",
                    wordpiece, "test")
  untitled = BlockStore(tmp_path / "untitled")
  assert untitled.arrays["title_ids"].size == 0
  got = untitled.retriever_inputs(range(2), max_len)
  assert all(np.array_equal(got[k], v) for k, v in _retriever_inputs_one_by_one(untitled, [0, 1], max_len).items())


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
  with pytest.raises(BlockStoreError, match=r"body_ids.bin: 100 bytes, the manifest says \d+ bytes \(truncated"):
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


def _build_blocks(passages, entities, out, *flags: str) -> subprocess.CompletedProcess:
  """launch/build_blocks.py as a subprocess (no --entities when `entities` is None)."""
  entity_flags = [f"--entities={entities}"] if entities else []
  return subprocess.run(
      [sys.executable, "launch/build_blocks.py", f"--passages={passages}", *entity_flags, f"--out={out}", *flags],
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


def test_a_store_without_a_files_table_is_refused_on_open_and_by_staging(local_slice_store, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(local_slice_store, old)
  manifest = json.loads((old / MANIFEST).read_text())
  del manifest["files"]
  (old / MANIFEST).write_text(json.dumps(manifest))
  message = rf"^{old / MANIFEST}: no 'files' table .* built by an older realm-jax; rebuild it with launch/build_blocks"
  with pytest.raises(BlockStoreError, match=message):
    BlockStore(old)
  with pytest.raises(BlockStoreError, match=message):
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


# Bad input and data safety: what a build may replace, empty input, store checks on open, the full verify.

def _docs(*texts: str) -> list[Document]:
  return [Document(f"d{i}", f"Title {i}", text, source=f"mem:{i + 1}") for i, text in enumerate(texts)]


def _build(tokenizer, out, documents=None, **kwargs) -> dict:
  documents = _docs("Alpha is first. Beta follows.", "Gamma is third.") if documents is None else documents
  return build_block_store(documents, out, tokenizer, "f00", **kwargs)


def _tree(root: Path) -> dict[str, bytes]:
  """Every file under `root` (relative path -> bytes): what a refused build must leave as it was."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rewrite(store: Path, name: str, change) -> None:
  """Changes the store file `name` in place (`change(bytearray)`) and records its new size and sha256 in the manifest,
  so that the damage is in the content only."""
  data = bytearray((store / name).read_bytes())
  change(data)
  (store / name).write_bytes(bytes(data))
  manifest = json.loads((store / MANIFEST).read_text())
  manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  (store / MANIFEST).write_text(json.dumps(manifest))


def test_out_holding_unrelated_files_is_refused_and_left_untouched(wordpiece, tmp_path):
  out = tmp_path / "out"
  (out / "sub").mkdir(parents=True)
  (out / "notes.txt").write_text("mine")
  (out / "sub" / "data.bin").write_bytes(b"\0" * 10)
  for overwrite in (False, True):
    with pytest.raises(BlockStoreError, match=rf"^{out}: --out holds 'notes.txt' and no manifest.json, so it is not "
                                              "a block store; .* choose another --out, or remove it yourself"):
      _build(wordpiece, out, overwrite=overwrite)
  assert _tree(tmp_path) == {"out/notes.txt": b"mine", "out/sub/data.bin": b"\0" * 10}
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging sibling


def test_a_block_store_with_an_unknown_file_is_not_replaced_even_with_overwrite(wordpiece, local_slice_store, tmp_path):
  out = tmp_path / "blocks"
  shutil.copytree(local_slice_store, out)
  (out / "my_notes.txt").write_text("mine")
  before = _tree(tmp_path)
  with pytest.raises(BlockStoreError, match=rf"^{out}: --out holds 'my_notes.txt', which is not part of the block "
                                            "store there, so it is not replaced, even with --overwrite"):
    _build(wordpiece, out, overwrite=True)
  assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["blocks"]


def test_an_existing_block_store_is_replaced_only_with_overwrite(wordpiece, local_slice_store, tmp_path):
  out = stage_block_store(local_slice_store, tmp_path / "blocks")  # a staged copy: it has a .staged.json stamp too
  before = _tree(tmp_path)
  with pytest.raises(BlockStoreError, match=rf"^{out}: --out already holds a block store \(\d+ blocks\); pass "
                                            "--overwrite to replace it, or choose another --out"):
    _build(wordpiece, out)
  assert _tree(tmp_path) == before
  manifest = _build(wordpiece, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["blocks"]  # the old store renamed aside, then deleted; no staging left
  assert sorted(os.listdir(out)) == sorted([MANIFEST, *manifest["files"]])
  assert len(BlockStore(out)) == manifest["num_blocks"] == 2


def test_an_absent_or_empty_out_is_built_into(wordpiece, tmp_path):
  (tmp_path / "empty").mkdir()
  for out in (tmp_path / "empty", tmp_path / "new" / "blocks"):
    assert check_block_store_destination(out) is False
    assert _build(wordpiece, out)["num_blocks"] == len(BlockStore(out)) == 2
  assert sorted(os.listdir(tmp_path)) == ["empty", "new"] and os.listdir(tmp_path / "new") == ["blocks"]


def test_a_failed_build_keeps_the_old_store_and_leaves_no_staging_sibling(wordpiece, local_slice_store, tmp_path):
  out = tmp_path / "blocks"
  shutil.copytree(local_slice_store, out)
  before = _tree(tmp_path)
  with pytest.raises(CorpusError, match=r"^mem:2: field 'text': document 'd1' is empty"):
    _build(wordpiece, out, _docs("Alpha is first.", "   ", "Gamma."), overwrite=True)
  assert _tree(tmp_path) == before


def test_the_build_launcher_checks_out_before_reading_the_tokenizer_or_passages(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  result = _build_blocks(tmp_path / "missing.jsonl", None, tmp_path, f"--vocab={tmp_path / 'missing_vocab.txt'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: {tmp_path}: --out holds 'notes.txt' and no manifest.json" in result.stderr
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_an_empty_corpus_is_an_error_naming_the_input_and_leaves_nothing(wordpiece, tmp_path):
  passages = tmp_path / "passages.jsonl"
  passages.write_text("\n  \n")
  (tmp_path / "out").mkdir()
  with pytest.raises(CorpusError, match=rf"^{passages}: no blocks to write: no document has word pieces"):
    _build(wordpiece, tmp_path / "out" / "blocks", read_documents(passages), source=str(passages))
  assert os.listdir(tmp_path / "out") == []


def test_an_empty_document_is_an_error_naming_its_line_unless_skipped(wordpiece, tmp_path):
  passages = tmp_path / "bad.jsonl"
  lines = [{"id": "p0", "title": "T", "text": "Fine text."}, {"id": "a", "title": "T", "text": "   "},
           {"id": "b", "title": "T", "text": "\u200b"}, {"id": "c", "title": "T", "text": "More text."}]
  passages.write_text("".join(json.dumps(line) + "\n" for line in lines))
  with pytest.raises(CorpusError, match=rf"^{passages}:2: field 'text': document 'a' is empty \(has no word pieces\); "
                                        "pass --skip_empty_documents to skip and count such documents"):
    _build(wordpiece, tmp_path / "blocks", read_documents(passages))
  assert os.listdir(tmp_path) == ["bad.jsonl"]
  manifest = _build(wordpiece, tmp_path / "blocks", read_documents(passages), skip_empty_documents=True)
  assert manifest["stats"]["documents_skipped_empty"] == 2 and manifest["stats"]["documents"] == 4
  assert [t["doc_id"] for t in BlockStore(tmp_path / "blocks").iter_texts()] == ["p0", "c"]


def test_the_build_launcher_skips_empty_documents_and_notes_that_there_are_no_entities(demo_slice, tmp_path):
  passages = tmp_path / "passages.jsonl"
  passages.write_text(demo_slice[0].read_text() + json.dumps({"id": "empty", "title": "T", "text": " "}) + "\n")
  result = _build_blocks(passages, None, tmp_path / "blocks", "--skip_empty_documents")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "note: no --entities, so the blocks have no entity spans: salient-span masking has only the date-regex" \
      in result.stderr
  summary = json.loads(result.stdout)
  assert summary["documents_skipped_empty"] == 1 and summary["documents"] == SLICE_LINES + 1
  assert set(BlockStore(tmp_path / "blocks").manifest["span_labels"]) <= {DATE_REGEX_LABEL}


def test_the_build_launcher_on_a_bad_passages_line_prints_one_error_line_and_exits_2(tmp_path):
  passages = tmp_path / "passages.jsonl"
  passages.write_text('{"id": "p0", "title": "T", "text": "Fine."}\n{"id": "p1", "title": "T"\n')
  (tmp_path / "out").mkdir()
  result = _build_blocks(passages, None, tmp_path / "out" / "blocks")
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(f"error: {passages}:2: not valid JSON"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path / "out") == []


_PASSAGE_LINE = st.builds(lambda doc_id, title, text: json.dumps({"id": doc_id, "title": title, "text": text}).encode(),
                          st.text(max_size=3), st.text(max_size=8), st.text(max_size=40))
_PASSAGES_BYTES = st.one_of(st.binary(max_size=200),
                            st.lists(st.one_of(_PASSAGE_LINE, _PASSAGE_LINE, st.binary(max_size=30)), max_size=5)
                            .map(b"\n".join))


@settings(max_examples=25, deadline=None, database=None)
@given(data=_PASSAGES_BYTES)
def test_any_bytes_as_passages_build_a_complete_store_or_fail_naming_the_file_and_leave_nothing(wordpiece, data):
  with tempfile.TemporaryDirectory() as tmp:
    passages, out = Path(tmp) / "passages.jsonl", Path(tmp) / "out" / "blocks"
    passages.write_bytes(data)
    out.parent.mkdir()
    try:
      manifest = build_block_store(read_documents(passages), out, wordpiece, fingerprint_files(passages),
                                   source=str(passages))
    except InputError as e:
      assert str(e).startswith(str(passages)), e
      assert os.listdir(out.parent) == []
    else:
      assert os.listdir(out.parent) == ["blocks"]
      assert verify_block_store(out)["num_blocks"] == manifest["num_blocks"] == len(BlockStore(out))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("num_blocks"), "key 'num_blocks': missing"),
    (lambda m: m.update(num_blocks="12"), "key 'num_blocks': must be an integer >= 1, got '12'"),
    (lambda m: m.update(vocab_size=True), "key 'vocab_size': must be an integer >= 1, got True"),
    (lambda m: m["special_ids"].pop("cls"), "key 'special_ids.cls': missing"),
    (lambda m: m["arrays"]["body_ids"].update(dtype="int64"), "key 'arrays.body_ids.dtype': 'int64', this code reads"),
    (lambda m: m.update(num_blocks=m["num_blocks"] + 1), r"key 'arrays.title_offsets.shape': \[\d+\], expected"),
    (lambda m: m["files"].pop("spans.bin"), r"key 'files': lacks \['spans.bin'\]"),
    (lambda m: m["files"]["uids.bin"].update(size=3), r"key 'files.uids.bin.size': 3, but arrays.uids"),
])
def test_a_manifest_key_missing_or_of_the_wrong_type_is_refused_on_open_naming_it(local_slice_store, tmp_path, change,
                                                                                   message):
  store = tmp_path / "blocks"
  shutil.copytree(local_slice_store, store)
  manifest = json.loads((store / MANIFEST).read_text())
  change(manifest)
  (store / MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(BlockStoreError, match=rf"^{store / MANIFEST}: {message}"):
    BlockStore(store)


def test_a_truncated_texts_file_is_refused_on_open_naming_it(local_slice_store, tmp_path):
  store = tmp_path / "blocks"
  shutil.copytree(local_slice_store, store)
  size = os.path.getsize(store / "texts.jsonl")
  with open(store / "texts.jsonl", "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(BlockStoreError, match=rf"^{store / 'texts.jsonl'}: {size - 100} bytes, the manifest says {size}"):
    BlockStore(store)
  _rewrite(store, "texts.jsonl", lambda data: None)  # a manifest that agrees with the truncated file
  with pytest.raises(BlockStoreError, match=rf"^{store / 'text_offsets.bin'}: offsets run from 0 to {size}, expected "
                                            rf"0 to {size - 100} \(the size of texts.jsonl\)"):
    BlockStore(store)


def test_offsets_that_disagree_with_their_data_are_refused_on_open(local_slice_store, tmp_path):
  store = tmp_path / "blocks"
  shutil.copytree(local_slice_store, store)
  rows = BlockStore(store).arrays["body_ids"].shape[0]
  _rewrite(store, "body_offsets.bin", lambda data: data.__setitem__(slice(-8, None), np.int64(rows - 1).tobytes()))
  with pytest.raises(BlockStoreError, match=rf"^{store / 'body_offsets.bin'}: offsets run from 0 to {rows - 1}, "
                                            rf"expected 0 to {rows} \(the rows of body_ids.bin\)"):
    BlockStore(store)


def test_verify_accepts_a_built_store_and_the_launcher_prints_one_ok_line(local_slice_store):
  summary = verify_block_store(local_slice_store)
  assert summary["num_blocks"] == len(BlockStore(local_slice_store)) and summary["files"] == 14
  result = subprocess.run([sys.executable, "launch/verify_blocks.py", f"--store={local_slice_store}"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == [
      f"OK {local_slice_store}: {summary['num_blocks']} blocks, 14 files, {summary['bytes']} bytes checked (sha256s, "
      "offsets, word-piece ids, spans, sentence starts, texts)"]


def test_verify_finds_a_changed_byte_that_opening_does_not_and_the_launcher_exits_2(local_slice_store, tmp_path):
  store = tmp_path / "blocks"
  shutil.copytree(local_slice_store, store)
  with open(store / "body_ids.bin", "r+b") as f:
    f.seek(40)
    f.write(b"\x01")
  assert len(BlockStore(store))  # sizes agree: opening does not hash
  with pytest.raises(BlockStoreError, match=rf"^{store / 'body_ids.bin'}: sha256 \w+, the manifest says \w+"):
    verify_block_store(store)
  result = subprocess.run([sys.executable, "launch/verify_blocks.py", f"--store={store}"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and f"error: {store / 'body_ids.bin'}: sha256" in result.stderr


def _bad_word_piece(store: BlockStore, data: bytearray) -> str:
  np.frombuffer(data, store.arrays["body_ids"].dtype)[7] = store.manifest["vocab_size"]
  return rf"body_ids.bin: block 0: word piece id {store.manifest['vocab_size']} \(row 7\) is not below vocab_size"


def _decreasing_offsets(store: BlockStore, data: bytearray) -> str:
  offsets = np.frombuffer(data, np.int64)
  offsets[3] = offsets[4] + 1
  return rf"body_offsets.bin: block 3: offsets {offsets[3]} then {offsets[4]} \(offsets must not decrease\)"


def _span_outside_its_body(store: BlockStore, data: bytearray) -> str:
  block = int(np.flatnonzero(np.diff(store.arrays["span_offsets"]))[0])
  row = int(store.arrays["span_offsets"][block])
  np.frombuffer(data, np.int32).reshape(-1, 3)[row, 1] = len(store.body_ids(block)) + 1
  return rf"spans.bin: block {block}: span \[\d+, {len(store.body_ids(block)) + 1}, \d+\] \(row {row}\) is not"


def _sentence_start_outside_its_body(store: BlockStore, data: bytearray) -> str:
  np.frombuffer(data, np.int32)[0] = len(store.body_ids(0))
  return rf"sentence_starts.bin: block 0: sentence start {len(store.body_ids(0))} \(row 0\) is outside its body"


def _texts_line_with_another_uid(store: BlockStore, data: bytearray) -> str:
  start = data.index(b'"uid": "', int(store.arrays["text_offsets"][1])) + len(b'"uid": "')
  data[start] = ord("0") if data[start] != ord("0") else ord("1")
  return r"texts.jsonl:2: block 1: uid \w+, but uids.bin says \w+"


@pytest.mark.parametrize("name, damage", [
    ("body_ids.bin", _bad_word_piece), ("body_offsets.bin", _decreasing_offsets), ("spans.bin", _span_outside_its_body),
    ("sentence_starts.bin", _sentence_start_outside_its_body), ("texts.jsonl", _texts_line_with_another_uid),
])
def test_verify_names_the_file_and_block_of_content_damage_behind_matching_sha256s(local_slice_store, tmp_path, name,
                                                                                     damage):
  store = tmp_path / "blocks"
  shutil.copytree(local_slice_store, store)
  message = []
  _rewrite(store, name, lambda data: message.append(damage(BlockStore(local_slice_store), data)))
  with pytest.raises(BlockStoreError, match=rf"^{store}/{message[0]}"):
    verify_block_store(store)


def test_verify_streams_a_gs_store_and_names_a_corrupted_object(gs_slice_store, gcs_bucket):
  assert verify_block_store(gs_slice_store)["num_blocks"] == json.loads(
      epath.Path(f"{gs_slice_store}/{MANIFEST}").read_text())["num_blocks"]
  _copy_objects(gs_slice_store, f"{gcs_bucket}/blocks")
  texts = epath.Path(f"{gcs_bucket}/blocks/texts.jsonl")
  texts.write_bytes(texts.read_bytes()[:-10])
  with pytest.raises(BlockStoreError, match=rf"^{gcs_bucket}/blocks/texts.jsonl: \d+ bytes, the manifest says \d+"):
    verify_block_store(f"{gcs_bucket}/blocks")


def test_a_failed_upload_deletes_the_objects_it_wrote(local_slice_store, gcs_bucket, tmp_path):
  local = tmp_path / "blocks"
  shutil.copytree(local_slice_store, local)
  (local / "texts.jsonl").unlink()  # the last file of the `files` table: every other file is uploaded first
  with pytest.raises(FileNotFoundError, match="texts.jsonl"):
    upload_block_store(local, f"{gcs_bucket}/blocks")
  assert list(epath.Path(gcs_bucket).iterdir()) == []


def test_a_tfds_data_dir_prepared_from_another_corpus_is_refused_and_kept(demo_slice, tmp_path):
  from realm_jax.data.tfds_corpus import prepare_corpus, read_tfds_documents

  passages, entities = demo_slice
  data_dir = tmp_path / "tfds"
  builder = prepare_corpus(data_dir, passages, entities)
  assert len(list(read_tfds_documents(builder))) == SLICE_LINES
  before = _tree(data_dir)
  other = tmp_path / "other.jsonl"
  other.write_text("".join(passages.read_text().splitlines(keepends=True)[:10]))
  ours, theirs = fingerprint_files(other), fingerprint_files(passages, entities)
  with pytest.raises(InputError, match=rf"--tfds_data_dir={data_dir} holds a corpus prepared from other files \(corpus "
                                       rf"fingerprint {theirs}\), not from --passages={other} --entities=None "
                                       rf"\(fingerprint {ours}\); it is neither reused nor deleted"):
    prepare_corpus(data_dir, other)
  assert _tree(data_dir) == before
  assert len(list(read_tfds_documents(prepare_corpus(data_dir, passages, entities)))) == SLICE_LINES  # reused
