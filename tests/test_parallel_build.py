"""A block store built in shards by worker processes, killed and resumed, equals a single-process build."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DEMO_ENTITIES, DEMO_PASSAGES, REPO, subprocess_env

from realm_jax.data import blocks as blocks_lib
from realm_jax.data import parallel_build
from realm_jax.data.blocks import BlockStoreError, build_block_store
from realm_jax.data.corpus import CorpusError, fingerprint_files, read_documents


def _same_store(a, b):
  """Every data file byte for byte; the manifests equal but for their creation time."""
  manifests = [json.loads((d / blocks_lib.MANIFEST).read_text()) for d in (a, b)]
  assert [{k: v for k, v in m.items() if k != "created"} for m in manifests][0] == {
      k: v for k, v in manifests[1].items() if k != "created"}
  for name in manifests[0]["files"]:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def single_process_store(tmp_path_factory, wordpiece):
  out = tmp_path_factory.mktemp("single") / "blocks"
  build_block_store(read_documents(DEMO_PASSAGES, DEMO_ENTITIES), out, wordpiece,
                    fingerprint_files(DEMO_PASSAGES, DEMO_ENTITIES))
  return out


def _launch(out, *extra):
  return subprocess.Popen(
      [sys.executable, "launch/build_blocks.py", f"--passages={DEMO_PASSAGES}", f"--entities={DEMO_ENTITIES}",
       f"--out={out}", "--workers=2", "--records_per_shard=250", *extra], cwd=REPO, env=subprocess_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_sharded_build_killed_midway_and_resumed_equals_a_single_process_build(single_process_store, tmp_path):
  out = tmp_path / "blocks"
  work = parallel_build.work_dir(out)
  first = _launch(out)
  deadline = time.monotonic() + 300
  while not list(work.glob("shard-*/manifest.json")) and time.monotonic() < deadline and first.poll() is None:
    time.sleep(0.05)
  os.killpg(first.pid, signal.SIGKILL)  # the launcher and its workers, mid-build
  first.communicate()
  kept = len(list(work.glob("shard-*/manifest.json")))
  assert 0 < kept < 16 and not out.exists()
  resumed = _launch(out)
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert "resuming the build in" in err and f"4000 passages in 16 shards; {16 - kept} to build" in err  # kept kept
  assert not work.exists() and not list(tmp_path.glob(".blocks.*"))  # nothing of the build left beside the store
  _same_store(out, single_process_store)
  assert blocks_lib.BlockStore(out).num_blocks == blocks_lib.BlockStore(single_process_store).num_blocks


def test_shards_merge_to_the_single_process_store_for_any_shard_size(single_process_store, tmp_path, minilm_path):
  fingerprint = fingerprint_files(DEMO_PASSAGES, DEMO_ENTITIES)
  for records in (4000, 999, 1):  # one shard; uneven shards; a shard per passage (labels first seen anywhere)
    if records == 1:  # a shard per passage of a slice: 40 shards, one process
      passages, entities = tmp_path / "p.jsonl", tmp_path / "e.jsonl"
      passages.write_text("".join(DEMO_PASSAGES.read_text().splitlines(keepends=True)[:40]))
      entities.write_text("".join(DEMO_ENTITIES.read_text().splitlines(keepends=True)[:40]))
      reference = tmp_path / "reference"
      from realm_jax.data.tokenization import load_tokenizer

      build_block_store(read_documents(passages, entities), reference, load_tokenizer(minilm_path / "vocab.txt"),
                        fingerprint_files(passages, entities))
    else:
      passages, entities, reference = DEMO_PASSAGES, DEMO_ENTITIES, single_process_store
    out = tmp_path / f"sharded_{records}"
    parallel_build.build_sharded(str(passages), str(entities), out, str(minilm_path / "vocab.txt"),
                                 fingerprint if records > 1 else fingerprint_files(passages, entities),
                                 records_per_shard=records)
    _same_store(out, reference)


def test_a_duplicate_id_in_another_shard_is_named_with_its_line_and_a_foreign_work_dir_is_refused(tmp_path,
                                                                                                 minilm_path):
  lines = DEMO_PASSAGES.read_text().splitlines(keepends=True)[:30]
  passages = tmp_path / "p.jsonl"
  passages.write_text("".join(lines + [lines[3]]))
  vocab = str(minilm_path / "vocab.txt")
  with pytest.raises(CorpusError, match=rf"{passages}:31: field 'id': duplicate document id"):
    parallel_build.build_sharded(str(passages), None, tmp_path / "blocks", vocab, "f", records_per_shard=10)
  foreign = parallel_build.work_dir(tmp_path / "other")
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(BlockStoreError, match="holds no plan.json: not a build's work directory"):
    parallel_build.build_sharded(str(passages), None, tmp_path / "other", vocab, "f", records_per_shard=10)
  assert (foreign / "notes.txt").read_text() == "mine"
