"""Published MIPS indexes: a publish protocol that is atomic on object stores and local disks, and a poller that
hot-swaps them into a trainer's searcher.

  <index_dir>/data/<step>-<writer>-<nonce>/   embeddings-<p>-of-<n>.npy: process p's rows of the n processes
                                              that embedded it (contiguous block ranges, in order) [+ <backend>/
                                              assets, e.g. scann/]: written once, under a name never reused
  <index_dir>/commits/<step>.json             the commit object, written last in one write by process 0 after
                                              every part is written: train_step, the data folder, every file's
                                              size and sha256 (and each part's rows), num_blocks, dim, dtype,
                                              corpus_fingerprint, tokenizer, backend (the `backends.BACKENDS`
                                              name that wrote it), writer, created

An index exists only once its commit object does (a single-object write is atomic on GCS; a rename on local
disk), so no step needs a directory rename or a consistent listing of a half-written prefix.  Readers trust
only commit objects and verify every byte they load against them; embeddings holding NaN or inf are never
published and refused when read, and a file a commit lists but that is missing is an error, not a silent skip.
The publisher keeps the newest `keep` commits and removes older ones commit first, then data; a writer that
restarts removes the data folders no commit names that are its own (a publish it was killed in) or older than
the oldest commit (a removal killed between commit and data).  Paths go through etils.epath (local disk or GCS).
No process ever holds another's rows to publish; `load_index` assembles the parts into one memory map.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np
from absl import logging
from etils import epath

from realm_jax import partitioning, storage
from realm_jax.data.blocks import BlockStore
from realm_jax.errors import InputError
from realm_jax.retrieval.backends import EXACT, IndexBackend, Searcher, get_backend
from realm_jax.retrieval.mips import SearchConfig

INDEX_DIR = "index"  # a run's published indexes, under its workdir
COMMITS = "commits"
DATA = "data"
EMBEDDINGS = "embeddings.npy"
COMMIT_FORMAT = 2
_CHUNK = 1 << 24
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class PublishedIndexError(InputError):
  """A committed index whose content is wrong (hash, size, shape, NaN or inf embeddings, a listed file missing)
  or that does not match the block store."""


class IndexReadError(RuntimeError):
  """An index that could not be read for `max_failures` consecutive attempts (I/O, not content)."""


def commit_path(index_dir: storage.PathLike, step: int) -> epath.Path:
  return storage.as_path(index_dir) / COMMITS / f"{step}.json"


def committed_steps(index_dir: storage.PathLike) -> list[int]:
  """Steps with a commit object, oldest first (a listing only ever shows whole objects)."""
  directory = storage.as_path(index_dir) / COMMITS
  if not directory.exists():
    return []
  return sorted(int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"(\d+)\.json", p.name)))


@dataclasses.dataclass(frozen=True)
class EmbeddedRows:
  """The rows of an index one process embedded: blocks [start, start + len(embeddings)) of `num_blocks`."""

  start: int
  embeddings: np.ndarray
  num_blocks: int


def part_name(process: int, processes: int) -> str:
  """The embedding file of process `process` of `processes` (its rows, `partitioning.process_block_range`)."""
  return f"embeddings-{process:05d}-of-{processes:05d}.npy"


def publish_index(
    index_dir: storage.PathLike,
    train_step: int,
    rows: EmbeddedRows | np.ndarray,
    store: BlockStore,
    backend: IndexBackend = EXACT,
    keep: int = 3,
    writer: str = "refresher",
) -> epath.Path:
  """Every process writes its own rows of index `train_step` under one fresh data folder; after a barrier process
  0 writes the commit object listing every part (size, sha256, rows), then keeps the newest `keep` commits.

  `rows`: this process's `EmbeddedRows` (a plain array: all rows, one process).  A `backend` that writes assets
  (ScaNN) writes them on process 0 from the whole written index (a memory map of the parts, verified), under
  `<data folder>/<backend.name>/`; the commit records `backend.name`.
  `writer` names the job (the refresher, or a trainer bootstrapping index 0) in the data folder's name, which
  tells `remove_uncommitted` whose a half-written folder is.  A committed step is never rewritten, and an index
  with a NaN or inf row on any process is refused before anything is written.  Returns the commit's path.
  """
  if isinstance(rows, np.ndarray):
    rows = EmbeddedRows(0, rows, len(rows))
  embeddings, processes = rows.embeddings, jax.process_count()
  expected = partitioning.process_block_range(store.num_blocks)
  if embeddings.ndim != 2 or rows.num_blocks != store.num_blocks or (
      rows.start, rows.start + len(embeddings)) != expected:
    raise ValueError(f"process {jax.process_index()}: rows {rows.start}:{rows.start + len(embeddings)} "
                     f"({embeddings.shape}) of {rows.num_blocks} are not its rows {expected[0]}:{expected[1]} of "
                     f"the store's {store.num_blocks} blocks")
  root = storage.as_path(index_dir)
  commit = commit_path(root, train_step)
  checks = partitioning.gather_ints([_non_finite_rows(embeddings), embeddings.shape[1],
                                     jax.process_index() == 0 and commit.exists()])
  if bad := int(checks[:, 0].sum()):
    raise InputError(f"index step {train_step}: {bad} of {store.num_blocks} embedding rows are not finite (NaN or "
                     "inf); not published (the retriever that embedded them has diverged or was loaded wrong)")
  if len(set(checks[:, 1].tolist())) != 1:
    raise ValueError(f"index step {train_step}: the processes' embeddings differ in width: {checks[:, 1].tolist()}")
  if checks[0, 2]:
    raise PublishedIndexError(f"{commit}: index step {train_step} is already committed (never rewritten)")
  nonce = partitioning.agree(int.from_bytes(os.urandom(6), "big"))  # process 0's: one folder for all parts
  name = f"{train_step}-{writer}-{nonce:012x}"
  data = root / DATA / name
  storage.make_dirs(data)
  part = part_name(jax.process_index(), processes)
  with (data / part).open("wb") as f:
    hashing = storage.HashingFile(f)
    np.lib.format.write_array(hashing, np.ascontiguousarray(embeddings), allow_pickle=False)
  mine = hashing.entry()
  written = partitioning.gather_ints([mine["size"], *np.frombuffer(bytes.fromhex(mine["sha256"]), np.int64)])
  partitioning.barrier(f"index {train_step}: parts written")
  if jax.process_index() == 0:
    files = {}
    for process, (size, *digest) in enumerate(written.tolist()):
      start, stop = partitioning.process_block_range(store.num_blocks, process, processes)
      files[part_name(process, processes)] = {"size": size, "sha256": np.asarray(digest, np.int64).tobytes().hex(),
                                              "rows": [start, stop]}
    if backend.writes_assets:
      files.update(_write_assets(data, files, store.num_blocks, backend))
    storage.write_json_once(commit, {
        "format": COMMIT_FORMAT,
        "train_step": int(train_step),
        "data": f"{DATA}/{name}",
        "files": files,
        "num_blocks": int(store.num_blocks),
        "dim": int(embeddings.shape[1]),
        "dtype": str(embeddings.dtype),
        "corpus_fingerprint": store.manifest["corpus_fingerprint"],
        "tokenizer": store.manifest["tokenizer"],
        "backend": backend.name,
        "writer": writer,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    for old in committed_steps(root)[:-keep]:
      remove_index(root, old)
    logging.info("published index step %d (%d x %d in %d part(s), %s): %s", train_step, store.num_blocks,
                 embeddings.shape[1], processes, backend.name, commit)
  partitioning.barrier(f"index {train_step} committed")
  return commit


def _write_assets(data: epath.Path, parts: dict[str, dict], num_blocks: int, backend: IndexBackend) -> dict[str, dict]:
  """`backend`'s assets built from the written parts (read back verified) and uploaded under `data/<name>/`; their
  `files` table entries."""
  embeddings, _ = _read_parts(data, [(name, entry, *entry["rows"]) for name, entry in parts.items()], num_blocks)
  files = {}
  with tempfile.TemporaryDirectory() as local:  # backends write local files; upload them (GCS-safe)
    backend.write_assets(embeddings, Path(local))
    storage.make_dirs(data / backend.name)
    for file in sorted(Path(local).iterdir()):
      raw = file.read_bytes()
      (data / backend.name / file.name).write_bytes(raw)
      files[f"{backend.name}/{file.name}"] = {"size": len(raw), "sha256": storage.sha256(raw)}
  return files


def remove_index(index_dir: storage.PathLike, step: int) -> None:
  """Deletes a committed index: the commit object first (readers stop trusting it), then its data."""
  commit = commit_path(index_dir, step)
  try:
    data = storage.as_path(index_dir) / _data_name(json.loads(storage.read_bytes(commit)), commit)
  except (OSError, ValueError) as e:
    logging.error("not removing index %s: its commit cannot be read (%s)", commit, e)
    return
  commit.unlink()
  if data.exists():
    data.rmtree()


def remove_uncommitted(index_dir: storage.PathLike, writer: str = "refresher") -> list[str]:
  """Removes data folders that no commit names: `writer`'s own (publishes it was killed in), and any writer's
  older than the oldest commit (a keep-N removal killed between the commit and its data).  Returns their names."""
  root = storage.as_path(index_dir)
  if not (root / DATA).exists():
    return []
  steps, named = committed_steps(root), set()
  for step in steps:
    try:
      named.add(_data_name(json.loads(storage.read_bytes(commit_path(root, step))), commit_path(root, step)))
    except (FileNotFoundError, ValueError):  # removed meanwhile, or unreadable: never delete what it may name
      return []

  def is_stale(name: str) -> bool:
    match = re.fullmatch(r"(\d+)-([\w.]+)-[0-9a-f]+", name)
    if match is None or f"{DATA}/{name}" in named:
      return False
    return match.group(2) == writer or (bool(steps) and int(match.group(1)) < steps[0])

  stale = sorted(p for p in (root / DATA).iterdir() if is_stale(p.name))
  for path in stale:
    path.rmtree()
  return [p.name for p in stale]


def _non_finite_rows(embeddings: np.ndarray) -> int:
  """How many rows hold a NaN or inf, checked a chunk of rows at a time (no full-size temporary)."""
  if embeddings.dtype.kind in "biu":
    return 0
  rows = max(1, _CHUNK // max(1, embeddings.shape[1] * embeddings.dtype.itemsize))
  return sum(int(np.count_nonzero(~np.isfinite(embeddings[start : start + rows]).all(axis=1)))
             for start in range(0, len(embeddings), rows))


def _data_name(commit: dict, where: epath.Path) -> str:
  name = commit.get("data") if isinstance(commit, dict) else None
  if not isinstance(name, str) or not re.fullmatch(rf"{DATA}/[\w.-]+", name):
    raise PublishedIndexError(f"{where}: field 'data' is {name!r}, not a data folder of this index")
  return name


def read_commit(index_dir: storage.PathLike, step: int, store: BlockStore, attempts: int = 4) -> dict[str, Any]:
  """Index `step`'s commit object, checked against the block store."""
  path = commit_path(index_dir, step)
  raw = storage.read_bytes(path, attempts)
  try:
    commit = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PublishedIndexError(f"{path}: unreadable commit object ({e})") from e
  _data_name(commit, path)
  backend = commit.get("backend")
  if not isinstance(backend, str) or not re.fullmatch(r"\w+", backend):
    raise PublishedIndexError(f"{path}: field 'backend' is {backend!r}, not the name of an index backend")
  files = commit.get("files")
  if not isinstance(files, dict):
    raise PublishedIndexError(f"{path}: field 'files' is not a table of files")
  for name, entry in files.items():
    if not re.fullmatch(rf"embeddings(-\d{{5}}-of-\d{{5}})?\.npy|{backend}/\w[\w.-]*", name) or not isinstance(
        entry, dict):
      raise PublishedIndexError(f"{path}: field 'files' lists {name!r}: {entry!r}, not a file of an index")
  expected = {
      "train_step": step,
      "num_blocks": store.num_blocks,
      "corpus_fingerprint": store.manifest["corpus_fingerprint"],
      "tokenizer": store.manifest["tokenizer"],
  }
  for field, want in expected.items():
    if commit.get(field) != want:
      raise PublishedIndexError(
          f"{path}: field {field!r} is {commit.get(field)!r} but block store {store.path} has "
          f"{want!r}; this index was built for another corpus" if field != "train_step" else
          f"{path}: field 'train_step' is {commit.get(field)!r}, the commit's name says {step}")
  embedding_parts(commit, path)
  return commit


