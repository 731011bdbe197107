"""Published MIPS indexes: atomic publication in `<index_dir>/committed/<step>/` and a hot-swapping reader.

A published index holds `embeddings.npy` (rows = block ids; read with allow_pickle=False),
`manifest.json` {train_step, num_blocks, dim, dtype, corpus_fingerprint, tokenizer, backend,
created, embeddings_sha256} and, for the ScaNN backend, `scann/` assets.  It is written under
`tmp/<step>/` and renamed into `committed/` only when complete, so readers never see a partial
index; the newest `keep` are kept.  Paths go through etils.epath (local disk or GCS).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from realm_jax import partitioning
from realm_jax.data.blocks import BlockStore
from realm_jax.retrieval.mips import ExactSearcher, ScannSearcher

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
SCANN_DIR = "scann"


class PublishedIndexError(ValueError):
  """A published index that is corrupt or does not match the block store."""


def _steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if re.fullmatch(r"\d+", p.name))


def committed_steps(index_dir: str | Path) -> list[int]:
  return _steps(epath.Path(index_dir) / "committed")


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def publish_index(
    index_dir: str | Path,
    train_step: int,
    embeddings: np.ndarray,
    store: BlockStore,
    backend: str = "exact",
    write_scann: Callable[[Path], None] | None = None,
    keep: int = 3,
    writer: str = "refresher",
) -> epath.Path:
  """Writes tmp/<step>-<writer>/, renames it to committed/<step>/, keeps the newest `keep` indexes.

  `writer` names the job (the refresher, or a trainer bootstrapping index 0) so that each job
  only ever cleans its own half-written staging folders.
  """
  if embeddings.ndim != 2 or len(embeddings) != store.num_blocks:
    raise ValueError(f"embeddings {embeddings.shape} do not have one row per block ({store.num_blocks})")
  root = epath.Path(index_dir)
  staging = root / "tmp" / f"{train_step}-{writer}"
  final = root / "committed" / str(train_step)
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(embeddings), allow_pickle=False)
  (staging / EMBEDDINGS).write_bytes(buffer.getvalue())
  if write_scann is not None:
    with tempfile.TemporaryDirectory() as local:  # ScaNN writes local files; copy them in (GCS-safe)
      write_scann(Path(local))
      (staging / SCANN_DIR).mkdir()
      for file in Path(local).iterdir():
        (staging / SCANN_DIR / file.name).write_bytes(file.read_bytes())
  manifest = {
      "train_step": int(train_step),
      "num_blocks": int(embeddings.shape[0]),
      "dim": int(embeddings.shape[1]),
      "dtype": str(embeddings.dtype),
      "corpus_fingerprint": store.manifest["corpus_fingerprint"],
      "tokenizer": store.manifest["tokenizer"],
      "backend": backend,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "embeddings_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
  }
  (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
  final.parent.mkdir(parents=True, exist_ok=True)
  if final.exists():
    final.rmtree()
  staging.rename(final)
  for old in _steps(root / "committed")[:-keep]:
    (root / "committed" / str(old)).rmtree()
  logging.info("published index step %d (%d x %d, %s) at %s", train_step, *embeddings.shape, backend, final)
  return final


def clean_staging(index_dir: str | Path, writer: str = "refresher") -> list[int]:
  """Removes half-written indexes that `writer` left behind when it was killed; returns their steps."""
  tmp = epath.Path(index_dir) / "tmp"
  if not tmp.exists():
    return []
  stale = sorted(p for p in tmp.iterdir() if re.fullmatch(rf"\d+-{re.escape(writer)}", p.name))
  for path in stale:
    path.rmtree()
  return sorted(int(p.name.split("-")[0]) for p in stale)


def load_index(path: str | Path, store: BlockStore) -> tuple[dict[str, Any], np.ndarray]:
  """Reads and verifies one committed index against the block store."""
  path = epath.Path(path)
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise PublishedIndexError(f"{path / MANIFEST}: unreadable index manifest ({e})") from e
  expected = {
      "num_blocks": store.num_blocks,
      "corpus_fingerprint": store.manifest["corpus_fingerprint"],
      "tokenizer": store.manifest["tokenizer"],
  }
  for field, want in expected.items():
    if manifest.get(field) != want:
      raise PublishedIndexError(
          f"{path / MANIFEST}: field {field!r} is {manifest.get(field)!r} but block store {store.path} has "
          f"{want!r}; this index was built for another corpus"
      )
  raw = (path / EMBEDDINGS).read_bytes()
  if hashlib.sha256(raw).hexdigest() != manifest.get("embeddings_sha256"):
    raise PublishedIndexError(f"{path / EMBEDDINGS}: sha256 does not match the manifest (corrupt embedding file)")
  try:
    embeddings = np.load(io.BytesIO(raw), allow_pickle=False)
  except ValueError as e:
    raise PublishedIndexError(f"{path / EMBEDDINGS}: not a plain numeric .npy file ({e})") from e
  if embeddings.shape != (manifest["num_blocks"], manifest["dim"]):
    raise PublishedIndexError(f"{path / EMBEDDINGS}: shape {embeddings.shape} != manifest "
                      f"({manifest['num_blocks']}, {manifest['dim']})")
  return manifest, embeddings


def local_scann_dir(path: str | Path) -> Path:
  """ScaNN reads local files: copies `<index>/scann` to a temporary local folder if needed."""
  source = epath.Path(path) / SCANN_DIR
  if "://" not in str(source):
    return Path(str(source))
  local = Path(tempfile.mkdtemp(prefix="scann-"))
  for file in source.iterdir():
    (local / file.name).write_bytes(file.read_bytes())
  return local


class IndexReader:
  """Polls `committed/` in a background thread, loads and prepares new indexes off the training thread.

  `prepare(manifest, embeddings, path)` runs in the background thread (read, verify, place on
  device or load ScaNN assets); the training loop calls `maybe_swap(train_step)` between steps,
  which only hands the prepared object to `install(manifest, prepared)`: a reference swap, same
  shapes, no recompilation.  It returns `index_step` and `index_staleness` for the step's metrics.

  `max_staleness` bounds the staleness: a step more than that many steps past the installed index
  (past step 0 while none is installed) waits for a newer one, for at most `wait_seconds`.  It keeps
  a run's retrieval as fresh as its gin says when the refresh job is slower than the trainer.
  """

  def __init__(
      self,
      index_dir: str | Path,
      store: BlockStore,
      install: Callable[[dict, Any], None],
      prepare: Callable[[dict, np.ndarray, epath.Path], Any] = lambda manifest, embeddings, path: embeddings,
      poll_seconds: float = 5.0,
      max_staleness: int | None = None,
      wait_seconds: float | None = 3600.0,
  ):
    if max_staleness is not None and max_staleness < 0:
      raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
    self.index_dir = epath.Path(index_dir)
    self.store, self.install, self.prepare, self.poll_seconds = store, install, prepare, poll_seconds
    self.max_staleness, self.wait_seconds = max_staleness, wait_seconds
    self.index_step: int | None = None
    self.swaps = 0
    self._ready: tuple[dict, Any] | None = None
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._loaded_step = -1
    self._thread = threading.Thread(target=self._poll, name="index-reader", daemon=True)

  def start(self) -> IndexReader:
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)

  def load_newest(self) -> bool:
    """Loads the newest committed index if it is newer than the last one loaded."""
    steps = committed_steps(self.index_dir)
    if not steps or steps[-1] <= self._loaded_step:
      return False
    step = steps[-1]
    path = self.index_dir / "committed" / str(step)
    try:
      manifest, embeddings = load_index(path, self.store)
    except FileNotFoundError:  # removed by the refresher's garbage collection meanwhile
      return False
    prepared = self.prepare(manifest, embeddings, path)
    with self._lock:
      self._ready = (manifest, prepared)
    self._loaded_step = step
    return True

  def _poll(self) -> None:
    while not self._stop.is_set():
      try:
        self.load_newest()
      except PublishedIndexError as e:  # keep training on the current index, say why
        logging.error("ignoring published index: %s", e)
        self._loaded_step = max(self._loaded_step, committed_steps(self.index_dir)[-1])
      self._stop.wait(self.poll_seconds)

  def wait_for_first(self, timeout: float | None = None) -> None:
    """Blocks until an index is available (a trainer started before any index exists)."""
    start = time.monotonic()
    logged = False
    while self.index_step is None:
      if not self._thread.is_alive():
        self.load_newest()
      self.maybe_swap(None)
      if self.index_step is not None:
        break
      if not logged:
        logging.info("waiting for a published index in %s/committed ...", self.index_dir)
        logged = True
      if timeout is not None and time.monotonic() - start > timeout:
        raise TimeoutError(f"no index was published in {self.index_dir}/committed within {timeout} s")
      time.sleep(min(self.poll_seconds, 0.5))

  def maybe_swap(self, train_step: int | None) -> dict[str, float]:
    """Installs the prepared index; with several processes only once every process has prepared the same one.

    With `max_staleness`, first waits until the installed index is at most that many steps behind `train_step`.
    """
    self._swap_if_ready()
    if self.max_staleness is not None and train_step is not None:
      self._wait_until_fresh(train_step)
    if self.index_step is None or train_step is None:
      return {}
    return {"index_step": float(self.index_step), "index_staleness": float(train_step - self.index_step)}

  def _wait_until_fresh(self, train_step: int) -> None:
    # Every process loops the same number of times: the condition only reads the (agreed) installed step.
    needed = train_step - self.max_staleness
    start = time.monotonic()
    logged = False
    while (self.index_step if self.index_step is not None else 0) < needed:
      if not logged:
        logging.info("step %d: waiting for an index of step >= %d in %s/committed (max staleness %d)",
                     train_step, needed, self.index_dir, self.max_staleness)
        logged = True
      timed_out = self.wait_seconds is not None and time.monotonic() - start > self.wait_seconds
      if partitioning.agree(int(timed_out)):  # process 0's clock decides for all
        raise TimeoutError(f"step {train_step}: no index of step >= {needed} was published in "
                           f"{self.index_dir}/committed within {self.wait_seconds} s (max staleness "
                           f"{self.max_staleness}); is the refresh job running?")
      if not self._thread.is_alive():
        self.load_newest()
      time.sleep(min(self.poll_seconds, 0.5))
      self._swap_if_ready()

  def _swap_if_ready(self) -> None:
    with self._lock:
      ready = self._ready
    if not partitioning.same_on_all_processes(ready[0]["train_step"] if ready is not None else -1):
      ready = None
    if ready is not None:
      with self._lock:
        if self._ready is ready:
          self._ready = None
      manifest, prepared = ready
      self.install(manifest, prepared)
      self.index_step = manifest["train_step"]
      self.swaps += 1
      logging.info("swapped in index step %d", self.index_step)


class LiveIndex:
  """The searcher a trainer queries, replaced between steps by an `IndexReader`.

  backend "exact": the first index builds an `ExactSearcher`; later ones are placed on the mesh in
  the reader's thread and swapped in by reference (compiled search reused).  backend "scann":
  the published ScaNN assets are loaded in the reader's thread.
  """

  def __init__(self, mesh, backend: str = "exact", approximate: bool = False):
    if backend not in ("exact", "scann"):
      raise ValueError(f"unknown index backend {backend!r} (use 'exact' or 'scann')")
    self.mesh, self.backend, self.approximate = mesh, backend, approximate
    self.searcher = None

  def prepare(self, manifest: dict, embeddings: np.ndarray, path: epath.Path):
    if self.backend == "scann":
      if manifest["backend"] != "scann":
        raise PublishedIndexError(f"{path}: published with backend {manifest['backend']!r}, no ScaNN assets")
      return ScannSearcher.load(local_scann_dir(path), manifest["num_blocks"])
    if self.searcher is None:
      return ExactSearcher(embeddings, self.mesh, self.approximate)
    return self.searcher.place(embeddings)

  def install(self, manifest: dict, prepared) -> None:
    if self.backend == "exact" and self.searcher is not None:
      self.searcher.embeddings = prepared
    else:
      self.searcher = prepared

  def reader(self, index_dir: str | Path, store: BlockStore, poll_seconds: float = 5.0,
             max_staleness: int | None = None, wait_seconds: float | None = 3600.0) -> IndexReader:
    return IndexReader(index_dir, store, self.install, self.prepare, poll_seconds, max_staleness, wait_seconds)
