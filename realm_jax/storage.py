"""Run-directory storage on local disk or an object store (gs://): one path type and WORKSPACE.md's write rules.

Every path a job reads or writes under a workdir is an `etils.epath.Path` (gcsfs backs gs://).  Object stores
have no atomic rename and no consistent view of a half-written prefix, so cross-job signals follow one rule:
data is written once under a name never reused, and becomes visible only through one small object written
last (`write_once`: a single-object write on GCS, a rename into place on local disk).  Reads retry
transient I/O errors (timeouts, 5xx, connection resets) with backoff (`retrying`).
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import aiohttp
import fsspec
from absl import logging
from etils import epath

PathLike = str | os.PathLike
T = TypeVar("T")


def configure_gcs(read_timeout_seconds: float = 120.0, connect_timeout_seconds: float = 60.0) -> None:
  """gcsfs settings for every filesystem created from now on (etils and fsspec cache theirs).

  Jobs poll what other jobs publish (checkpoints, index commits, TRAINING_DONE), so gcsfs must not answer from a
  listing it cached earlier in the process (its default keeps listings forever).  A request whose server goes
  silent for `read_timeout_seconds` fails and is retried (gcsfs's default waits forever); the timeout bounds the
  silence between reads, not a whole multi-GB transfer.
  """
  timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout_seconds, sock_read=read_timeout_seconds)
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).update(use_listings_cache=False, requests_timeout=timeout)


configure_gcs()

# gcsfs warns on every new bucket that it cannot read the bucket type without credentials (the emulator, or
# a TPU VM's default service account before it is asked); its real errors are logged at ERROR.
std_logging.getLogger("gcsfs").setLevel(std_logging.ERROR)


class StorageError(OSError):
  """A run directory or object that cannot be used (missing bucket, no credentials, read-only, ...)."""


def as_path(path: PathLike) -> epath.Path:
  """The one path type for workdirs, indexes, checkpoints and their files (`gs://...` stays remote)."""
  return epath.Path(path)


def is_remote(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def local_path(path: PathLike, what: str, how: str) -> epath.Path:
  """`path` when it is on local disk; a remote path is refused with `how` (the way to make a local copy)."""
  if is_remote(path):
    raise StorageError(f"{path}: {what} must be on local disk; {how}")
  return epath.Path(path)


def make_dirs(path: epath.Path) -> None:
  """Creates a local directory; a no-op on object stores (a prefix exists once an object is under it, and
  gcsfs would create a missing *bucket* for a bucket-level path)."""
  if not is_remote(path):
    path.mkdir(parents=True, exist_ok=True)


def write_once(path: PathLike, data: bytes) -> None:
  """Writes `path` so that a reader sees all of it or nothing: one object on GCS, a rename on local disk."""
  path = as_path(path)
  if is_remote(path):
    path.write_bytes(data)  # a single-object upload is atomic on GCS
    return
  make_dirs(path.parent)
  partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
  partial.write_bytes(data)
  os.replace(partial, path)


def write_json_once(path: PathLike, value: Any) -> None:
  write_once(path, json.dumps(value, indent=1).encode())


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class HashingFile:
  """Wraps an open binary file: counts and hashes every byte written to or read from it (one pass, no re-read)."""

  def __init__(self, file: BinaryIO):
    self.file, self.digest, self.size = file, hashlib.sha256(), 0

  def write(self, data) -> int:
    self.digest.update(data)
    self.size += memoryview(data).nbytes
    return self.file.write(data)

  def read(self, n: int = -1) -> bytes:
    data = self.file.read(n)
    self.digest.update(data)
    self.size += len(data)
    return data

  def entry(self) -> dict[str, Any]:
    """The `files` table entry of what went through: {size, sha256}."""
    return {"size": self.size, "sha256": self.digest.hexdigest()}


def is_transient(error: BaseException) -> bool:
  """I/O errors worth retrying: timeouts, connection resets, HTTP 408/429/5xx (never a missing file)."""
  if isinstance(error, FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError):
    return False
  if isinstance(error, ConnectionError | TimeoutError):
    return True
  try:
    from gcsfs.retry import is_retriable  # gcsfs's own classification (HttpError codes, aiohttp errors)
  except ImportError:
    return False
  return bool(is_retriable(error))


def retrying(fn: Callable[[], T], what: str, attempts: int = 4, backoff_seconds: float = 0.5) -> T:
  """`fn()`, retried on transient errors with exponential backoff; the last error is re-raised."""
  for attempt in range(attempts):
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - classified just below
      if attempt == attempts - 1 or not is_transient(e):
        raise
      delay = backoff_seconds * 2**attempt
      logging.warning("%s: transient error (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__, e,
                      attempt + 1, attempts - 1, delay)
      time.sleep(delay)
  raise AssertionError("unreachable")


def read_bytes(path: PathLike, attempts: int = 4, backoff_seconds: float = 0.5) -> bytes:
  path = as_path(path)
  return retrying(path.read_bytes, str(path), attempts, backoff_seconds)


def read_chunks(path: PathLike, chunk_bytes: int = 64 << 20) -> Iterator[bytes]:
  """The bytes of `path` in chunks; a transient error reopens it at the current offset (with backoff)."""
  path = as_path(path)
  offset, handle = 0, None

  def next_chunk() -> bytes:
    nonlocal handle
    try:
      if handle is None:
        handle = path.open("rb")
        handle.seek(offset)
      return handle.read(chunk_bytes)
    except Exception:
      if handle is not None:
        handle.close()
        handle = None
      raise

  try:
    while chunk := retrying(next_chunk, f"{path} (at byte {offset})"):
      offset += len(chunk)
      yield chunk
  finally:
    if handle is not None:
      handle.close()


def check_writable(workdir: PathLike) -> epath.Path:
  """Fails at start, naming `workdir`, when it cannot be written (missing bucket, no credentials, read-only):
  writes and deletes one probe object."""
  workdir = as_path(workdir)
  probe = workdir / f".write_probe-{uuid.uuid4().hex}"
  try:
    make_dirs(workdir)
    probe.write_bytes(b"realm-jax write probe\n")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - any failure here means the run cannot keep its outputs
    reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    raise StorageError(f"{workdir}: cannot write the run directory ({reason}); check that the bucket exists, "
                       "that credentials are set up and that they allow writing") from e
  return workdir