def embedding_parts(commit: dict[str, Any], where: storage.PathLike) -> list[tuple[str, dict, int, int]]:
  """The commit's embedding files in row order, (name, entry, first row, end row), checked to cover every block
  once: format 2's parts (one per process that wrote it, `part_name`), or format 1's single embeddings.npy."""
  files, num_blocks = commit["files"], commit["num_blocks"]
  names = sorted(name for name in files if "/" not in name)  # the rest: the backend's assets
  if commit.get("format") == 1 and names == [EMBEDDINGS]:
    return [(EMBEDDINGS, files[EMBEDDINGS], 0, num_blocks)]
  if commit.get("format") != COMMIT_FORMAT or not names or names != [part_name(i, len(names))
                                                                      for i in range(len(names))]:
    raise PublishedIndexError(f"{where}: format {commit.get('format')!r} with embedding files {names}: not a "
                              f"format-1 index's {EMBEDDINGS} nor format {COMMIT_FORMAT}'s complete set of parts")
  parts, end = [], 0
  for name in names:
    rows = files[name].get("rows")
    if not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows) and rows[0] == end
            and rows[1] >= end):
      raise PublishedIndexError(f"{where}: files[{name!r}]['rows'] is {rows!r}; the parts must cover rows "
                                f"0:{num_blocks} in order, the next one starting at {end}")
    parts.append((name, files[name], *rows))
    end = rows[1]
  if end != num_blocks:
    raise PublishedIndexError(f"{where}: the embedding parts cover rows 0:{end}, not the {num_blocks} blocks")
  return parts


