"""The on-disk block store that later jobs memory-map, and `build_block_store` (documents packed into blocks by
`realm_jax.data.packing`, written as a store).

Store layout (one local directory; a build writes the unique hidden sibling `.<name>.staging-<id>`, removed on any
failure, and renames it into place when complete, so a store is complete or absent):
  manifest.json                    counts, tokenizer fingerprint, corpus fingerprint, arrays, and
                                   `files` {file name: {size, sha256}} of every other file of the store
  <array>.bin                      raw little-endian arrays described in the manifest
  texts.jsonl + text_offsets.bin   per block {doc_id, title, text, uid}, random access by offset
Arrays are CSR: `title_ids`/`title_offsets`, `body_ids`/`body_offsets` (uint16 when the vocabulary has at most
65,536 ids, else int32; the accessors give int32), `sentence_starts`/`sentence_offsets` (body-relative), `spans`
[S, 3] (start, end, label id, body-relative, end exclusive)/`span_offsets`, `block_text`/`block_text_offsets` (the
UTF-8 bytes of each block's text: answer tests without parsing texts.jsonl); `uids` [N, 20] uint8 (SHA1 of
"title <sep> body").

A build's destination must be absent, an empty directory, or a block store (its manifest, the files of its
`files` table and maybe `.staged.json`, nothing else); a block store is replaced only with `overwrite=True`
(`--overwrite`): it is renamed aside, the new store renamed into place, then the old one deleted (only the files
its manifest names).  Anything else is refused and left untouched.

A store is memory-mapped from local disk.  Opening it checks the manifest (every key, with its JSON type), every
file's size against `files`, and that the arrays agree with `num_blocks` (stat and a few elements, no hashing);
`realm_jax.data.verify` (`launch/verify_blocks.py`) checks every sha256 and every block's contents too.  One on
GCS (`launch/build_blocks.py --out=gs://...`) is staged to each host first (`realm_jax.data.staging`,
`launch/stage_blocks.py`), checked against `files`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import reprlib
import shutil
import stat
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tqdm.auto import tqdm

from realm_jax import storage
from realm_jax.data.corpus import CorpusError, Document
from realm_jax.data.packing import TOKENIZER_BATCH, Block, BlockPacker
from realm_jax.data.tokenization import Tokenizer
from realm_jax.errors import InputError

FORMAT_VERSION = 2  # 2: uint16 word-piece ids where the vocabulary fits, block_text
MANIFEST = "manifest.json"
TEXTS = "texts.jsonl"
STAMP = ".staged.json"  # staging's {manifest_sha256, files: {name: {size, sha256, mtime_ns}}} of a verified copy

class BlockStoreError(InputError):
  """A block store that is missing, incomplete, corrupt or made for another vocabulary."""


def _staging_advice(source: storage.PathLike) -> str:
  """How to make a local copy of the block store at `source` (a gs:// path)."""
  return (f"stage it to each host first: python launch/stage_blocks.py --source={source} --dest=/local/dir, "
          "then point BLOCK_STORE at /local/dir")


# name -> (dtype, trailing shape)
ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "title_ids": ("int32", ()),
    "title_offsets": ("int64", ()),
    "body_ids": ("int32", ()),
    "body_offsets": ("int64", ()),
    "sentence_starts": ("int32", ()),
    "sentence_offsets": ("int64", ()),
    "spans": ("int32", (3,)),
    "span_offsets": ("int64", ()),
    "uids": ("uint8", (20,)),
    "text_offsets": ("int64", ()),
    "block_text": ("uint8", ()),
    "block_text_offsets": ("int64", ()),
}
ID_ARRAYS = ("title_ids", "body_ids")
# offsets array -> what it indexes (the rows of an array, or the bytes of texts.jsonl)
OFFSETS = {"title_offsets": "title_ids", "body_offsets": "body_ids", "sentence_offsets": "sentence_starts",
            "span_offsets": "spans", "text_offsets": TEXTS, "block_text_offsets": "block_text"}


