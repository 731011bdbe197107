r"""Paper scale on this machine: synthetic 13,353,718-block stores and indexes, every host stage timed at 3 sizes.

  .venv/bin/python bench/scale.py --root=/tmp/realm-jax-scale   # ~60 min on 2 cores (15 of them generating), 45 GB
  .venv/bin/python bench/scale.py --root=/tmp/realm-jax-scale --sizes=100000 --report_to=  # a quick look

For each size it writes, once, a block store in the real on-disk format (`realm_jax.data.blocks`: manifest with
its `files` table, CSR arrays, texts.jsonl) with Wikipedia-like shapes (90% of blocks full at 288 word pieces,
about 10 sentences and 28 salient spans per block; the texts are the small corpus's real passages, cycled) and an N x 128 float32 index
published through `realm_jax.retrieval.index.publish_index` (commit object, sha256s).  Generation is vectorised
(numpy per chunk of blocks).  Each stage then runs in its own process, so its peak RSS is its own:

  open_store     BlockStore(...) (manifest checks, sizes, offsets ends)
  load_index     load_index: stream, hash and check the committed index into a memory map (peak RSS: none of it)
  swap_8         load_index + ExactSearcher.place over 8 CPU devices (a trainer host's swap); reported: the
                 extra peak RSS beyond the placed array (CPU device memory is host RSS here, a TPU's is not) over
                 the index bytes
  search_64      the same on 1 CPU device, then one chunked exact search of 64 queries for k = 8 (compiled)
  bf16_recall    recall@10 of a bfloat16 index against float32 (SearchConfig.storage_dtype), 256 queries
  host_step_64   one trainer host's per-step work at 64 queries x 8 candidates: select_candidates,
  host_step_512  candidate_inputs, span_in_candidates (the same at 512 x 8: one host holding the whole batch)
  startup        a trainer host's start-up over the store: MaskedQueries (maskable blocks, held-out split of
                 1000 blocks), as at every start and preemption restart
  ceiling_nq     the answer-in-corpus ceiling (eval/corpus_answers.py: one streaming pass over texts.jsonl) of
  ceiling_trec   the small corpus's NQ-open dev questions / CuratedTrec test regexes
  refresh_1      one refresher pass's host pipeline (bench/refresh_pipeline.py: input building, background
                 queue, a stand-in embedding step on 1 CPU device), blocks/s, then its publish (publish_index)
  refresh_2      the same as 2 processes (gloo, 1 CPU device each; a 2-host refresher): each embeds, holds and
                 writes only its half of the rows, process 0 commits; peak RSS is the larger process's

Block building runs on real text: the small corpus's 31,395 Wikipedia passages and spaCy entities
(../shared/data/realm_small_corpus), repeated to --build_sizes passages with fresh ids:

  build_1w       launch/build_blocks.py's sharded build (realm_jax.data.parallel_build) with 1 worker process
  build_2w       the same with 2 (this machine's cores): blocks/s, per core, and the 2-worker scaling
  long_<k>       1 worker over the first 31,395 passages joined k at a time into articles of ~k blocks
                 (k = 1, 10, 100): time per block across document lengths (linear span matching: flat)

Results land in `<root>/results.jsonl` as each stage finishes (a rerun skips what is there); the
"Paper scale on this machine" section of BENCHMARKS.md is rendered from it.  No embedding tower runs here: what
is measured is the host pipeline around it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import write_section  # noqa: E402

from realm_jax import storage  # noqa: E402
from realm_jax.data import blocks as blocks_lib  # noqa: E402
from realm_jax.data import packing  # noqa: E402

_ROOT = flags.DEFINE_string("root", "/tmp/realm-jax-scale", "Where the synthetic stores and indexes go.")
_SIZES = flags.DEFINE_list("sizes", ["1000000", "4000000", "13353718"], "Block counts.")
_STAGES = flags.DEFINE_list("stages", ["open_store", "load_index", "swap_8", "search_64", "bf16_recall",
                                       "host_step_64", "host_step_512", "startup", "ceiling_nq",
                                       "ceiling_trec", "refresh_1", "refresh_2"],
                            "Stages to time at every size.")
_BUILD_SIZES = flags.DEFINE_list("build_sizes", ["31395", "62790", "125580"],
                                 "Passages of real text for the building stages (the small corpus repeated).")
_BUILD_STAGES = flags.DEFINE_list("build_stages", ["build_1w", "build_2w", "long_1", "long_10", "long_100"],
                                  "Building stages (long_* run once, at the smallest build size).")
_OUT = flags.DEFINE_string("report_to", "BENCHMARKS.md", "Markdown file whose section is rewritten ('' for none).")
_STAGE = flags.DEFINE_string("stage", None, "(internal) run one stage in this process and print its JSON.")
_SIZE = flags.DEFINE_integer("size", None, "(internal) the block count of --stage.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "(internal) a multi-process stage's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "(internal) a multi-process stage's process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "(internal) this process of a multi-process stage.")

SECTION = "## Paper scale on this machine (bench/scale.py)"
SMALL_CORPUS = REPO.parent / "shared" / "data" / "realm_small_corpus"
PAPER_BLOCKS = 13_353_718
DIM = 128
CHUNK_BLOCKS = 250_000
MAX_BLOCK_LEN = 288
LABELS = ("PERSON", "ORG", "GPE", "DATE", "NORP", "LOC", "WORK_OF_ART", "EVENT", "FAC", "PRODUCT", "LAW",
          "LANGUAGE", "TIME", "CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", packing.DATE_REGEX_LABEL)


def store_dir(size: int) -> Path:
  return Path(_ROOT.value) / f"blocks_{size}"


def index_dir(size: int) -> Path:
  return Path(_ROOT.value) / f"index_{size}"


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_bytes() -> int:
  return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _synthetic_chunk(rng: np.random.Generator, count: int, vocab_size: int) -> dict[str, np.ndarray]:
  """`count` blocks: per-block lengths and the flat title/body/sentence/span rows (body-relative)."""
  title_len = rng.integers(3, 9, count)
  full = MAX_BLOCK_LEN - 3 - title_len
  body_len = np.where(rng.random(count) < 0.9, full, rng.integers(32, full + 1))
  num_sentences = np.minimum(np.clip(np.rint(rng.normal(10, 2, count)), 1, 20).astype(np.int64), body_len)
  block_of_sentence = np.repeat(np.arange(count), num_sentences)
  first_sentence = np.cumsum(num_sentences) - num_sentences
  k = np.arange(len(block_of_sentence)) - first_sentence[block_of_sentence]
  sentence_starts = k * body_len[block_of_sentence] // num_sentences[block_of_sentence]
  sentence_ends = np.append(sentence_starts[1:], 0)
  last = first_sentence + num_sentences - 1
  sentence_ends[last] = body_len
  num_spans = np.clip(np.rint(rng.normal(28, 5, count)), 0, 48).astype(np.int64)
  block_of_span = np.repeat(np.arange(count), num_spans)
  sentence = first_sentence[block_of_span] + (rng.random(len(block_of_span)) * num_sentences[block_of_span]).astype(
      np.int64)
  room = sentence_ends[sentence] - sentence_starts[sentence]
  length = np.minimum(rng.integers(1, 5, len(sentence)), room)
  start = sentence_starts[sentence] + (rng.random(len(sentence)) * (room - length + 1)).astype(np.int64)
  spans = np.stack([start, start + length, rng.integers(0, len(LABELS), len(start))], axis=1)
  return {
      "title_len": title_len, "body_len": body_len, "num_sentences": num_sentences, "num_spans": num_spans,
      "title_ids": rng.integers(1000, vocab_size, int(title_len.sum())),
      "body_ids": rng.integers(1000, vocab_size, int(body_len.sum())),
      "sentence_starts": sentence_starts, "spans": spans,
  }


def make_store(size: int) -> dict:
  """Writes the synthetic store of `size` blocks (the real format, every file hashed while written)."""
  from realm_jax.data.tokenization import load_tokenizer, minilm_dir

  tokenizer = load_tokenizer(minilm_dir() / "vocab.txt")
  out = store_dir(size)
  staging = out.with_name(f".{out.name}.staging")
  staging.mkdir(parents=True, exist_ok=True)
  files = {name: storage.HashingFile(open(staging / f"{name}.bin", "wb")) for name in blocks_lib.ARRAYS}
  texts = storage.HashingFile(open(staging / blocks_lib.TEXTS, "wb"))
  rows = {"title": 0, "body": 0, "sentence": 0, "span": 0, "text": 0, "block_text": 0}
  for name in blocks_lib.OFFSETS:
    files[name].write(np.int64(0).tobytes())
  passages = [json.loads(line) for line in (SMALL_CORPUS / "passages.jsonl").open(encoding="utf-8")]
  rng = np.random.default_rng(size)
  for first in range(0, size, CHUNK_BLOCKS):
    count = min(CHUNK_BLOCKS, size - first)
    chunk = _synthetic_chunk(rng, count, tokenizer.vocab_size)
    for key, data, lengths in (("title", "title_ids", "title_len"), ("body", "body_ids", "body_len"),
                               ("sentence", "sentence_starts", "num_sentences"), ("span", "spans", "num_spans")):
      dtype = blocks_lib.array_dtype(data, tokenizer.vocab_size)
      files[data].write(np.ascontiguousarray(chunk[data], dtype).tobytes())
      files[f"{key}_offsets"].write((rows[key] + np.cumsum(chunk[lengths])).astype(np.int64).tobytes())
      rows[key] += int(chunk[lengths].sum())
    lines, uids, bodies = [], [], []
    for i in range(first, first + count):
      passage = passages[i % len(passages)]  # real Wikipedia text (the small corpus, cycled) as the block's text
      title, text = passage["title"], passage["text"]
      uid = packing.block_uid(title, text)
      uids.append(uid)
      bodies.append(text.encode())
      lines.append(json.dumps({"doc_id": f"d{i // 3}", "title": title, "text": text, "uid": uid.hex()},
                              ensure_ascii=False) + "\n")
    encoded = [line.encode() for line in lines]
    texts.write(b"".join(encoded))
    files["text_offsets"].write((rows["text"] + np.cumsum([len(e) for e in encoded])).astype(np.int64).tobytes())
    rows["text"] += sum(len(e) for e in encoded)
    files["block_text"].write(b"".join(bodies))
    files["block_text_offsets"].write((rows["block_text"] + np.cumsum([len(b) for b in bodies])).astype(np.int64)
                                      .tobytes())
    rows["block_text"] += sum(len(b) for b in bodies)
    files["uids"].write(b"".join(uids))
  for f in (*files.values(), texts):
    f.file.close()
  lengths = {"title_ids": rows["title"], "body_ids": rows["body"], "sentence_starts": rows["sentence"],
             "spans": rows["span"], "uids": size, "block_text": rows["block_text"]}
  manifest = {
      "format_version": blocks_lib.FORMAT_VERSION, "num_blocks": size, "max_block_len": MAX_BLOCK_LEN,
      "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
      "special_ids": {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id,
                      "mask": tokenizer.mask_id},
      "corpus_fingerprint": f"synthetic-{size}",
      "arrays": {name: {"dtype": blocks_lib.array_dtype(name, tokenizer.vocab_size),
                        "shape": [lengths.get(name, size + 1), *tail]} for name, (_, tail) in blocks_lib.ARRAYS.items()},
      "files": {**{f"{name}.bin": f.entry() for name, f in files.items()}, blocks_lib.TEXTS: texts.entry()},
      "span_labels": {label: i for i, label in enumerate(LABELS)},
      "stats": {"synthetic": 1},
  }
  (staging / blocks_lib.MANIFEST).write_text(json.dumps(manifest, indent=2))
  os.replace(staging, out)
  return {"bytes": sum(e["size"] for e in manifest["files"].values())}


def make_index(size: int) -> dict:
  """Publishes an N x 128 float32 index of unit rows for the store of `size` blocks (index step 0)."""
  from realm_jax.retrieval import index as index_lib

  store = blocks_lib.BlockStore(store_dir(size))
  scratch = Path(_ROOT.value) / f".embeddings_{size}.npy"
  embeddings = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(size, DIM))
  rng = np.random.default_rng(size + 1)
  for first in range(0, size, CHUNK_BLOCKS * 4):
    rows = rng.standard_normal((min(CHUNK_BLOCKS * 4, size - first), DIM), np.float32)
    embeddings[first : first + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  embeddings.flush()
  try:
    index_lib.publish_index(index_dir(size), 0, embeddings, store, writer="scale-bench")
  finally:
    del embeddings
    scratch.unlink()
  return {"bytes": size * DIM * 4}


def synthetic_queries(store: blocks_lib.BlockStore, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of masked queries shaped like `MaskedQueries`' (a sentence of a random block, one span masked)."""
  from realm_jax.data.realm import RealmDataConfig

  c = RealmDataConfig()
  special = store.manifest["special_ids"]
  source = rng.integers(0, store.num_blocks, batch)
  query_ids = np.zeros((batch, c.query_len), np.int32)
  mlm_ids, mlm_weights = np.zeros((batch, c.max_masks), np.int32), np.zeros((batch, c.max_masks), np.float32)
  for row, block in enumerate(source):
    sentence = store.body_ids(int(block))[:40]
    query_ids[row, : len(sentence) + 2] = [special["cls"], *sentence, special["sep"]]
    mlm_ids[row, :3], mlm_weights[row, :3] = sentence[5:8], 1.0
  return {"block_id": source.astype(np.int32), "query_input_ids": query_ids, "mlm_ids": mlm_ids,
          "mlm_weights": mlm_weights}