def _read_verified_npy(path: epath.Path, entry: dict, copy: BinaryIO | None,
                       copy_at: int = 0) -> tuple[tuple[int, ...], np.dtype, int, int]:
  """A plain numeric .npy file checked against its commit entry in one streaming pass (size, sha256, non-finite
  rows counted chunk by chunk; nothing materialised), its array's bytes written to `copy` at `copy_at` if given:
  (shape, dtype, the array's offset in the file, how many rows hold a NaN or inf)."""
  with (path.open("rb") if storage.is_remote(path) else open(os.fspath(path), "rb")) as raw:
    if copy is not None:
      copy.seek(copy_at)
      copy.truncate()
    f = storage.HashingFile(raw)
    try:
      version = np.lib.format.read_magic(f)
      header = _NPY_HEADERS.get(version)
      if header is None:
        raise ValueError(f"format version {version}")
      shape, fortran, dtype = header(f)  # a literal dict: no pickle, no code
    except ValueError as e:
      raise PublishedIndexError(f"{path}: not a .npy file ({e})") from e
    if dtype.hasobject or fortran or dtype.kind not in "fiu":
      raise PublishedIndexError(f"{path}: dtype {dtype} (fortran order {fortran}) is not a plain numeric array")
    offset, total = f.size, int(np.prod(shape)) * dtype.itemsize
    row_bytes = max(1, int(np.prod(shape[1:])) * dtype.itemsize)
    non_finite, pending, read = 0, b"", 0
    while read < total:
      chunk = f.read(min(max(row_bytes, _CHUNK // row_bytes * row_bytes), total - read))
      if not chunk:
        break
      read += len(chunk)
      if copy is not None:
        copy.write(chunk)
      if dtype.kind == "f":
        data = pending + chunk
        usable = len(data) - len(data) % row_bytes
        rows = np.frombuffer(data[:usable], dtype).reshape(-1, *shape[1:]) if len(shape) > 1 else np.frombuffer(
            data[:usable], dtype)[:, None]
        non_finite += _non_finite_rows(rows.reshape(len(rows), -1))
        pending = data[usable:]
    extra = f.read(1)
    got = f.entry()
  if got["size"] != entry.get("size") or extra:
    raise PublishedIndexError(f"{path}: {got['size']}{'+' if extra else ''} bytes, the commit says "
                              f"{entry.get('size')}")
  if got["sha256"] != entry.get("sha256"):
    raise PublishedIndexError(f"{path}: sha256 does not match the commit (corrupt embedding file)")
  return shape, dtype, offset, non_finite


def _read_parts(data: epath.Path, parts: list[tuple[str, dict, int, int]], num_blocks: int,
                attempts: int = 4) -> tuple[np.ndarray, int]:
  """The parts of an index (`embedding_parts`), each verified while streamed (`_read_verified_npy`, transient
  errors retried), as one read-only [num_blocks, dim] memory map: a single local part is mapped where it is
  (written once, never replaced); remote parts, or several, are streamed into one unnamed local temporary file,
  freed with the map.  Returns (the map, how many rows hold a NaN or inf).  Readers touch only the rows they
  use (`ExactSearcher.place`)."""
  if len(parts) == 1 and not storage.is_remote(data):
    name, entry, _, _ = parts[0]
    shape, dtype, offset, non_finite = _read_part(data / name, entry, None, 0, attempts)
    _check_part_shape(data / name, shape, num_blocks, shape)
    return (np.memmap(os.fspath(data / name), dtype, "r", offset=offset, shape=shape) if num_blocks else
            np.zeros(shape, dtype)), non_finite
  with tempfile.TemporaryFile() as copy:
    non_finite, first, at = 0, None, 0
    for name, entry, start, stop in parts:
      shape, dtype, _, bad = _read_part(data / name, entry, copy, at, attempts)
      first = first or (shape, dtype)
      _check_part_shape(data / name, shape, stop - start, first[0])
      if dtype != first[1]:
        raise PublishedIndexError(f"{data / name}: dtype {dtype}, the first part's is {first[1]}")
      non_finite, at = non_finite + bad, at + int(np.prod(shape)) * dtype.itemsize
    shape = (num_blocks, *first[0][1:])
    if not num_blocks:
      return np.zeros(shape, first[1]), 0
    copy.flush()
    return np.memmap(copy, first[1], "r", offset=0, shape=shape), non_finite


def _read_part(path: epath.Path, entry: dict, copy: BinaryIO | None, copy_at: int,
               attempts: int) -> tuple[tuple[int, ...], np.dtype, int, int]:
  """`_read_verified_npy`, transient errors retried; a missing file is a FileNotFoundError naming it."""
  try:
    return storage.retrying(lambda: _read_verified_npy(path, entry, copy, copy_at), str(path), attempts)
  except FileNotFoundError as e:
    raise FileNotFoundError(errno.ENOENT, "listed by the commit but not found", str(path)) from e


def _check_part_shape(path: epath.Path, shape: tuple[int, ...], rows: int, first: tuple[int, ...]) -> None:
  if len(shape) != 2 or shape[0] != rows or shape[1:] != first[1:]:
    raise PublishedIndexError(f"{path}: shape {shape}, the commit says {rows} rows of width {first[1:]}")


def _missing(root: epath.Path, step: int, path: epath.Path) -> Exception:
  """The error for `path`, listed by commit `step`, not found: superseded (FileNotFoundError) if the commit is
  gone too (the publisher's keep-N removes the commit first), else wrong content (PublishedIndexError)."""
  commit = commit_path(root, step)
  if not commit.exists():
    return FileNotFoundError(f"{commit}: removed while {path} was read (superseded)")
  return PublishedIndexError(f"{path}: missing, but the commit {commit} exists and lists it")


def load_index(index_dir: storage.PathLike, step: int, store: BlockStore,
               attempts: int = 4) -> tuple[dict[str, Any], np.ndarray]:
  """Reads and verifies committed index `step` (transient I/O errors retried): (commit, embeddings), the embeddings
  a read-only memory map of all its parts (`_read_parts`: streamed once, never materialised).

  Every file the commit lists must exist; embeddings with a NaN or inf row are refused (PublishedIndexError)."""
  root = storage.as_path(index_dir)
  commit = read_commit(root, step, store, attempts)
  parts = embedding_parts(commit, commit_path(root, step))
  data = root / commit["data"]
  for name in sorted(set(commit["files"]) - {p[0] for p in parts}):  # assets: read later, by their backend
    if not storage.retrying((data / name).exists, str(data / name), attempts):
      raise _missing(root, step, data / name)
  try:
    embeddings, non_finite = _read_parts(data, parts, commit["num_blocks"], attempts)
  except FileNotFoundError as e:
    raise _missing(root, step, epath.Path(e.filename)) from e
  if embeddings.shape != (commit["num_blocks"], commit["dim"]):
    raise PublishedIndexError(f"{data}: shape {embeddings.shape} != commit ({commit['num_blocks']}, {commit['dim']})")
  if non_finite:
    raise PublishedIndexError(f"{commit_path(root, step)}: {non_finite} of {len(embeddings)} rows of {data} are not "
                              "finite (NaN or inf)")
  return commit, embeddings


def local_assets(index_dir: storage.PathLike, commit: dict) -> Path:
  """Backends read local files: copies the commit's backend assets (`<backend>/...`) to a new local folder, each
  one verified."""
  root = storage.as_path(index_dir)
  local = Path(tempfile.mkdtemp(prefix=f"{commit['backend']}-"))
  for name, entry in commit["files"].items():
    if "/" not in name:
      continue
    source = root / commit["data"] / name
    raw = storage.read_bytes(source)
    if len(raw) != entry["size"] or storage.sha256(raw) != entry["sha256"]:
      shutil.rmtree(local)
      raise PublishedIndexError(f"{source}: size or sha256 does not match the commit (corrupt {commit['backend']} "
                                "asset)")
    (local / name.split("/", 1)[1]).write_bytes(raw)
  return local


class IndexPoller:
  """Polls `commits/` in a background thread, loads and prepares new indexes off the training thread.

  `prepare(commit, embeddings, index_dir)` runs in the background thread (read, verify, place on device or
  load ScaNN assets); the training loop calls `maybe_swap(train_step)` between steps, which only hands the
  prepared object to `install(commit, prepared)`: a reference swap, same shapes, no recompilation.  It returns
  `index_step`, `index_staleness` and `index_read_failures` for the step's metrics.

  An index whose committed content is wrong (hash, size, shape, corpus, NaN or inf embeddings, a listed file
  missing) is rejected (logged; the next one is read).  Any other error in the thread is logged and counted;
  after `max_failures` consecutive ones every process stops with an `IndexReadError` naming the index.  All
  processes swap together, at a step where each has the same index.

  `max_staleness` bounds the staleness: a step more than that many steps past the installed index
  (past step 0 while none is installed) waits for a newer one, for at most `wait_seconds`.  A wait that times
  out says whether no index was committed or commits exist but none could be loaded (and the last reason).
  """

  def __init__(
      self,
      index_dir: storage.PathLike,
      store: BlockStore,
      install: Callable[[dict, Any], None],
      prepare: Callable[[dict, np.ndarray, epath.Path], Any] = lambda commit, embeddings, index_dir: embeddings,
      poll_seconds: float = 5.0,
      max_staleness: int | None = None,
      wait_seconds: float | None = 3600.0,
      max_failures: int = 5,
      read_attempts: int = 4,
  ):
    if max_staleness is not None and max_staleness < 0:
      raise InputError(f"max_staleness must be >= 0 or None, got {max_staleness}")
    if max_failures < 1:
      raise InputError(f"max_failures must be >= 1, got {max_failures}")
    self.index_dir = storage.as_path(index_dir)
    self.store, self.install, self.prepare, self.poll_seconds = store, install, prepare, poll_seconds
    self.max_staleness, self.wait_seconds, self.max_failures = max_staleness, wait_seconds, max_failures
    self.read_attempts = read_attempts  # per file, transient errors retried with backoff (storage.retrying)
    self.index_step: int | None = None
    self.swaps = 0
    self.read_failures = 0  # all failed reads so far (a metric)
    self.rejected: set[int] = set()
    self._failures = 0  # consecutive
    self._error: str | None = None
    self._reading = self.index_dir / COMMITS  # what the thread reads now (named when it gives up)
    self._listed: list[int] = []  # the committed steps last listed
    self._problem: str | None = None  # why the last index could not be loaded (named when a wait times out)
    self._ready: tuple[dict, Any] | None = None
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._loaded_step = -1
    self._thread = threading.Thread(target=self._poll, name="index-poller", daemon=True)

  def start(self) -> IndexPoller:
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)

  def load_newest(self) -> bool:
    """Loads the newest committed, not rejected index if it is newer than the last one loaded.

    Wrong content rejects that index (logged); an I/O error propagates (the poll loop counts it)."""
    self._reading = self.index_dir / COMMITS
    self._listed = committed_steps(self.index_dir)
    steps = [s for s in self._listed if s not in self.rejected]
    if not steps or steps[-1] <= self._loaded_step:
      return False
    step = steps[-1]
    self._reading = commit_path(self.index_dir, step)
    try:
      commit, embeddings = load_index(self.index_dir, step, self.store, self.read_attempts)
      prepared = self.prepare(commit, embeddings, self.index_dir)
    except FileNotFoundError:  # removed by the publisher's keep-N meanwhile: a newer one exists
      return False
    except PublishedIndexError as e:
      where = str(commit_path(self.index_dir, step))
      self._problem = f"rejected index {step}: {e if where in str(e) else f'{where}: {e}'}"
      logging.error("%s", self._problem)
      self.rejected.add(step)
      return False
    with self._lock:
      self._ready = (commit, prepared)
    self._loaded_step = step
    return True

  def _poll(self) -> None:
    while not self._stop.is_set():
      try:
        self.load_newest()
        self._failures = 0
      except Exception as e:  # noqa: BLE001 - surfaced: logged, counted, fatal after max_failures in a row
        self._failures += 1
        self.read_failures += 1
        self._problem = f"reading {self._reading} failed: {type(e).__name__}: {e}"
        logging.exception("index poller: reading %s/%s failed (%d in a row)", self.index_dir, COMMITS, self._failures)
        if self._failures >= self.max_failures:
          self._error = f"{self._reading}: {self._failures} consecutive failed reads; last: {type(e).__name__}: {e}"
          return
      self._stop.wait(self.poll_seconds)

  def wait_for_first(self, timeout: float | None = None) -> None:
    """Blocks until an index is available (a trainer started before any index exists)."""
    start = time.monotonic()
    logged = False
    while self.index_step is None:
      if not self._thread.is_alive() and self._error is None:
        self.load_newest()
      self.maybe_swap(None)
      if self.index_step is not None:
        break
      if not logged:
        logging.info("waiting for a published index in %s/%s ...", self.index_dir, COMMITS)
        logged = True
      if timeout is not None and time.monotonic() - start > timeout:
        raise TimeoutError(self._none_loaded(0, f"no index was published in {self.index_dir}/{COMMITS} within "
                                                f"{timeout} s", f"within {timeout} s"))
      time.sleep(min(self.poll_seconds, 0.5))

  def _none_loaded(self, needed: int, unpublished: str, within: str) -> str:
    """Why no index of step >= `needed` is installed: `unpublished` if none was committed, else the last reason."""
    steps = [s for s in self._listed if s >= needed]
    if not steps:
      return unpublished + (f" (last error: {self._problem})" if self._problem else "")
    return (f"commits of step >= {needed} exist in {self.index_dir}/{COMMITS} (steps {steps}) but none could be "
            f"loaded {within}: {self._problem or 'no error recorded (still reading?)'}")

  def maybe_swap(self, train_step: int | None) -> dict[str, float]:
    """Installs the prepared index; with several processes only once every process has prepared the same one.

    With `max_staleness`, first waits until the installed index is at most that many steps behind `train_step`.
    """
    self._swap_if_ready()
    if self.max_staleness is not None and train_step is not None:
      self._wait_until_fresh(train_step)
    if self.index_step is None or train_step is None:
      return {}
    return {"index_step": float(self.index_step), "index_staleness": float(train_step - self.index_step),
            "index_read_failures": float(self.read_failures)}

  def _wait_until_fresh(self, train_step: int) -> None:
    # Every process loops the same number of times: the condition only reads the (agreed) installed step.
    needed = train_step - self.max_staleness
    start = time.monotonic()
    logged = False
    while (self.index_step if self.index_step is not None else 0) < needed:
      if not logged:
        logging.info("step %d: waiting for an index of step >= %d in %s/%s (max staleness %d)",
                     train_step, needed, self.index_dir, COMMITS, self.max_staleness)
        logged = True
      timed_out = self.wait_seconds is not None and time.monotonic() - start > self.wait_seconds
      if partitioning.agree(int(timed_out)):  # process 0's clock decides for all
        within = f"within {self.wait_seconds} s (max staleness {self.max_staleness})"
        raise TimeoutError(f"step {train_step}: " + self._none_loaded(
            needed, f"no index of step >= {needed} was published in {self.index_dir}/{COMMITS} {within}; is the "
            "refresh job running?", within))
      if not self._thread.is_alive() and self._error is None:
        self.load_newest()
      time.sleep(min(self.poll_seconds, 0.5))
      self._swap_if_ready()

  def _swap_if_ready(self) -> None:
    with self._lock:
      ready = self._ready
    # One collective: each process's prepared step and whether its poller has given up.
    states = partitioning.gather_ints([ready[0]["train_step"] if ready is not None else -1, self._error is not None])
    if states[:, 1].any():
      failed = [int(i) for i in np.flatnonzero(states[:, 1])]
      raise IndexReadError(self._error or f"process(es) {failed} could not read the index in {self.index_dir} "
                           "(see their logs)")
    if ready is None or not (states[:, 0] == states[0, 0]).all():
      return
    with self._lock:
      if self._ready is ready:
        self._ready = None
    commit, prepared = ready
    self.install(commit, prepared)
    self.index_step = commit["train_step"]
    self.swaps += 1
    logging.info("swapped in index step %d", self.index_step)


class LiveIndex:
  """The searcher a trainer queries, replaced between steps by an `IndexPoller` (`poller`).

  `search.backend` (`backends.BACKENDS`; None: `SearchConfig()`) loads the first index; each later one becomes
  `searcher.with_index(...)` in the poller's thread (placed on the mesh, or its assets loaded) and is swapped in
  by reference between steps, the compiled search reused.  Index rows are placed by `rules` ("docs").  A backend
  that writes assets (ScaNN) can only search commits published with it; the others search any commit.
  """

  def __init__(self, mesh, search: SearchConfig | None = None,
               rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES):
    self.mesh, self.rules = mesh, rules
    self.backend = get_backend(search or SearchConfig())
    self.searcher: Searcher | None = None

  def prepare(self, commit: dict, embeddings: np.ndarray, index_dir: epath.Path) -> Searcher:
    assets = None
    if self.backend.writes_assets:
      if commit["backend"] != self.backend.name:
        raise InputError(f"{commit_path(index_dir, commit['train_step'])}: published with backend "
                         f"{commit['backend']!r}, without {self.backend.name} assets; searching with backend "
                         f"{self.backend.name!r} needs indexes published with it (mips.SearchConfig.backend, "
                         "the refresh job's too)")
      assets = local_assets(index_dir, commit)
    try:
      if self.searcher is None:
        return self.backend.load(embeddings, assets, self.mesh, self.rules)
      return self.searcher.with_index(embeddings, assets)
    finally:
      if assets is not None:
        shutil.rmtree(assets)

  def install(self, commit: dict, prepared: Searcher) -> None:
    self.searcher = prepared

  def poller(self, index_dir: storage.PathLike, store: BlockStore, poll_seconds: float = 5.0,
             max_staleness: int | None = None, wait_seconds: float | None = 3600.0,
             max_failures: int = 5) -> IndexPoller:
    return IndexPoller(index_dir, store, self.install, self.prepare, poll_seconds, max_staleness, wait_seconds,
                       max_failures)


def load_searcher(index_dir: storage.PathLike, step: int, store: BlockStore, mesh, search: SearchConfig | None = None,
                  rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> tuple[np.ndarray, Searcher]:
  """Index `step`'s verified embeddings and a searcher of `search.backend` over them (a frozen index)."""
  commit, embeddings = load_index(index_dir, step, store)
  return embeddings, LiveIndex(mesh, search, rules).prepare(commit, embeddings, storage.as_path(index_dir))