def array_dtype(name: str, vocab_size: int) -> str:
  """The dtype of array `name` in a store of a `vocab_size` vocabulary: word-piece ids in uint16 when they fit."""
  if name in ID_ARRAYS:
    return "uint16" if vocab_size <= 1 << 16 else "int32"
  return ARRAYS[name][0]
_JSON_TYPES = {int: "an integer", str: "a string", dict: "a JSON object", list: "a JSON list"}
_REBUILD = "corrupt manifest; rebuild the store with launch/build_blocks.py"


def data_file_names(manifest: dict) -> list[str]:
  """The files of a store besides its manifest: one `<array>.bin` per array, and the texts."""
  return [f"{name}.bin" for name in manifest["arrays"]] + [TEXTS]


def _value(container: dict, key: str, kind: type, where: storage.PathLike, name: str, minimum: int | None = None):
  """`container[key]` (`name` in the manifest at `where`), refused unless it has the JSON type `kind`."""
  if key not in container:
    raise BlockStoreError(f"{where}: key {name!r}: missing ({_REBUILD})")
  value = container[key]
  if not isinstance(value, kind) or isinstance(value, bool) or (minimum is not None and value < minimum):
    bound = "" if minimum is None else f" >= {minimum}"
    raise BlockStoreError(f"{where}: key {name!r}: must be {_JSON_TYPES[kind]}{bound}, got {reprlib.repr(value)} "
                          f"({_REBUILD})")
  return value


def parse_manifest(data: bytes, where: storage.PathLike) -> dict[str, Any]:
  """The manifest in `data` (read from `where`), checked without touching the store's other files.

  This format_version; every key with its JSON type; a `files` entry {size, sha256} for exactly the store's data
  files; array shapes that agree with `num_blocks`, and byte sizes that agree with `files`.
  """
  try:
    manifest = json.loads(data)
  except ValueError as e:  # not JSON, or not UTF-8
    raise BlockStoreError(f"{where}: corrupt manifest ({e}); rebuild the store with launch/build_blocks.py") from e
  if not isinstance(manifest, dict):
    raise BlockStoreError(f"{where}: corrupt manifest (a JSON {type(manifest).__name__}, not an object); rebuild "
                          "the store with launch/build_blocks.py")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION or isinstance(version, bool):
    raise BlockStoreError(f"{where}: format_version {reprlib.repr(version)}, this code reads {FORMAT_VERSION}; "
                          "rebuild the store with launch/build_blocks.py")
  if "files" not in manifest:
    raise BlockStoreError(f"{where}: no 'files' table (the size and sha256 of every file): built by an older "
                          "realm-jax; rebuild it with launch/build_blocks.py")
  n = _value(manifest, "num_blocks", int, where, "num_blocks", minimum=1)
  _value(manifest, "max_block_len", int, where, "max_block_len", minimum=1)
  _value(manifest, "tokenizer", str, where, "tokenizer")
  _value(manifest, "vocab_size", int, where, "vocab_size", minimum=1)
  _value(manifest, "corpus_fingerprint", str, where, "corpus_fingerprint")
  special = _value(manifest, "special_ids", dict, where, "special_ids")
  for key in ("pad", "cls", "sep", "mask"):
    _value(special, key, int, where, f"special_ids.{key}", minimum=0)
  for key in ("span_labels", "stats"):  # added by build_block_store
    if key in manifest:
      _value(manifest, key, dict, where, key)
  arrays = _value(manifest, "arrays", dict, where, "arrays")
  unknown = sorted(set(arrays) - set(ARRAYS))
  if unknown:
    raise BlockStoreError(f"{where}: key 'arrays': unknown arrays {unknown} ({_REBUILD})")
  for name, (_, tail) in ARRAYS.items():
    spec = _value(arrays, name, dict, where, f"arrays.{name}")
    dtype = array_dtype(name, manifest["vocab_size"])
    if _value(spec, "dtype", str, where, f"arrays.{name}.dtype") != dtype:
      raise BlockStoreError(f"{where}: key 'arrays.{name}.dtype': {spec['dtype']!r}, this code reads {dtype!r} "
                            f"({_REBUILD})")
    shape = _value(spec, "shape", list, where, f"arrays.{name}.shape")
    rows = n if name == "uids" else n + 1 if name in OFFSETS else None
    if not (len(shape) == 1 + len(tail) and all(type(v) is int and v >= 0 for v in shape)
            and tuple(shape[1:]) == tail and rows in (None, shape[0])):
      expected = [rows if rows is not None else "rows", *tail]
      raise BlockStoreError(f"{where}: key 'arrays.{name}.shape': {reprlib.repr(shape)}, expected "
                            f"[{', '.join(map(str, expected))}] for num_blocks {n} ({_REBUILD})")
  files = _value(manifest, "files", dict, where, "files")
  names = data_file_names(manifest)
  missing, extra = sorted(set(names) - set(files)), sorted(set(files) - set(names))
  if missing or extra:
    raise BlockStoreError(f"{where}: key 'files': lacks {missing} or names files that are not part of a block store "
                          f"{[reprlib.repr(e) for e in extra]} ({_REBUILD})")
  for name in names:
    entry = _value(files, name, dict, where, f"files.{name}")
    _value(entry, "size", int, where, f"files.{name}.size", minimum=0)
    if not re.fullmatch(r"[0-9a-f]{64}", _value(entry, "sha256", str, where, f"files.{name}.sha256")):
      raise BlockStoreError(f"{where}: key 'files.{name}.sha256': not a sha256 hex digest ({_REBUILD})")
  for name, spec in arrays.items():
    nbytes = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
    if nbytes != files[f"{name}.bin"]["size"]:
      raise BlockStoreError(f"{where}: key 'files.{name}.bin.size': {files[f'{name}.bin']['size']}, but "
                            f"arrays.{name} ({spec['dtype']}{spec['shape']}) is {nbytes} bytes ({_REBUILD})")
  return manifest


