"""Block stores on object stores: upload a locally built store (manifest last), stage one onto a host's disk.

`BlockStore` memory-maps local files, so on a pod the store lives on GCS and every host stages a copy first:

  python launch/build_blocks.py --out=gs://BUCKET/blocks ...                              # once
  python launch/stage_blocks.py --source=gs://BUCKET/blocks --dest=/tmp/realm-jax-blocks  # on every host

The manifest is the store's commit object: an upload writes it last, so staging reads it first and refuses a
store without one (an unfinished upload).  Each file of its `files` table {name: {size, sha256}} is streamed
into a unique temporary sibling of the destination (`.<dest>.staging-<id>`, removed on failure) and checked;
the manifest is written last and the directory renamed into place, so a destination is complete or absent.
Two processes staging one store into one destination both end with the same verified copy.  A destination
that already holds the store (same manifest bytes and file sizes, and the sha256s recorded in its
`.staged.json` stamp) is used as it is, without re-hashing; anything else there is refused, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath
from tqdm.auto import tqdm

from realm_jax import storage
from realm_jax.data.blocks import FORMAT_VERSION, MANIFEST, BlockStoreError, data_file_names

STAMP = ".staged.json"  # {manifest_sha256, files: {name: {size, sha256, mtime_ns}}} of a verified local copy
CHUNK_BYTES = 64 << 20


def check_new_remote_store(dest: storage.PathLike) -> epath.Path:
  """`dest` when nothing exists under it yet and it can be written; refused otherwise (nothing is overwritten)."""
  dest = storage.as_path(dest)
  if storage.retrying(dest.exists, str(dest)):
    raise BlockStoreError(f"{dest}: already exists; a block store is uploaded only to a new prefix, never over "
                          f"what it did not create: choose another --out, or delete {dest} first")
  return storage.check_writable(dest)


def upload_block_store(local_dir: storage.PathLike, dest: storage.PathLike) -> epath.Path:
  """Uploads the local store at `local_dir` to the new prefix `dest`: every file, then the manifest last."""
  local_dir = storage.local_path(local_dir, "the block store to upload", "build it locally first")
  manifest_bytes = (local_dir / MANIFEST).read_bytes()
  files = _parse_manifest(manifest_bytes, local_dir / MANIFEST)["files"]
  dest = check_new_remote_store(dest)
  with tqdm(total=sum(e["size"] for e in files.values()), desc="upload blocks", unit="B", unit_scale=True,
            mininterval=2.0) as progress:
    for name, entry in files.items():
      storage.retrying(lambda name=name: _upload_file(local_dir / name, dest / name), f"upload {dest / name}")
      progress.update(entry["size"])
  storage.write_once(dest / MANIFEST, manifest_bytes)
  return dest


def stage_block_store(source: storage.PathLike, dest: storage.PathLike) -> epath.Path:
  """A verified local copy of the block store at `source` (gs:// or local) in `dest`; returns `dest`."""
  source = storage.as_path(source)
  dest = storage.local_path(dest, "the staged block store", "give a directory on this host's disk")
  try:
    manifest_bytes = storage.read_bytes(source / MANIFEST)
  except FileNotFoundError:
    raise BlockStoreError(f"{source}: no {MANIFEST}, so not a finished block store (an upload writes it last); "
                          "upload it again with launch/build_blocks.py --out=...") from None
  files = _parse_manifest(manifest_bytes, source / MANIFEST)["files"]
  if _holds_store(dest, source, manifest_bytes, files):
    return dest
  storage.make_dirs(dest.parent)
  temp = dest.parent / f".{dest.name}.staging-{uuid.uuid4().hex}"
  temp.mkdir()
  try:
    stamp = {}
    with tqdm(total=sum(e["size"] for e in files.values()), desc="stage blocks", unit="B", unit_scale=True,
              mininterval=2.0) as progress:
      for name, entry in files.items():
        _copy_checked(source / name, temp / name, entry, progress)
        stamp[name] = {**entry, "mtime_ns": os.stat(temp / name).st_mtime_ns}
    _write_stamp(temp, manifest_bytes, stamp)
    (temp / MANIFEST).write_bytes(manifest_bytes)
    try:
      os.rename(temp, dest)  # replaces nothing but an empty directory
    except OSError:
      if not _holds_store(dest, source, manifest_bytes, files):  # True when another process staged it first
        raise
  finally:
    if temp.exists():
      shutil.rmtree(temp)
  return dest


def _parse_manifest(data: bytes, where: epath.Path) -> dict[str, Any]:
  """The manifest, checked to be stageable: this format, and a `files` entry for every file of the store."""
  try:
    manifest = json.loads(data)
  except json.JSONDecodeError as e:
    raise BlockStoreError(f"{where}: corrupt manifest ({e})") from e
  if manifest.get("format_version") != FORMAT_VERSION:
    raise BlockStoreError(f"{where}: format_version {manifest.get('format_version')}, this code reads "
                          f"{FORMAT_VERSION}")
  files = manifest.get("files")
  if not isinstance(files, dict):
    raise BlockStoreError(f"{where}: no 'files' table (sizes and sha256s), so this store cannot be staged or "
                          "uploaded; rebuild it with launch/build_blocks.py")
  missing = sorted(set(data_file_names(manifest)) - set(files))
  unsafe = sorted(n for n in files if n in (MANIFEST, STAMP) or n.startswith(".") or "/" in n or "\\" in n)
  if missing or unsafe:
    raise BlockStoreError(f"{where}: 'files' table lacks {missing} or names files outside the store {unsafe}")
  return manifest


def _holds_store(dest: epath.Path, source: epath.Path, manifest_bytes: bytes, files: dict[str, dict]) -> bool:
  """True when `dest` holds this store (verified); False when it is absent or an empty directory; else refused."""
  keep = "staging never deletes or overwrites it: remove it, or choose another --dest"
  if not dest.exists():
    return False
  if not dest.is_dir():
    raise BlockStoreError(f"{dest}: exists and is not a directory; {keep}")
  names = os.listdir(dest)
  if not names:
    return False
  if MANIFEST not in names:
    raise BlockStoreError(f"{dest}: exists and is not a block store (no {MANIFEST}); {keep}")
  if (dest / MANIFEST).read_bytes() != manifest_bytes:
    raise BlockStoreError(f"{dest}: holds another block store than {source} (the manifests differ); {keep}")
  _verify_local_copy(dest, manifest_bytes, files)
  return True


def _verify_local_copy(dest: epath.Path, manifest_bytes: bytes, files: dict[str, dict]) -> None:
  """Sizes of every file; sha256 only of files the stamp does not vouch for (then the stamp is updated)."""
  stamp = _read_stamp(dest, manifest_bytes)
  rehashed = False
  for name, entry in files.items():
    path = dest / name
    if not path.is_file():
      raise BlockStoreError(f"{path}: missing from a staged copy; remove {dest} and stage it again")
    stat = os.stat(path)
    if stat.st_size != entry["size"]:
      raise BlockStoreError(f"{path}: {stat.st_size} bytes, the manifest says {entry['size']}; remove {dest} and "
                            "stage it again")
    if stamp.get(name) == {**entry, "mtime_ns": stat.st_mtime_ns}:
      continue
    digest = _sha256_file(path)
    if digest != entry["sha256"]:
      raise BlockStoreError(f"{path}: sha256 {digest}, the manifest says {entry['sha256']}; remove {dest} and "
                            "stage it again")
    stamp[name] = {**entry, "mtime_ns": stat.st_mtime_ns}
    rehashed = True
  if rehashed:
    _write_stamp(dest, manifest_bytes, stamp)


def _read_stamp(dest: epath.Path, manifest_bytes: bytes) -> dict[str, dict]:
  try:
    stamp = json.loads((dest / STAMP).read_bytes())
  except (FileNotFoundError, json.JSONDecodeError):
    return {}
  return stamp["files"] if stamp.get("manifest_sha256") == storage.sha256(manifest_bytes) else {}


def _write_stamp(directory: epath.Path, manifest_bytes: bytes, files: dict[str, dict]) -> None:
  storage.write_json_once(directory / STAMP, {"manifest_sha256": storage.sha256(manifest_bytes), "files": files})


def _copy_checked(source: epath.Path, target: epath.Path, entry: dict[str, Any], progress: tqdm) -> None:
  """Streams `source` to the local `target`, checking its size and sha256 against its `files` entry."""
  try:
    with open(os.fspath(target), "wb") as raw:
      out = storage.HashingFile(raw)
      for chunk in _read_chunks(source):
        out.write(chunk)
        progress.update(len(chunk))
        if out.size > entry["size"]:
          break
  except OSError as e:
    raise storage.StorageError(f"{source}: cannot be staged ({type(e).__name__}: {e}); nothing was staged") from e
  got = out.entry()
  if got["size"] != entry["size"]:
    raise BlockStoreError(f"{source}: {got['size']}{'+' if got['size'] > entry['size'] else ''} bytes, the manifest "
                          f"says {entry['size']} (corrupt or replaced object); nothing was staged")
  if got["sha256"] != entry["sha256"]:
    raise BlockStoreError(f"{source}: sha256 {got['sha256']}, the manifest says {entry['sha256']} "
                          "(corrupt or replaced object); nothing was staged")


def _read_chunks(path: epath.Path) -> Iterator[bytes]:
  """The bytes of `path` in chunks; a transient error reopens it at the current offset (with backoff)."""
  offset, handle = 0, None

  def next_chunk() -> bytes:
    nonlocal handle
    try:
      if handle is None:
        handle = path.open("rb")
        handle.seek(offset)
      return handle.read(CHUNK_BYTES)
    except Exception:
      if handle is not None:
        handle.close()
        handle = None
      raise

  try:
    while chunk := storage.retrying(next_chunk, f"{path} (at byte {offset})"):
      offset += len(chunk)
      yield chunk
  finally:
    if handle is not None:
      handle.close()


def _upload_file(local: epath.Path, remote: epath.Path) -> None:
  with open(os.fspath(local), "rb") as source, remote.open("wb") as out:
    for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
      out.write(chunk)


def _sha256_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with open(os.fspath(path), "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()
