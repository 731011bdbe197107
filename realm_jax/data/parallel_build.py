"""Block building at corpus scale: the passages split into shards, built by worker processes, each shard
resumable, merged into one store identical to a single-process build.

  <parent>/.<name>.building/        this build's work directory (removed once the store is in place)
    plan.json                       inputs (corpus fingerprint), settings, and every shard's record range and
                                    where it begins in each file; a rerun with another plan starts over
    shard-<k>/                      shard k: a complete block store (written as any store: hidden staging
                                    sibling, renamed when complete), kept across reruns

A rerun after a crash or a kill keeps the shards that are complete and builds the rest; bad input (an
`InputError`, e.g. a malformed line) removes the work directory, as fixing the input changes the plan.  The merge
concatenates the shards in order (offsets shifted, span labels renumbered to the order of first appearance,
statistics summed), so block ids, uids, labels and statistics are those of one process reading the corpus in
order; duplicate document ids across shards are found there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from realm_jax import storage
from realm_jax.data import blocks as blocks_lib
from realm_jax.data.corpus import CorpusError, read_documents, record_positions
from realm_jax.data.tokenization import load_tokenizer
from realm_jax.errors import InputError

PLAN = "plan.json"
PLAN_FORMAT = 1
_COPY_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Shard:
  """Records [first, first + count) of the corpus (count None: to the end), where they begin in each file."""

  index: int
  first: int
  count: int | None
  passages_at: tuple[int, int]
  entities_at: tuple[int, int] | None


def work_dir(out_dir: storage.PathLike) -> epath.Path:
  out = epath.Path(out_dir)
  return out.parent / f".{out.name}.building"


def plan_shards(passages: str, entities: str | None, records_per_shard: int) -> tuple[int, list[Shard]]:
  """(records, shards of `records_per_shard` records), from one counting pass over each file."""
  records, starts = record_positions(passages, records_per_shard)
  entity_starts = [None] * len(starts)
  if entities:
    entity_records, entity_starts = record_positions(entities, records_per_shard)
    if entity_records != records:
      raise CorpusError(f"{entities}: {entity_records} entity records, but {passages} has {records} passages "
                        "(entity line i must describe passage line i)")
  shards = [Shard(k, k * records_per_shard, None if k == len(starts) - 1 else records_per_shard, at, entity_at)
            for k, (at, entity_at) in enumerate(zip(starts, entity_starts, strict=True))]
  return records, shards


def _shard_dir(work: epath.Path, index: int) -> epath.Path:
  return work / f"shard-{index:05d}"


def _build_shard(task: dict[str, Any]) -> int:
  """Builds one shard's store (in a worker process); returns its block count."""
  shard = Shard(**{**task["shard"], "passages_at": tuple(task["shard"]["passages_at"]),
                   "entities_at": task["shard"]["entities_at"] and tuple(task["shard"]["entities_at"])})
  tokenizer = load_tokenizer(task["vocab"])
  documents = read_documents(task["passages"], task["entities"], (shard.passages_at, shard.entities_at),
                             shard.count)
  manifest = blocks_lib.build_block_store(
      documents, task["out"], tokenizer, task["fingerprint"], task["max_block_len"], task["max_title_len"],
      source=task["passages"], skip_empty_documents=task["skip_empty_documents"], progress=False, allow_empty=True)
  return manifest["num_blocks"]


def build_sharded(passages: str, entities: str | None, out_dir: storage.PathLike, vocab: str, fingerprint: str,
                  *, max_block_len: int = 288, max_title_len: int = 64, skip_empty_documents: bool = False,
                  overwrite: bool = False, workers: int = 1, records_per_shard: int = 50_000,
                  seconds: dict[str, float] | None = None) -> dict:
  """Builds the store of `passages` (+ `entities`) in `out_dir` with `workers` processes, a shard of
  `records_per_shard` passages at a time; resumes the shards of an interrupted build of the same plan.
  Returns the manifest (with stats); `seconds`, if given, gets the time of each phase (plan, shards, merge)."""
  seconds = {} if seconds is None else seconds
  began = time.perf_counter()
  out = blocks_lib.check_local_out(out_dir)
  blocks_lib.check_block_store_destination(out, overwrite)
  records, shards = plan_shards(passages, entities, records_per_shard)
  plan = {"format": PLAN_FORMAT, "passages": os.path.abspath(passages),
          "entities": entities and os.path.abspath(entities), "corpus_fingerprint": fingerprint, "vocab": vocab,
          "max_block_len": max_block_len, "max_title_len": max_title_len,
          "skip_empty_documents": skip_empty_documents, "records": records,
          "shards": [dataclasses.asdict(s) for s in shards]}
  work = _open_work_dir(out, plan)
  seconds["plan"] = time.perf_counter() - began
  todo = [s for s in shards if not (_shard_dir(work, s.index) / blocks_lib.MANIFEST).exists()]
  logging.info("%d passages in %d shards; %d to build with %d worker(s) in %s", records, len(shards), len(todo),
               workers, work)
  tasks = [{"shard": dataclasses.asdict(s), "passages": passages, "entities": entities, "vocab": vocab,
            "out": os.fspath(_shard_dir(work, s.index)), "fingerprint": fingerprint, "max_block_len": max_block_len,
            "max_title_len": max_title_len, "skip_empty_documents": skip_empty_documents} for s in todo]
  try:
    if workers > 1 and len(tasks) > 1:
      os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
      with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        for done, _ in enumerate(pool.imap_unordered(_build_shard, tasks), 1):
          logging.info("shards built: %d of %d", done + len(shards) - len(tasks), len(shards))
    else:
      for task in tasks:
        _build_shard(task)
    seconds["shards"] = time.perf_counter() - began - seconds["plan"]
    manifest = merge_shards([_shard_dir(work, s.index) for s in shards], out, overwrite, passages, entities)
    seconds["merge"] = time.perf_counter() - began - seconds["plan"] - seconds["shards"]
  except InputError:
    shutil.rmtree(work)  # bad input: fixing it changes the plan, so nothing here would be reused
    raise
  shutil.rmtree(work)
  return manifest