def offsets_problem(offsets: np.ndarray, end: int, indexed: str) -> str | None:
  """What is wrong with the ends of a CSR offsets array (it must run from 0 to `end`), if anything."""
  if offsets[0] != 0 or offsets[-1] != end:
    what = f"the size of {TEXTS}" if indexed == TEXTS else f"the rows of {indexed}.bin"
    return f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {end} ({what})"
  return None


def check_local_out(out_dir: storage.PathLike) -> epath.Path:
  """`out_dir` as a local path; a remote one is refused with the way to build it."""
  return storage.local_path(out_dir, "a block store being written",
                            "build it locally, or run launch/build_blocks.py --out=gs://... (builds locally, then "
                            "uploads)")


def check_block_store_destination(out_dir: storage.PathLike, overwrite: bool = False) -> bool:
  """Whether a build into the local `out_dir` replaces a block store there; changes nothing.

  `out_dir` must be absent, an empty directory, or a block store (its manifest, the files its `files` table names,
  maybe `.staged.json`, and nothing else), which is replaced only with `overwrite`; anything else is refused.
  """
  out_dir = check_local_out(out_dir)
  keep = "a build never deletes what it did not write: choose another --out, or remove it yourself"
  if os.path.islink(out_dir):
    raise BlockStoreError(f"{out_dir}: --out is a symbolic link; {keep}")
  if not out_dir.exists():
    return False
  if not out_dir.is_dir():
    raise BlockStoreError(f"{out_dir}: --out exists and is not a directory; {keep}")
  names = sorted(os.listdir(out_dir))
  if not names:
    return False
  if MANIFEST not in names:
    raise BlockStoreError(f"{out_dir}: --out holds {names[0]!r} and no {MANIFEST}, so it is not a block store; "
                          f"{keep}")
  try:
    manifest = parse_manifest((out_dir / MANIFEST).read_bytes(), out_dir / MANIFEST)
  except BlockStoreError as e:
    raise BlockStoreError(f"{out_dir}: --out is not a block store that this version can replace ({e}); "
                          f"{keep}") from e
  for name in names:
    if name not in {MANIFEST, STAMP, *manifest["files"]}:
      raise BlockStoreError(f"{out_dir}: --out holds {name!r}, which is not part of the block store there, so it is "
                            f"not replaced, even with --overwrite; {keep}")
    if not stat.S_ISREG(os.lstat(out_dir / name).st_mode):
      raise BlockStoreError(f"{out_dir / name}: not a regular file, so {out_dir} is not replaced, even with "
                            f"--overwrite; {keep}")
  missing = sorted(set(manifest["files"]) - set(names))
  if missing:
    raise BlockStoreError(f"{out_dir}: --out holds an incomplete block store (no {missing[0]!r}), so it is not "
                          f"replaced, even with --overwrite; {keep}")
  if not overwrite:
    raise BlockStoreError(f"{out_dir}: --out already holds a block store ({manifest['num_blocks']} blocks); pass "
                          "--overwrite to replace it, or choose another --out")
  return True


