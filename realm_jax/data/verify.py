"""Full verification of a block store (`launch/verify_blocks.py`): every byte hashed, every block's contents checked.

Opening a `BlockStore` checks only what is cheap (manifest, sizes, offsets ends); this streams every file once,
local or gs://, and names the file and block (or line) of the first problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from etils import epath

from realm_jax import storage
from realm_jax.data.blocks import (
  ARRAYS,
  MANIFEST,
  OFFSETS,
  TEXTS,
  BlockStoreError,
  offsets_problem,
  parse_manifest,
)
from realm_jax.data.packing import block_uid


def verify_block_store(path: storage.PathLike) -> dict[str, Any]:
  """Checks every byte of the block store at `path` (local, or gs:// streamed); returns a summary.

  What opening checks, and: every file's sha256 against `files`; offsets that never decrease; blocks within
  max_block_len; word-piece ids below vocab_size; spans and sentence starts inside their block's body; one valid
  texts.jsonl line per block, at its text_offsets, whose uid is uids.bin's row and SHA1(title <sep> text).  The
  first problem is a `BlockStoreError` naming the file and, where there is one, the block or line.
  """
  root = storage.as_path(path)
  try:
    manifest_bytes = storage.read_bytes(root / MANIFEST)
  except FileNotFoundError:
    raise BlockStoreError(f"{root}: not a block store (no {MANIFEST}; unfinished build or upload?)") from None
  manifest = parse_manifest(manifest_bytes, root / MANIFEST)
  files = manifest["files"]
  whole = {name: _read_array(root, name, manifest) for name in (*OFFSETS, "uids")}  # small: [num_blocks (+ 1)]
  for offsets, indexed in OFFSETS.items():
    end = files[TEXTS]["size"] if indexed == TEXTS else manifest["arrays"][indexed]["shape"][0]
    decreasing = np.flatnonzero(np.diff(whole[offsets]) < 0)
    if len(decreasing):
      i = int(decreasing[0])
      raise BlockStoreError(f"{root / f'{offsets}.bin'}: block {i}: offsets {whole[offsets][i]} then "
                            f"{whole[offsets][i + 1]} (offsets must not decrease)")
    if problem := offsets_problem(whole[offsets], end, indexed):
      raise BlockStoreError(f"{root / f'{offsets}.bin'}: {problem}")
  title_len, body_len = np.diff(whole["title_offsets"]), np.diff(whole["body_offsets"])
  too_long = np.flatnonzero(3 + title_len + body_len > manifest["max_block_len"])
  if len(too_long):
    i = int(too_long[0])
    raise BlockStoreError(f"{root / 'body_offsets.bin'}: block {i}: 3 + {title_len[i]} title + {body_len[i]} body "
                          f"word pieces exceed max_block_len {manifest['max_block_len']}")
  vocab_size = manifest["vocab_size"]
  num_labels = len(manifest["span_labels"]) if "span_labels" in manifest else np.iinfo(np.int32).max

  def ids_check(offsets: np.ndarray) -> Callable[[np.ndarray, int], str | None]:
    def check(ids: np.ndarray, first: int) -> str | None:
      bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
      if not len(bad):
        return None
      row = first + int(bad[0])
      return (f"block {_block_of(offsets, row)}: word piece id {ids[bad[0]]} (row {row}) is not below vocab_size "
              f"{vocab_size}")
    return check

  def sentences_check(starts: np.ndarray, first: int) -> str | None:
    blocks = _block_of(whole["sentence_offsets"], np.arange(first, first + len(starts)))
    bad = np.flatnonzero((starts < 0) | (starts >= body_len[blocks]))
    if not len(bad):
      return None
    k = int(bad[0])
    return (f"block {blocks[k]}: sentence start {starts[k]} (row {first + k}) is outside its body of "
            f"{body_len[blocks[k]]} word pieces")

  def spans_check(spans: np.ndarray, first: int) -> str | None:
    blocks = _block_of(whole["span_offsets"], np.arange(first, first + len(spans)))
    start, end, label = spans.T
    bad = np.flatnonzero((start < 0) | (start >= end) | (end > body_len[blocks]) | (label < 0) | (label >= num_labels))
    if not len(bad):
      return None
    k = int(bad[0])
    return (f"block {blocks[k]}: span {spans[k].tolist()} (row {first + k}) is not (start, end, label id) with "
            f"0 <= start < end <= {body_len[blocks[k]]} (the body length) and a label id in the manifest")

  _stream_array(root, "title_ids", manifest, ids_check(whole["title_offsets"]))
  _stream_array(root, "body_ids", manifest, ids_check(whole["body_offsets"]))
  _stream_array(root, "sentence_starts", manifest, sentences_check)
  _stream_array(root, "spans", manifest, spans_check)
  _stream_array(root, "block_text", manifest, lambda rows, first: None)  # its size and sha256
  _verify_texts(root, manifest, whole["text_offsets"], whole["uids"], whole["block_text_offsets"])
  return {"store": str(root), "num_blocks": manifest["num_blocks"], "files": len(files) + 1,
          "bytes": sum(e["size"] for e in files.values()) + len(manifest_bytes)}


def _block_of(offsets: np.ndarray, rows):
  """The block (or blocks) holding data row(s) `rows` of a CSR array with these offsets."""
  return np.searchsorted(offsets, rows, side="right") - 1


def _checked_chunks(file: epath.Path, entry: dict[str, Any]) -> Iterator[bytes]:
  """The bytes of `file` in chunks; after the last one, its size and sha256 are checked against its `files` entry."""
  digest, size = hashlib.sha256(), 0
  try:
    for chunk in storage.read_chunks(file):
      digest.update(chunk)
      size += len(chunk)
      yield chunk
  except FileNotFoundError:
    raise BlockStoreError(f"{file}: missing, the manifest's files table names it (incomplete store)") from None
  if size != entry["size"]:
    raise BlockStoreError(f"{file}: {size} bytes, the manifest says {entry['size']} (truncated or corrupt store)")
  if digest.hexdigest() != entry["sha256"]:
    raise BlockStoreError(f"{file}: sha256 {digest.hexdigest()}, the manifest says {entry['sha256']} (corrupt "
                          "store)")


def _read_array(root: epath.Path, name: str, manifest: dict) -> np.ndarray:
  """`<name>.bin` read whole (its size and sha256 checked)."""
  spec = manifest["arrays"][name]
  data = b"".join(_checked_chunks(root / f"{name}.bin", manifest["files"][f"{name}.bin"]))
  return np.frombuffer(data, spec["dtype"]).reshape(spec["shape"])


def _stream_array(root: epath.Path, name: str, manifest: dict,
                  check: Callable[[np.ndarray, int], str | None]) -> None:
  """Streams `<name>.bin` once, calling `check(rows, first row)` on each chunk of rows until it finds a problem,
  which is raised (naming the file) after the size and sha256 checks, so a corrupt file is reported as such."""
  dtype, tail = manifest["arrays"][name]["dtype"], ARRAYS[name][1]
  row_bytes = np.dtype(dtype).itemsize * int(np.prod(tail))
  file = root / f"{name}.bin"
  problem, carry, first = None, b"", 0
  for chunk in _checked_chunks(file, manifest["files"][f"{name}.bin"]):
    if problem is None:
      data = carry + chunk
      usable = len(data) - len(data) % row_bytes
      rows = np.frombuffer(data, dtype, count=usable // np.dtype(dtype).itemsize).reshape(-1, *tail)
      carry = data[usable:]
      problem = check(rows, first)
      first += len(rows)
  if problem:
    raise BlockStoreError(f"{file}: {problem}")


def _verify_texts(root: epath.Path, manifest: dict, text_offsets: np.ndarray, uids: np.ndarray,
                  block_text_offsets: np.ndarray) -> None:
  """texts.jsonl: one line per block at its text_offsets, {doc_id, title, text, uid} with the block's uid, whose
  texts are block_text.bin's bytes (each block's length at block_text_offsets, all of them its sha256)."""
  file, n = root / TEXTS, manifest["num_blocks"]
  block_text = hashlib.sha256()
  problem, carry, count, position = None, b"", 0, 0  # problem: `file:line: what` or `file: what`
  for chunk in _checked_chunks(file, manifest["files"][TEXTS]):
    if problem is not None:
      continue
    lines = (carry + chunk).split(b"\n")
    carry = lines.pop()
    for line in lines:
      if what := _text_line_problem(line, count, position, n, text_offsets, uids, block_text_offsets, block_text):
        problem = f"{file}:{count + 1}: {what}"
        break
      count, position = count + 1, position + len(line) + 1
  if problem is None and carry:
    problem = f"{file}:{count + 1}: no line end (truncated file)"
  if problem is None and count != n:
    problem = f"{file}: {count} lines, but num_blocks is {n}"
  if problem is None and block_text.hexdigest() != manifest["files"]["block_text.bin"]["sha256"]:
    problem = f"{root / 'block_text.bin'}: its bytes are not the texts of {file}, block by block"
  if problem:
    raise BlockStoreError(problem)


def _text_line_problem(line: bytes, i: int, position: int, n: int, text_offsets: np.ndarray, uids: np.ndarray,
                       block_text_offsets: np.ndarray, block_text) -> str | None:
  """What is wrong with line i + 1 of texts.jsonl (which starts at byte `position`), if anything."""
  if i >= n:
    return f"more lines than num_blocks ({n})"
  expected = (int(text_offsets[i]), int(text_offsets[i + 1]))
  if (position, position + len(line) + 1) != expected:
    return (f"block {i}: bytes {position}..{position + len(line) + 1}, but text_offsets.bin says "
            f"{expected[0]}..{expected[1]}")
  try:
    record = json.loads(line)
  except ValueError as e:
    return f"block {i}: not valid JSON ({e})"
  fields = ("doc_id", "title", "text", "uid")
  if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
    return f"block {i}: not a JSON object with string fields {', '.join(fields)}"
  uid = uids[i].tobytes()
  if record["uid"] != uid.hex():
    return f"block {i}: uid {record['uid']}, but uids.bin says {uid.hex()}"
  try:
    same = block_uid(record["title"], record["text"]) == uid
  except UnicodeEncodeError:
    return f"block {i}: title or text is not Unicode text (an unpaired surrogate)"
  if not same:
    return f"block {i}: uid {uid.hex()} is not SHA1(title <sep> text)"
  text = record["text"].encode()
  if len(text) != block_text_offsets[i + 1] - block_text_offsets[i]:
    return (f"block {i}: its text is {len(text)} UTF-8 bytes, block_text_offsets.bin says "
            f"{block_text_offsets[i + 1] - block_text_offsets[i]}")
  block_text.update(text)
  return None