def run_stage(stage: str, size: int) -> dict:
  """Runs one stage in this process: {seconds, ...}; peak RSS is added by the caller."""
  baseline = peak_rss_gb()
  start = time.perf_counter()
  if stage == "make_store":
    extra = make_store(size)
  elif stage == "make_index":
    extra = make_index(size)
  elif stage == "open_store":
    store = blocks_lib.BlockStore(store_dir(size))
    extra = {"num_blocks": store.num_blocks}
  elif stage == "load_index":
    from realm_jax.retrieval import index as index_lib

    store = blocks_lib.BlockStore(store_dir(size))
    start = time.perf_counter()
    _, embeddings = index_lib.load_index(index_dir(size), 0, store)
    extra = {"index_gb": embeddings.nbytes / 2**30}
  elif stage.startswith("search_"):
    extra = _search(size, int(stage.split("_")[1]))
    start = time.perf_counter() - extra.pop("seconds")
  elif stage.startswith("swap_"):
    extra = _swap(size)
    start = time.perf_counter() - extra.pop("seconds")
  elif stage == "bf16_recall":
    extra = _bf16_recall(size)
    start = time.perf_counter() - extra.pop("seconds")
  elif stage.startswith(("build_", "long_")):
    extra = _build(stage, size)
    start = time.perf_counter() - extra.pop("seconds")
  elif stage == "startup":
    from realm_jax.data.realm import MaskedQueries, RealmDataConfig

    store = blocks_lib.BlockStore(store_dir(size))
    start = time.perf_counter()
    queries = MaskedQueries(store, RealmDataConfig(eval_blocks=1000))
    extra = {"maskable": len(queries.block_ids), "us_per_block": 1e6 * (time.perf_counter() - start) / size}
  elif stage.startswith("ceiling_"):
    import shutil

    from realm_jax.data.questions import read_questions
    from realm_jax.eval.corpus_answers import cached_answer_in_corpus

    file = {"nq": "nq_open_dev.jsonl", "trec": "curatedtrec_test.jsonl"}[stage.split("_")[1]]
    questions = read_questions(SMALL_CORPUS / "questions" / file)
    store = blocks_lib.BlockStore(store_dir(size))
    scratch = Path(_ROOT.value) / f"scratch_ceiling_{size}"
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    in_corpus, _ = cached_answer_in_corpus(store, stage, questions, scratch)
    shutil.rmtree(scratch)
    extra = {"questions": len(questions), "answer_in_corpus": float(in_corpus.mean()),
             "us_per_block": 1e6 * (time.perf_counter() - start) / size}
  elif stage.startswith("refresh_"):
    extra = _refresh(size)
    start = time.perf_counter() - extra.pop("seconds")
  elif stage.startswith("host_step_"):
    extra = _host_step(size, int(stage.split("_")[2]))
    start = time.perf_counter() - extra.pop("seconds")
  else:
    raise app.UsageError(f"unknown stage {stage!r}")
  return {"seconds": time.perf_counter() - start, "baseline_rss_gb": baseline, **extra}