def write_block_store(
    blocks: Iterable[Block],
    out_dir: storage.PathLike,
    tokenizer: Tokenizer,
    max_block_len: int,
    corpus_fingerprint: str,
    manifest_extras: Callable[[], dict[str, Any]] = dict,
    *,
    source: str = "the documents",
    overwrite: bool = False,
    allow_empty: bool = False,
) -> dict:
  """Streams blocks into a unique hidden sibling of `out_dir` (local disk), renamed to `out_dir` when complete.

  `out_dir` must be absent, an empty directory, or a block store, replaced only with `overwrite`
  (`check_block_store_destination`).  The sibling is removed on any failure, so a failed build leaves nothing; no
  blocks at all (an empty corpus) is a `CorpusError` naming `source`.  `manifest_extras` is called once all blocks
  are written (e.g. to add packing statistics).  The manifest's `files` table gets the size and sha256 of every
  file, hashed while it is written.
  """
  return write_store_directory(
      lambda staging: {**_write_store_files(blocks, staging, tokenizer, max_block_len, corpus_fingerprint, source,
                                            allow_empty), **manifest_extras()}, out_dir, overwrite)


def write_store_directory(write: Callable[[epath.Path], dict[str, Any]], out_dir: storage.PathLike,
                          overwrite: bool = False) -> dict:
  """Runs `write(staging)` (writes a store's files into `staging`, returns its manifest) in a unique hidden sibling
  of `out_dir`, writes the manifest, and renames the sibling to `out_dir` (`_publish`); removed on any failure."""
  out_dir = check_local_out(out_dir)
  check_block_store_destination(out_dir, overwrite)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex}"
  staging.mkdir()
  try:
    manifest = write(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _publish(staging, out_dir, overwrite)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  return manifest


def _write_store_files(blocks: Iterable[Block], directory: epath.Path, tokenizer: Tokenizer, max_block_len: int,
                       corpus_fingerprint: str, source: str, allow_empty: bool = False) -> dict[str, Any]:
  """Writes every file of a store but its manifest into `directory`; returns the manifest (without extras).
  No blocks is a `CorpusError` unless `allow_empty` (a shard of a parallel build)."""
  counts = Counter()
  offsets = {"title": 0, "body": 0, "sentence": 0, "span": 0, "text": 0, "block_text": 0}
  with contextlib.ExitStack() as stack:
    files = {name: storage.HashingFile(stack.enter_context(open(os.fspath(directory / f"{name}.bin"), "wb")))
             for name in ARRAYS}
    texts = storage.HashingFile(stack.enter_context(open(os.fspath(directory / TEXTS), "wb")))
    for name in OFFSETS:
      files[name].write(np.int64(0).tobytes())
    for block in blocks:
      line = (json.dumps(
          {"doc_id": block.doc_id, "title": block.title, "text": block.text, "uid": block.uid.hex()},
          ensure_ascii=False,
      ) + "\n").encode()
      texts.write(line)
      for key, name, arr in (
          ("title", "title_ids", block.title_ids),
          ("body", "body_ids", block.body_ids),
          ("sentence", "sentence_starts", block.sentence_starts),
          ("span", "spans", block.spans),
          ("block_text", "block_text", np.frombuffer(block.text.encode(), np.uint8)),
      ):
        files[name].write(np.ascontiguousarray(arr, array_dtype(name, tokenizer.vocab_size)).tobytes())
        offsets[key] += len(arr)
        files[f"{key}_offsets"].write(np.int64(offsets[key]).tobytes())
      offsets["text"] += len(line)
      files["text_offsets"].write(np.int64(offsets["text"]).tobytes())
      files["uids"].write(block.uid)
      counts["blocks"] += 1
  n = counts["blocks"]
  if not n and not allow_empty:
    raise CorpusError(f"{source}: no blocks to write: no document has word pieces (the corpus is empty); give a "
                      "passages file with at least one non-empty document")
  file_table = {f"{name}.bin": f.entry() for name, f in files.items()}
  file_table[TEXTS] = texts.entry()
  lengths = {
      "title_ids": offsets["title"], "body_ids": offsets["body"],
      "sentence_starts": offsets["sentence"], "spans": offsets["span"], "uids": n, "block_text": offsets["block_text"],
  }
  special = {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id, "mask": tokenizer.mask_id}
  return store_manifest(n, max_block_len, tokenizer.fingerprint, tokenizer.vocab_size, special, corpus_fingerprint,
                        lengths, file_table)


def store_manifest(num_blocks: int, max_block_len: int, tokenizer: str, vocab_size: int, special_ids: dict[str, int],
                   corpus_fingerprint: str, lengths: dict[str, int], files: dict[str, dict]) -> dict[str, Any]:
  """A store's manifest but its extras: `lengths` gives the rows of the arrays that are not offsets (offsets
  arrays have num_blocks + 1), `files` the size and sha256 of every file."""
  arrays = {}
  for name, (_, tail) in ARRAYS.items():
    rows = lengths.get(name, num_blocks + 1)
    arrays[name] = {"dtype": array_dtype(name, vocab_size), "shape": [rows, *tail]}
  return {
      "format_version": FORMAT_VERSION,
      "num_blocks": num_blocks,
      "max_block_len": max_block_len,
      "tokenizer": tokenizer,
      "vocab_size": vocab_size,
      "special_ids": special_ids,
      "corpus_fingerprint": corpus_fingerprint,
      "arrays": arrays,
      "files": files,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def _publish(staging: epath.Path, out_dir: epath.Path, overwrite: bool) -> None:
  """Renames the finished store `staging` to `out_dir`.

  `out_dir` is checked again (a build takes long).  A block store there (with `overwrite`) is renamed aside to a
  unique hidden name first and deleted once the new store is in place: a crash leaves one of them, never neither.
  """
  if not check_block_store_destination(out_dir, overwrite):
    os.rename(staging, out_dir)  # replaces nothing but an empty directory
    return
  old = out_dir.parent / f".{out_dir.name}.replaced-{uuid.uuid4().hex}"
  os.rename(out_dir, old)
  try:
    os.rename(staging, out_dir)
  except OSError:
    os.rename(old, out_dir)
    raise
  _delete_replaced_store(old)


def _delete_replaced_store(directory: epath.Path) -> None:
  """Deletes a block store renamed aside: the files its manifest names, its stamp and manifest, then the directory."""
  manifest = json.loads((directory / MANIFEST).read_bytes())
  for name in [*manifest["files"], STAMP, MANIFEST]:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(directory / name)
  try:
    os.rmdir(directory)
  except OSError as e:  # something was put there while it was being replaced: not ours to delete
    logging.warning("%s: the replaced block store's directory is not empty (%s); left as it is", directory, e)


class BlockStore:
  """Read-only, memory-mapped view of a block store directory on local disk (a gs:// store is refused).

  Opening checks the manifest, every file's size against `files`, and that the offsets arrays run from 0 to the
  rows (or bytes) they index: stat and a few memory-mapped elements, no hashing (`verify_block_store` hashes).
  """

  def __init__(self, path: storage.PathLike):
    self.path = storage.local_path(path, "a block store (it is memory-mapped)", _staging_advice(path))
    manifest_file = self.path / MANIFEST
    if not manifest_file.is_file():
      raise BlockStoreError(f"{self.path}: not a block store (no {MANIFEST}; unfinished build?)")
    self.manifest = parse_manifest(manifest_file.read_bytes(), manifest_file)
    for name, entry in self.manifest["files"].items():
      file = self.path / name
      actual = os.path.getsize(file) if file.is_file() else None
      if actual != entry["size"]:
        raise BlockStoreError(f"{file}: {'missing' if actual is None else f'{actual} bytes'}, the manifest says "
                              f"{entry['size']} bytes (truncated or corrupt store; rebuild it, or stage it again)")
    self.num_blocks: int = self.manifest["num_blocks"]
    self.max_block_len: int = self.manifest["max_block_len"]
    self.arrays: dict[str, np.ndarray] = {}
    for name, spec in self.manifest["arrays"].items():
      shape = tuple(spec["shape"])
      self.arrays[name] = (
          np.memmap(os.fspath(self.path / f"{name}.bin"), dtype=spec["dtype"], mode="r", shape=shape)
          if int(np.prod(shape)) else np.zeros(shape, spec["dtype"])
      )
    for offsets, indexed in OFFSETS.items():
      end = self.manifest["files"][TEXTS]["size"] if indexed == TEXTS else self.arrays[indexed].shape[0]
      if problem := offsets_problem(self.arrays[offsets], end, indexed):
        raise BlockStoreError(f"{self.path / f'{offsets}.bin'}: {problem} (corrupt store; rebuild it)")
    self._texts = open(os.fspath(self.path / TEXTS), "rb")

  def check_tokenizer(self, tokenizer: Tokenizer) -> None:
    if tokenizer.fingerprint != self.manifest["tokenizer"]:
      raise BlockStoreError(
          f"{self.path}: built with tokenizer {self.manifest['tokenizer']}, not {tokenizer.fingerprint}"
      )

  def __len__(self) -> int:
    return self.num_blocks

  def _slice(self, name: str, offsets: str, i: int) -> np.ndarray:
    o = self.arrays[offsets]
    return np.asarray(self.arrays[name][o[i] : o[i + 1]])

  def title_ids(self, i: int) -> np.ndarray:
    return self._slice("title_ids", "title_offsets", i).astype(np.int32)

  def body_ids(self, i: int) -> np.ndarray:
    return self._slice("body_ids", "body_offsets", i).astype(np.int32)

  def text_bytes(self, i: int) -> bytes:
    """The UTF-8 bytes of block i's text (texts.jsonl's "text", without reading or parsing that file)."""
    return self._slice("block_text", "block_text_offsets", i).tobytes()

  def sentence_starts(self, i: int) -> np.ndarray:
    return self._slice("sentence_starts", "sentence_offsets", i)

  def spans(self, i: int) -> np.ndarray:
    return self._slice("spans", "span_offsets", i)

  def uid(self, i: int) -> bytes:
    return bytes(self.arrays["uids"][i])

  def text(self, i: int) -> dict:
    """{doc_id, title, text, uid} of block i."""
    o = self.arrays["text_offsets"]
    self._texts.seek(int(o[i]))
    return json.loads(self._texts.read(int(o[i + 1] - o[i])))

  def iter_texts(self) -> Iterator[dict]:
    with open(os.fspath(self.path / TEXTS), encoding="utf-8") as f:
      for line in f:
        yield json.loads(line)

  def retriever_lengths(self, max_len: int | None = None) -> np.ndarray:
    """[num_blocks] word pieces of each block's `retriever_inputs` (`[CLS] title [SEP] body [SEP]`, capped)."""
    max_len = max_len or self.max_block_len
    title, body = np.diff(self.arrays["title_offsets"]), np.diff(self.arrays["body_offsets"])
    return np.minimum(max_len, 3 + title + body).astype(np.int64)

  def retriever_inputs(self, ids: Iterable[int], max_len: int | None = None) -> dict[str, np.ndarray]:
    """`[CLS] title [SEP] body [SEP]` batches: input_ids, input_mask, segment_ids [B, max_len].

    The body is cut to fit; a title that fills the block leaves no body.  Vectorised over the batch (the refresh
    job builds 13M of these per pass)."""
    max_len = max_len or self.max_block_len
    special = self.manifest["special_ids"]
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64)
    title_offsets, body_offsets = self.arrays["title_offsets"], self.arrays["body_offsets"]
    title_start, body_start = title_offsets[ids], body_offsets[ids]
    title_len = title_offsets[ids + 1] - title_start
    body_len = np.minimum(body_offsets[ids + 1] - body_start, np.maximum(0, max_len - title_len - 3))
    return pack_rows(max_len, special["cls"], special["sep"], self.arrays["title_ids"], title_start, title_len,
                     self.arrays["body_ids"], body_start, body_len)


def _windows(array: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """[R, length] `array[start : start + length]` of each row's start, positions outside `array` clipped to its
  ends: a row copy out of a sliding-window view, an element gather only for rows that cross an end."""
  n = len(array)
  if n >= length:
    out = np.lib.stride_tricks.sliding_window_view(array, length)[np.clip(starts, 0, n - length)]
  else:
    out = np.zeros((len(starts), length), array.dtype)
  edge = (starts < 0) | (starts > n - length)
  if n and edge.any():
    out[edge] = array[np.clip(starts[edge, None] + np.arange(length), 0, n - 1)]
  return out


def pack_rows(length: int, cls: int, sep: int, head: np.ndarray, head_start: np.ndarray, head_len: np.ndarray,
               body: np.ndarray, body_start: np.ndarray, body_len: np.ndarray) -> dict[str, np.ndarray]:
  """[R, length] `pack([CLS, head, SEP, body, SEP], length, segment_break=3)` of rows whose head and (already
  truncated) body are the ranges at `*_start` of `*_len` of the flat arrays `head` and `body`."""
  positions = np.arange(length)
  ids = _windows(body, np.where(body_len > 0, body_start - head_len - 2, 0), length).astype(np.int32, copy=False)
  width = min(int(head_len.max(initial=0)) + 1, length)  # head piece i goes to position 1 + i
  heads = _windows(head, np.where(head_len > 0, head_start - 1, 0), width)
  np.copyto(ids[:, :width], heads, casting="unsafe", where=positions[:width] <= head_len[:, None])
  mask = positions < np.minimum(head_len + 3 + body_len, length)[:, None]
  ids *= mask
  flat, row_start = ids.reshape(-1), np.arange(len(ids), dtype=np.int64) * length
  for position, token in ((np.zeros_like(head_len), cls), (head_len + 1, sep), (head_len + 2 + body_len, sep)):
    inside = position < length
    flat[row_start[inside] + position[inside]] = token
  segments = mask & (positions >= head_len[:, None] + 2)
  return {"input_ids": ids, "input_mask": mask.astype(np.int32), "segment_ids": segments.astype(np.int32)}


def build_block_store(
    documents: Iterable[Document],
    out_dir: storage.PathLike,
    tokenizer: Tokenizer,
    corpus_fingerprint: str,
    max_block_len: int = 288,
    max_title_len: int = 64,
    total: int | None = None,
    *,
    source: str = "the documents",
    skip_empty_documents: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_empty: bool = False,
) -> dict:
  """Packs documents into blocks and writes the store; returns the manifest (with stats).  Documents are
  tokenized `TOKENIZER_BATCH` at a time.

  `source` names the input in errors (e.g. the passages file); `skip_empty_documents` is `BlockPacker`'s,
  `overwrite` is `write_block_store`'s.
  """
  packer = BlockPacker(tokenizer, max_block_len, max_title_len, skip_empty_documents=skip_empty_documents)

  def blocks() -> Iterator[Block]:
    docs = iter(tqdm(documents, total=total, desc="blocks", unit="doc", mininterval=2.0, disable=not progress))
    while batch := list(itertools.islice(docs, TOKENIZER_BATCH)):
      packer.stats["documents"] += len(batch)
      for packed in packer.pack_batch(batch):
        for block in packed:
          packer.stats["tokens"] += len(block.body_ids)
          yield block

  return write_block_store(
      blocks(), out_dir, tokenizer, max_block_len, corpus_fingerprint,
      manifest_extras=lambda: {"span_labels": packer.labels, "stats": dict(packer.stats)},
      source=source, overwrite=overwrite, allow_empty=allow_empty,
  )
