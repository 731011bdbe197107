"""Block stores on object stores: upload a locally built store (manifest last), stage one onto a host's disk.

`BlockStore` memory-maps local files, so on a pod the store lives on GCS and every host stages a copy first:

  python launch/build_blocks.py --out=gs://BUCKET/blocks ...                              # once
  python launch/stage_blocks.py --source=gs://BUCKET/blocks --dest=/tmp/realm-jax-blocks  # on every host

The manifest is the store's commit object: an upload writes it last, so staging reads it first and refuses a
store without one (an unfinished upload).  An upload that fails deletes the objects it wrote (best effort: the
prefix was empty when it started, so they are its own) and re-raises.  Each file of its `files` table
{name: {size, sha256}} is streamed into a unique temporary sibling of the destination (`.<dest>.staging-<id>`,
removed on failure) and checked; the manifest is written last and the directory renamed into place, so a
destination is complete or absent.  Two processes staging one store into one destination both end with the same
verified copy.  A destination that already holds the store (same manifest bytes and file sizes, and the sha256s
recorded in its `.staged.json` stamp) is used as it is, without re-hashing; anything else there is refused, never
deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from typing import Any

from absl import logging
from etils import epath
from tqdm.auto import tqdm

from realm_jax import storage
from realm_jax.data.blocks import MANIFEST, STAMP, BlockStoreError, parse_manifest

CHUNK_BYTES = 64 << 20


def check_new_remote_store(dest: storage.PathLike) -> epath.Path:
  """`dest` when nothing exists under it yet and it can be written; refused otherwise (nothing is overwritten)."""
  dest = storage.as_path(dest)
  if storage.retrying(dest.exists, str(dest)):
    raise BlockStoreError(f"{dest}: already exists; a block store is uploaded only to a new prefix, never over "
                          f"what it did not create: choose another --out, or delete {dest} first")
  return storage.check_writable(dest)


def upload_block_store(local_dir: storage.PathLike, dest: storage.PathLike) -> epath.Path:
  """Uploads the local store at `local_dir` to the new prefix `dest`: every file, then the manifest last.

  On a failure the objects this upload wrote are deleted (best effort), then the error is re-raised.
  """
  local_dir = storage.local_path(local_dir, "the block store to upload", "build it locally first")
  manifest_bytes = (local_dir / MANIFEST).read_bytes()
  files = parse_manifest(manifest_bytes, local_dir / MANIFEST)["files"]
  dest = check_new_remote_store(dest)
  written = []  # objects this upload may have created, in upload order
  try:
    with tqdm(total=sum(e["size"] for e in files.values()), desc="upload blocks", unit="B", unit_scale=True,
              mininterval=2.0) as progress:
      for name, entry in files.items():
        written.append(dest / name)
        storage.retrying(lambda name=name: _upload_file(local_dir / name, dest / name), f"upload {dest / name}")
        progress.update(entry["size"])
    written.append(dest / MANIFEST)
    storage.write_once(dest / MANIFEST, manifest_bytes)
  except Exception:
    _delete_objects(reversed(written))  # the manifest first: the store stops looking finished at once
    raise
  return dest


def _delete_objects(paths: Iterable[epath.Path]) -> None:
  """Deletes what a failed upload wrote; a delete that fails is logged, not raised (the upload error is)."""
  for path in paths:
    try:
      storage.retrying(path.unlink, f"delete {path}")
    except FileNotFoundError:
      pass
    except Exception as e:  # noqa: BLE001 - best effort: the upload's own error is the one to report
      logging.warning("%s: left behind by a failed upload, cannot be deleted (%s: %s)", path, type(e).__name__, e)


def stage_block_store(source: storage.PathLike, dest: storage.PathLike) -> epath.Path:
  """A verified local copy of the block store at `source` (gs:// or local) in `dest`; returns `dest`."""
  source = storage.as_path(source)
  dest = storage.local_path(dest, "the staged block store", "give a directory on this host's disk")
  try:
    manifest_bytes = storage.read_bytes(source / MANIFEST)
  except FileNotFoundError:
    raise BlockStoreError(f"{source}: no {MANIFEST}, so not a finished block store (an upload writes it last); "
                          "upload it again with launch/build_blocks.py --out=...") from None
  files = parse_manifest(manifest_bytes, source / MANIFEST)["files"]
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
      for chunk in storage.read_chunks(source, CHUNK_BYTES):
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