def real_corpus(passages: int, join: int = 1) -> tuple[Path, Path]:
  """The small corpus repeated to `passages` records (ids made unique), or its passages joined `join` at a time
  into long articles (entity spans moved along); written once under --root."""
  out = Path(_ROOT.value) / f"corpus_{passages}_{join}"
  files = out / "passages.jsonl", out / "entities.jsonl"
  if all(f.exists() for f in files):
    return files
  out.mkdir(parents=True, exist_ok=True)
  source = [json.loads(line) for line in (SMALL_CORPUS / "passages.jsonl").open(encoding="utf-8")]
  ents = [json.loads(line) for line in (SMALL_CORPUS / "entities_spacy_en_core_web_sm_3.8.0.jsonl").open()]
  with open(f"{files[0]}.tmp", "w", encoding="utf-8") as p, open(f"{files[1]}.tmp", "w") as e:
    for k in range(0, passages, join):
      group = [(source[i % len(source)], ents[i % len(source)]) for i in range(k, min(k + join, passages))]
      text, spans = "", []
      for record, entities in group:
        text += " " if text else ""
        spans += [[s + len(text), t + len(text), label] for s, t, label in entities["ents"]]
        text += record["text"]
      doc_id = f"r{k}"
      p.write(json.dumps({"id": doc_id, "title": group[0][0]["title"], "text": text}, ensure_ascii=False) + "\n")
      e.write(json.dumps({"id": doc_id, "ents": spans}) + "\n")
  for f in files:
    os.rename(f"{f}.tmp", f)
  return files