def _open_work_dir(out: epath.Path, plan: dict) -> epath.Path:
  """This build's work directory: an earlier one of the same plan (its complete shards kept, half-written ones
  removed), or a new one.  One of another plan is replaced; a directory there that has no plan is not ours."""
  work = work_dir(out)
  if work.exists():
    plan_file = work / PLAN
    if not plan_file.is_file():
      raise blocks_lib.BlockStoreError(f"{work}: exists but holds no {PLAN}: not a build's work directory; move it "
                                       "away")
    if json.loads(plan_file.read_text()) == json.loads(json.dumps(plan)):
      for stale in work.iterdir():  # a worker killed mid-shard leaves its staging sibling
        if re.fullmatch(r"\.shard-\d{5}\.staging-[0-9a-f]+", stale.name):
          shutil.rmtree(stale)
      logging.info("resuming the build in %s", work)
      return work
    logging.warning("%s: an earlier build of other inputs or settings; starting over", work)
    shutil.rmtree(work)
  work.parent.mkdir(parents=True, exist_ok=True)
  new = work.parent / f"{work.name}.new-{uuid.uuid4().hex}"
  new.mkdir()
  (new / PLAN).write_text(json.dumps(plan, indent=1))
  os.rename(new, work)
  return work


def merge_shards(shard_dirs: list[epath.Path], out_dir: epath.Path, overwrite: bool, passages: str,
                 entities: str | None) -> dict:
  """Concatenates shard stores (in order) into one store at `out_dir`, written and published as any store."""
  manifests = [json.loads((d / blocks_lib.MANIFEST).read_text()) for d in shard_dirs]
  _check_unique_documents(shard_dirs, passages, entities)
  labels: dict[str, int] = {}
  for manifest in manifests:
    for name in sorted(manifest["span_labels"], key=manifest["span_labels"].get):
      labels.setdefault(name, len(labels))
  stats: Counter = Counter()
  for manifest in manifests:
    stats.update(manifest["stats"])

  def write(staging: epath.Path) -> dict[str, Any]:
    lengths: dict[str, int] = {}
    file_table = {}
    for name, (_, tail) in blocks_lib.ARRAYS.items():
      dtype = manifests[0]["arrays"][name]["dtype"]
      with open(os.fspath(staging / f"{name}.bin"), "wb") as f:
        out = storage.HashingFile(f)
        indexed = blocks_lib.OFFSETS.get(name)
        base = 0
        if indexed:
          out.write(np.int64(0).tobytes())
        for shard, manifest in zip(shard_dirs, manifests, strict=True):
          rows = np.fromfile(os.fspath(shard / f"{name}.bin"), dtype).reshape(-1, *tail)
          if indexed:
            rows = rows[1:] + base
            base = int(rows[-1]) if len(rows) else base
          elif name == "spans" and len(rows):
            renumber = np.asarray([labels[n] for n in sorted(manifest["span_labels"],
                                                             key=manifest["span_labels"].get)], dtype)
            rows = np.column_stack([rows[:, :2], renumber[rows[:, 2]]]).astype(dtype)
          out.write(np.ascontiguousarray(rows).tobytes())
        lengths[name] = out.size // (np.dtype(dtype).itemsize * int(np.prod(tail, dtype=np.int64)))
      file_table[f"{name}.bin"] = out.entry()
    with open(os.fspath(staging / blocks_lib.TEXTS), "wb") as f:
      out = storage.HashingFile(f)
      for shard in shard_dirs:
        with open(os.fspath(shard / blocks_lib.TEXTS), "rb") as source:
          while chunk := source.read(_COPY_BYTES):
            out.write(chunk)
      file_table[blocks_lib.TEXTS] = out.entry()
    first = manifests[0]
    manifest = blocks_lib.store_manifest(
        lengths["uids"], first["max_block_len"], first["tokenizer"], first["vocab_size"], first["special_ids"],
        first["corpus_fingerprint"], {n: lengths[n] for n in blocks_lib.ARRAYS}, file_table)
    if not manifest["num_blocks"]:
      raise CorpusError(f"{passages}: no blocks to write: no document has word pieces (the corpus is empty); give a "
                        "passages file with at least one non-empty document")
    return {**manifest, "span_labels": labels, "stats": dict(stats)}

  return blocks_lib.write_store_directory(write, out_dir, overwrite)


def _check_unique_documents(shard_dirs: list[epath.Path], passages: str, entities: str | None) -> None:
  """A document id in two shards is the error a single-process read gives (its file and line)."""
  seen: set[str] = set()
  for shard in shard_dirs:
    mine: set[str] = set()
    with open(os.fspath(shard / blocks_lib.TEXTS), encoding="utf-8") as f:
      for line in f:
        mine.add(json.loads(line)["doc_id"])
    if seen & mine:
      for _ in read_documents(passages, entities):  # raises naming the second occurrence's line
        pass
      raise CorpusError(f"{passages}: duplicate document ids {sorted(seen & mine)[:3]}")
    seen |= mine


def default_workers() -> int:
  """The default worker count: one per core this process may use."""
  with contextlib.suppress(AttributeError):
    return max(1, len(os.sched_getaffinity(0)))
  return max(1, os.cpu_count() or 1)