def _build(stage: str, size: int) -> dict:
  """One sharded build of real text into a scratch store (removed after): seconds, blocks, blocks/s (per core)."""
  import shutil

  from realm_jax.data.corpus import fingerprint_files
  from realm_jax.data.parallel_build import build_sharded
  from realm_jax.data.tokenization import minilm_dir

  join = int(stage.split("_")[1]) if stage.startswith("long_") else 1
  workers = int(stage.split("_")[1][:-1]) if stage.startswith("build_") else 1
  passages, entities = real_corpus(size, join)
  out = Path(_ROOT.value) / f"scratch_blocks_{stage}_{size}"
  shutil.rmtree(out, ignore_errors=True)
  start, phases = time.perf_counter(), {}
  manifest = build_sharded(str(passages), str(entities), out, str(minilm_dir() / "vocab.txt"),
                           fingerprint_files(passages, entities), workers=workers,
                           records_per_shard=max(1, -(-size // join // (4 * workers))), seconds=phases)
  seconds = time.perf_counter() - start
  blocks, pieces = manifest["num_blocks"], manifest["stats"]["tokens"]
  shutil.rmtree(out)
  return {"seconds": seconds, "blocks": blocks, "workers": workers, "blocks_per_s": blocks / seconds,
          "blocks_per_s_per_core": blocks / phases["shards"] / workers, "us_per_block": 1e6 * seconds / blocks,
          "pieces_per_s_per_core": pieces / phases["shards"] / workers, "pieces_per_block": pieces / blocks,
          "blocks_per_document": blocks / -(-size // join), **{f"{k}_seconds": v for k, v in phases.items()}}


def _refresh(size: int) -> dict:
  """A refresher pass (stand-in tower) and its publish, by this process of the stage's processes."""
  import shutil

  import jax
  from refresh_pipeline import measure_host_pipeline

  from realm_jax import partitioning
  from realm_jax.retrieval import index as index_lib

  store = blocks_lib.BlockStore(store_dir(size))
  result = measure_host_pipeline(store, keep_rows=True)
  rows = result.pop("rows")
  scratch = Path(_ROOT.value) / f"scratch_index_{size}"  # this stage's own, removed after it
  if jax.process_index() == 0 and scratch.exists():
    shutil.rmtree(scratch)
  partitioning.barrier("scratch index removed")
  start = time.perf_counter()
  index_lib.publish_index(scratch, 1, rows, store, writer="scale-bench")
  publish = time.perf_counter() - start
  if jax.process_index() == 0:
    shutil.rmtree(scratch)
  return {"seconds": result["seconds"] + publish, "blocks_per_s": result["blocks_per_s"], "publish_seconds": publish,
          "processes": jax.process_count(), "rows_gb": rows.embeddings.nbytes / 2**30}


def _search(size: int, batch: int) -> dict:
  """Places the index on this host's devices and times one search of `batch` queries for k = 8 (compiled)."""
  import jax

  from realm_jax import partitioning
  from realm_jax.retrieval import index as index_lib
  from realm_jax.retrieval.mips import ExactSearcher

  store = blocks_lib.BlockStore(store_dir(size))
  _, embeddings = index_lib.load_index(index_dir(size), 0, store)
  mesh = partitioning.make_mesh(-1, 1)
  place_start = time.perf_counter()
  searcher = ExactSearcher(embeddings, mesh)
  jax.block_until_ready(searcher.embeddings)
  place = time.perf_counter() - place_start
  queries = np.random.default_rng(0).standard_normal((batch, DIM), np.float32)
  searcher.search(queries, 8)  # compile
  start = time.perf_counter()
  searcher.search(queries, 8)
  return {"seconds": time.perf_counter() - start, "place_seconds": place, "devices": mesh.size}


def _swap(size: int) -> dict:
  """load_index + place over this process's devices (JAX_NUM_CPU_DEVICES=8): seconds and peak RSS / index bytes."""
  import jax

  from realm_jax import partitioning
  from realm_jax.retrieval import index as index_lib
  from realm_jax.retrieval.mips import ExactSearcher

  store = blocks_lib.BlockStore(store_dir(size))
  mesh = partitioning.make_mesh(-1, 1)
  before = current_rss_bytes()
  start = time.perf_counter()
  _, embeddings = index_lib.load_index(index_dir(size), 0, store)
  searcher = ExactSearcher(embeddings, mesh)
  jax.block_until_ready(searcher.embeddings)
  seconds = time.perf_counter() - start
  placed = searcher.embeddings.nbytes  # CPU "device" memory is host RSS; on a TPU host it is not
  return {"seconds": seconds, "devices": mesh.size,
          "rss_over_index": (peak_rss_gb() * 2**30 - before - placed) / embeddings.nbytes}


def _bf16_recall(size: int, queries: int = 256, k: int = 10) -> dict:
  """recall@k of a bfloat16 index against float32 for random directions and for noisy copies of index rows (the
  query is near its own row, as a retrieval query is near its best blocks); seconds: the bfloat16 search."""
  import dataclasses

  from realm_jax import partitioning
  from realm_jax.retrieval import index as index_lib
  from realm_jax.retrieval.mips import ExactSearcher, SearchConfig

  store = blocks_lib.BlockStore(store_dir(size))
  _, embeddings = index_lib.load_index(index_dir(size), 0, store)
  rng = np.random.default_rng(7)
  near = embeddings[rng.integers(0, size, queries)] + rng.standard_normal((queries, DIM), np.float32) / np.sqrt(DIM)
  batches = {"random": rng.standard_normal((queries, DIM), np.float32), "near_a_row": near}
  mesh, config = partitioning.make_mesh(-1, 1), SearchConfig()
  full = ExactSearcher(embeddings, mesh, config)
  exact = {name: full.search(q, k)[0] for name, q in batches.items()}
  del full  # one placed index at a time
  half = ExactSearcher(embeddings, mesh, dataclasses.replace(config, storage_dtype="bfloat16"))
  del embeddings
  out = {}
  for name, q in batches.items():
    start = time.perf_counter()
    ids, _ = half.search(q, k)
    out["seconds"] = time.perf_counter() - start
    out[f"recall_{name}"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact[name], strict=True)]))
  return out


def _host_step(size: int, batch: int, repeats: int = 5) -> dict:
  """Median time of one step's host work for `batch` queries x 8 candidates retrieved uniformly at random."""
  from realm_jax.data.realm import RealmDataConfig, candidate_inputs, select_candidates, span_in_candidates

  store = blocks_lib.BlockStore(store_dir(size))
  config = RealmDataConfig(batch_size=batch)
  rng = np.random.default_rng(batch)
  times = []
  for _ in range(repeats + 1):
    queries = synthetic_queries(store, batch, rng)
    retrieved = rng.integers(0, size, (batch, config.num_candidates))
    start = time.perf_counter()
    candidates, _ = select_candidates(retrieved, queries["block_id"], store.arrays["uids"], config.num_candidates)
    _, joint = candidate_inputs(store, candidates, queries["query_input_ids"], config)
    span_in_candidates(joint, queries["mlm_ids"], queries["mlm_weights"])
    times.append(time.perf_counter() - start)
  return {"seconds": float(np.median(times[1:])), "ms": 1e3 * float(np.median(times[1:]))}


def run_in_subprocess(stage: str, size: int) -> dict:
  """The stage's result from its own process, or from each of its processes (`refresh_2`): the slowest one's
  time and the largest peak RSS."""
  command = [__file__, f"--stage={stage}", f"--size={size}", f"--root={_ROOT.value}"]
  processes = int(stage.split("_")[1]) if stage.startswith("refresh_") else 1
  if processes > 1:
    command = ["launch/local_multihost.py", f"--num_processes={processes}", "--devices_per_process=1", "--",
               *command]
  devices = "8" if stage.startswith("swap_") else "1"
  done = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": devices,
                             "PYTHONPATH": str(REPO)})
  if done.returncode:
    raise RuntimeError(f"{stage} at {size}: exit {done.returncode}\n{done.stderr[-3000:]}")
  results = [json.loads(line.split("] ", 1)[-1]) for line in done.stdout.splitlines()
             if line.split("] ", 1)[-1].startswith('{"stage"')]
  worst = max(results, key=lambda r: r["peak_rss_gb"])
  return {**worst, "seconds": max(r["seconds"] for r in results)}


def _notes(result: dict) -> str:
  """A stage's own figure beside its time: ms per step, RSS over the index bytes, or blocks/s."""
  notes = []
  if "ms" in result:
    notes.append(f"{result['ms']:.1f} ms")
  if "rss_over_index" in result:
    notes.append(f"{result['rss_over_index']:.2f}x index")
  if "blocks_per_s" in result:
    notes.append(f"{result['blocks_per_s']:,.0f} blocks/s")
  if "us_per_block" in result:
    notes.append(f"{result['us_per_block']:.2f} µs/block")
  if "rows_gb" in result:
    notes.append(f"{result['rows_gb']:.2f} GB of rows per process, publish {result['publish_seconds']:.1f} s")
  if "recall_random" in result:
    notes.append(f"recall@10 {result['recall_random']:.3f} random, {result['recall_near_a_row']:.3f} near a row")
  return ", ".join(notes)


def report(results: list[dict]) -> str:
  sizes = sorted({r["size"] for r in results})
  stages = list(dict.fromkeys(r["stage"] for r in results))
  cell = {(r["stage"], r["size"]): r for r in results}
  head = ["stage", *[f"{s:,} blocks: s / peak RSS GB" for s in sizes]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for stage in stages:
    row = [stage]
    for size in sizes:
      r = cell.get((stage, size))
      notes = _notes(r) if r else ""
      row.append("–" if r is None else f"{r['seconds']:.2f} / {r['peak_rss_gb']:.2f}" + (f" ({notes})" if notes else ""))
    lines.append("| " + " | ".join(row) + " |")
  return (f"{SECTION}\n\n`.venv/bin/python bench/scale.py --root=/tmp/realm-jax-scale` (2-core CPU, "
          f"{time.strftime('%Y-%m-%d')}).  Synthetic stores in the real format (Wikipedia-like shapes), N x 128 "
          "float32 indexes published through the commit protocol; each stage in its own process (peak RSS is "
          "that process's, including its ~0.3-0.5 GB of imports).  No embedding tower runs: the host pipeline "
          "is what is measured.\n\n" + "\n".join(lines) + "\n\n"
          "Reading it: `host_step_*` reads randomly chosen blocks, so it measures the page cache: a store that no "
          "longer fits in this machine's 23 GB beside the index makes the first stage to touch it (`host_step_64`) "
          "pay disk latency per block; a TPU host (v3: 340 GB) keeps the store cached, where the 1M row is the one "
          "that applies.  `swap_8`'s extra RSS is one device's slice plus the index file's pages still mapped (each "
          "device's slice is released once copied).  `refresh_1` / `refresh_2`: peak RSS is the process's (the "
          "larger of the 2): its own rows plus the block store's pages it has read, both its share of the corpus "
          "(on a pod, 1 / hosts).  `ceiling_*` is one pass over texts.jsonl for all questions of the dataset, "
          "cached afterwards; `startup` is MaskedQueries at a trainer's start (target: at most 60 s at "
          "13.35M).\n")


def build_report(results: list[dict]) -> str:
  """The building table (real text), the 2-worker scaling, and the projection to English Wikipedia."""
  if not results:
    return ""
  lines = ["| stage | passages | blocks (word pieces each) | s: plan / shards / merge | peak RSS GB (parent) | "
           "blocks/s | shard work per core: blocks/s, word pieces/s | µs per block |", "|---|---|---|---|---|---|---|---|"]
  for r in sorted(results, key=lambda r: (r["stage"].split("_")[0], r["size"], r["stage"])):
    name = r["stage"] + (f" (~{r['blocks_per_document']:.1f} blocks per article)" if r["stage"].startswith("long_")
                         else "")
    lines.append(f"| {name} | {r['size']:,} | {r['blocks']:,} ({r['pieces_per_block']:.0f}) | "
                 f"{r['plan_seconds']:.1f} / {r['shards_seconds']:.1f} / {r['merge_seconds']:.1f} | "
                 f"{r['peak_rss_gb']:.2f} | {r['blocks_per_s']:,.0f} | {r['blocks_per_s_per_core']:,.0f}, "
                 f"{r['pieces_per_s_per_core']:,.0f} | {r['us_per_block']:.0f} |")
  cell = {(r["stage"], r["size"]): r for r in results}
  text = "\n\n### Building on real text\n\n" + "\n".join(lines) + "\n"
  largest = max((s for (stage, s) in cell if stage == "build_2w"), default=None)
  longest = max((r for r in results if r["stage"].startswith("long_")), key=lambda r: r["blocks_per_document"],
                default=None)
  if largest is None or ("build_1w", largest) not in cell or longest is None:
    return text
  one, two = cell[("build_1w", largest)], cell[("build_2w", largest)]
  scaling = one["shards_seconds"] / two["shards_seconds"]
  # Wikipedia's blocks are full (about 285 word pieces): project by word pieces, at the per-core rate of the longest
  # articles scaled by the 2-worker efficiency; plan and merge are sequential and grow with the corpus.
  pieces = PAPER_BLOCKS * 285
  per_core = longest["pieces_per_s_per_core"] * scaling / 2
  sequential = (two["plan_seconds"] + two["merge_seconds"]) / (two["blocks"] * two["pieces_per_block"]) * pieces
  hours = (pieces / (per_core * 96) + sequential) / 3600
  return text + (
      f"\n2 workers do the shard work {scaling:.2f}x as fast as 1 at {largest:,} passages (2 cores, shared with the "
      f"parent).  Projected for English Wikipedia ({PAPER_BLOCKS:,} blocks of ~285 word pieces) on a 96-vCPU host "
      f"with 96 workers: {hours:.2f} h (shard work at {per_core:,.0f} word pieces/s per core, the rate of "
      f"{longest['stage']}'s articles times the 2-worker efficiency, plus {sequential / 60:.0f} min of planning and "
      "merging, which run in one process); the target is at most 1 h (before: one process, an estimated 11-21 h).  "
      "It assumes the per-core rate holds at 96 workers, so the input and the shards need a disk that keeps up.\n")


def main(argv):
  del argv
  if _STAGE.value:
    from realm_jax import partitioning

    partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = run_stage(_STAGE.value, _SIZE.value)
    print(json.dumps({"stage": _STAGE.value, "size": _SIZE.value, **result, "peak_rss_gb": peak_rss_gb()}))
    return
  root = Path(_ROOT.value)
  root.mkdir(parents=True, exist_ok=True)
  log = root / "results.jsonl"
  results = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  done = {(r["stage"], r["size"]) for r in results}
  for size in map(int, _SIZES.value):
    stages = [*(["make_store"] if not (store_dir(size) / blocks_lib.MANIFEST).exists() else []),
              *(["make_index"] if not (index_dir(size) / "commits" / "0.json").exists() else []), *_STAGES.value]
    for stage in stages:
      if (stage, size) in done and stage not in ("make_store", "make_index"):
        continue
      result = run_in_subprocess(stage, size)
      print(json.dumps(result), flush=True)
      results = [r for r in results if (r["stage"], r["size"]) != (stage, size)] + [result]
      with log.open("a") as f:
        f.write(json.dumps(result) + "\n")
  build_sizes = sorted(map(int, _BUILD_SIZES.value))
  for stage in _BUILD_STAGES.value:
    for size in build_sizes[:1] if stage.startswith("long_") else build_sizes:
      if (stage, size) in done:
        continue
      result = run_in_subprocess(stage, size)
      print(json.dumps(result), flush=True)
      results.append(result)
      with log.open("a") as f:
        f.write(json.dumps(result) + "\n")
  if _OUT.value:
    wanted = {int(s) for s in _SIZES.value}
    building = [r for r in results if r["stage"].startswith(("build_", "long_")) and r["size"] in build_sizes]
    write_section(REPO / _OUT.value, SECTION,
                  report([r for r in results if r["size"] in wanted and r not in building]) + build_report(building))


if __name__ == "__main__":
  app.run(main)
