"""Documents -> retrieval blocks, and the on-disk block store that later jobs memory-map.

A block is `[CLS] title [SEP] body [SEP]` with at most `max_block_len` (288)
word pieces.  Sentences of a document are packed greedily; a sentence longer
than the body budget is cut at word-piece boundaries.  Entity spans are mapped
to the word pieces that lie fully inside them (REALM's rule); spans that cross a
block boundary or cover no word piece are dropped and counted.

Store layout (one local directory, written to a staging name and renamed when complete):
  manifest.json                    counts, tokenizer fingerprint, corpus fingerprint, arrays, and
                                   `files` {file name: {size, sha256}} of every other file of the store
  <array>.bin                      raw little-endian arrays described in the manifest
  texts.jsonl + text_offsets.bin   per block {doc_id, title, text, uid}, random access by offset
Arrays are CSR: `title_ids`/`title_offsets`, `body_ids`/`body_offsets`,
`sentence_starts`/`sentence_offsets` (body-relative), `spans` [S, 3] (start, end, label id,
body-relative, end exclusive)/`span_offsets`; `uids` [N, 20] uint8 (SHA1 of "title <sep> body").

A store is memory-mapped from local disk.  One on GCS (`launch/build_blocks.py --out=gs://...`) is staged to
each host first (`realm_jax.data.staging`, `launch/stage_blocks.py`), checked against `files`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from realm_jax import storage
from realm_jax.data.corpus import Document
from realm_jax.data.tokenization import Tokenizer
from realm_jax.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXTS = "texts.jsonl"

# Sentence ends: . ! ? (plus closing quotes/brackets) followed by space and an upper-case/digit/quote start.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")


# Dates for salient-span masking (REALM's NER spans + "a regular expression to identify dates").
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
DATE_PATTERN = re.compile(
    rf"\b(?:{_MONTH}\s+\d{{1,2}},?\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}}|{_MONTH}\s+\d{{4}}"
    rf"|(?:1[0-9]|20)\d{{2}}s?)\b"
)
DATE_REGEX_LABEL = "DATE_REGEX"


def date_spans(text: str) -> tuple[tuple[int, int, str], ...]:
  """Character spans of dates: "May 18, 2018", "13 August 1949", "October 2014", "1901", "1990s"."""
  return tuple((m.start(), m.end(), DATE_REGEX_LABEL) for m in DATE_PATTERN.finditer(text))


class BlockStoreError(InputError):
  """A block store that is missing, incomplete, corrupt or made for another vocabulary."""


def _staging_advice(source: storage.PathLike) -> str:
  """How to make a local copy of the block store at `source` (a gs:// path)."""
  return (f"stage it to each host first: python launch/stage_blocks.py --source={source} --dest=/local/dir, "
          "then point BLOCK_STORE at /local/dir")


def split_sentences(text: str) -> list[tuple[int, int]]:
  """Character spans of sentences (heuristic splitter; whitespace between sentences is dropped)."""
  spans, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    spans.append((start, m.start() + len(m.group(0).rstrip())))
    start = m.end()
  spans.append((start, len(text)))
  return [(s, e) for s, e in spans if text[s:e].strip()]


def block_uid(title: str, body: str) -> bytes:
  """SHA1 of "title <sep> body", as the released REALM code identifies documents."""
  return hashlib.sha1(f"{title} <sep> {body}".encode()).digest()


@dataclasses.dataclass
class Block:
  doc_id: str
  title: str
  text: str  # body text (the characters the body word pieces come from)
  title_ids: np.ndarray
  body_ids: np.ndarray
  sentence_starts: np.ndarray  # body-relative token index of each sentence start
  spans: np.ndarray  # [S, 3] body-relative (start, end, label id)

  @property
  def uid(self) -> bytes:
    return block_uid(self.title, self.text)


class BlockPacker:
  """Packs documents into blocks of <= max_block_len word pieces."""

  def __init__(self, tokenizer: Tokenizer, max_block_len: int = 288, max_title_len: int = 64,
               find_dates: bool = True):
    if max_block_len < max_title_len + 3 + 8:
      raise ValueError(f"max_block_len={max_block_len} is too short for {max_title_len}-token titles")
    self.tokenizer = tokenizer
    self.max_block_len = max_block_len
    self.max_title_len = max_title_len
    self.find_dates = find_dates
    self.labels: dict[str, int] = {}
    self.stats: Counter = Counter()

  def label_id(self, label: str) -> int:
    return self.labels.setdefault(label, len(self.labels))

  def pack(self, doc: Document) -> list[Block]:
    """Greedy packing of one document's sentences."""
    title_ids, _ = self.tokenizer.encode(doc.title)
    if len(title_ids) > self.max_title_len:
      self.stats["titles_truncated"] += 1
      title_ids = title_ids[: self.max_title_len]
    ids, offsets = self.tokenizer.encode(doc.text)
    if not len(ids):
      raise ValueError(f"{doc.source}: field 'text': document {doc.doc_id!r} has no word pieces")
    budget = self.max_block_len - 3 - len(title_ids)
    # Token ranges of sentences (a token belongs to the sentence holding its first character).
    sentence_bounds = split_sentences(doc.text)
    ends = np.asarray([e for _, e in sentence_bounds])
    sentence_of_token = np.minimum(np.searchsorted(ends, offsets[:, 0], side="right"), len(ends) - 1)
    pieces = []  # (token_start, token_end) of sentences, long ones cut to the budget
    for s in np.unique(sentence_of_token):
      tokens = np.flatnonzero(sentence_of_token == s)
      for start in range(tokens[0], tokens[-1] + 1, budget):
        pieces.append((start, min(start + budget, tokens[-1] + 1)))
        if start > tokens[0]:
          self.stats["sentences_cut"] += 1
    groups, current = [], []
    for start, end in pieces:
      if current and end - current[0][0] > budget:
        groups.append(current)
        current = []
      current.append((start, end))
    groups.append(current)
    return [self._make_block(doc, title_ids, ids, offsets, g) for g in groups]

  def _make_block(self, doc, title_ids, ids, offsets, sentences) -> Block:
    first, last = sentences[0][0], sentences[-1][1]
    char_start, char_end = int(offsets[first, 0]), int(offsets[last - 1, 1])
    spans, seen = [], set()
    extra = date_spans(doc.text[char_start:char_end]) if self.find_dates else ()
    candidates = list(doc.spans) + [(s + char_start, e + char_start, label) for s, e, label in extra]
    for cs, ce, label in candidates:
      inside = np.flatnonzero((offsets[:, 0] >= cs) & (offsets[:, 1] <= ce))
      if not len(inside):
        self.stats["spans_without_tokens"] += 1
      elif inside[0] < first or inside[-1] >= last:
        if inside[-1] >= first and inside[0] < last:
          self.stats["spans_crossing_blocks"] += 1
      elif (inside[0], inside[-1]) not in seen or label != DATE_REGEX_LABEL:
        seen.add((inside[0], inside[-1]))
        spans.append((inside[0] - first, inside[-1] + 1 - first, self.label_id(label)))
    self.stats["spans_kept"] += len(spans)
    return Block(
        doc_id=doc.doc_id,
        title=doc.title,
        text=doc.text[char_start:char_end],
        title_ids=title_ids,
        body_ids=ids[first:last],
        sentence_starts=np.asarray([s - first for s, _ in sentences], np.int32),
        spans=np.asarray(spans, np.int32).reshape(-1, 3),
    )


# name -> (dtype, trailing shape)
_ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
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
}


def data_file_names(manifest: dict) -> list[str]:
  """The files of a store besides its manifest: one `<array>.bin` per array, and the texts."""
  return [f"{name}.bin" for name in manifest["arrays"]] + [TEXTS]


def write_block_store(
    blocks: Iterable[Block],
    out_dir: storage.PathLike,
    tokenizer: Tokenizer,
    max_block_len: int,
    corpus_fingerprint: str,
    manifest_extras: Callable[[], dict[str, Any]] = dict,
) -> dict:
  """Streams blocks to `<out_dir>.staging` (local disk) and renames it to `out_dir` when complete.

  `manifest_extras` is called once all blocks are written (e.g. to add packing statistics).  The manifest's
  `files` table gets the size and sha256 of every file, hashed while it is written.
  """
  out_dir = storage.local_path(out_dir, "a block store being written",
                               "build it locally, or run launch/build_blocks.py --out=gs://... (builds locally, "
                               "then uploads)")
  staging = out_dir.with_name(out_dir.name + ".staging")
  if staging.exists():
    shutil.rmtree(staging)
  staging.mkdir(parents=True)
  files = {name: storage.HashingFile(open(os.fspath(staging / f"{name}.bin"), "wb")) for name in _ARRAYS}
  texts = storage.HashingFile(open(os.fspath(staging / TEXTS), "wb"))
  counts = Counter()
  offsets = {"title": 0, "body": 0, "sentence": 0, "span": 0, "text": 0}
  for name in ("title_offsets", "body_offsets", "sentence_offsets", "span_offsets", "text_offsets"):
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
    ):
      files[name].write(np.ascontiguousarray(arr, _ARRAYS[name][0]).tobytes())
      offsets[key] += len(arr)
      files[f"{key}_offsets"].write(np.int64(offsets[key]).tobytes())
    offsets["text"] += len(line)
    files["text_offsets"].write(np.int64(offsets["text"]).tobytes())
    files["uids"].write(block.uid)
    counts["blocks"] += 1
  for f in (*files.values(), texts):
    f.file.close()
  file_table = {f"{name}.bin": f.entry() for name, f in files.items()}
  file_table[TEXTS] = texts.entry()
  n = counts["blocks"]
  if not n:
    shutil.rmtree(staging)
    raise ValueError("no blocks to write: the corpus is empty")
  lengths = {
      "title_ids": offsets["title"], "body_ids": offsets["body"],
      "sentence_starts": offsets["sentence"], "spans": offsets["span"], "uids": n,
  }
  arrays = {}
  for name, (dtype, tail) in _ARRAYS.items():
    rows = lengths.get(name, n + 1)
    arrays[name] = {"dtype": dtype, "shape": [rows, *tail]}
  manifest = {
      "format_version": FORMAT_VERSION,
      "num_blocks": n,
      "max_block_len": max_block_len,
      "tokenizer": tokenizer.fingerprint,
      "vocab_size": tokenizer.vocab_size,
      "special_ids": {
          "pad": tokenizer.pad_id, "cls": tokenizer.cls_id,
          "sep": tokenizer.sep_id, "mask": tokenizer.mask_id,
      },
      "corpus_fingerprint": corpus_fingerprint,
      "arrays": arrays,
      "files": file_table,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      **manifest_extras(),
  }
  (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
  if out_dir.exists():
    shutil.rmtree(out_dir)
  os.replace(staging, out_dir)
  return manifest


class BlockStore:
  """Read-only, memory-mapped view of a block store directory on local disk (a gs:// store is refused)."""

  def __init__(self, path: storage.PathLike):
    self.path = storage.local_path(path, "a block store (it is memory-mapped)", _staging_advice(path))
    manifest_file = self.path / MANIFEST
    if not manifest_file.is_file():
      raise BlockStoreError(f"{self.path}: not a block store (no {MANIFEST}; unfinished build?)")
    try:
      self.manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
      raise BlockStoreError(f"{manifest_file}: corrupt manifest ({e})") from e
    if self.manifest.get("format_version") != FORMAT_VERSION:
      version = self.manifest.get("format_version")
      raise BlockStoreError(f"{manifest_file}: format_version {version}, this code reads {FORMAT_VERSION}")
    self.num_blocks: int = self.manifest["num_blocks"]
    self.max_block_len: int = self.manifest["max_block_len"]
    self.arrays: dict[str, np.ndarray] = {}
    for name, spec in self.manifest["arrays"].items():
      file = self.path / f"{name}.bin"
      shape = tuple(spec["shape"])
      expected = int(np.prod(shape)) * np.dtype(spec["dtype"]).itemsize
      actual = os.path.getsize(file) if file.is_file() else None
      if actual != expected:
        raise BlockStoreError(
            f"{file}: expected {expected} bytes for {spec['dtype']}{list(shape)}, found "
            f"{'no file' if actual is None else f'{actual} bytes'} (corrupt or truncated store)"
        )
      self.arrays[name] = (
          np.memmap(os.fspath(file), dtype=spec["dtype"], mode="r", shape=shape) if expected
          else np.zeros(shape, spec["dtype"])
      )
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
    return self._slice("title_ids", "title_offsets", i)

  def body_ids(self, i: int) -> np.ndarray:
    return self._slice("body_ids", "body_offsets", i)

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
    """`[CLS] title [SEP] body [SEP]` batches: input_ids, input_mask, segment_ids [B, max_len]."""
    max_len = max_len or self.max_block_len
    special = self.manifest["special_ids"]
    ids = list(ids)
    out = {k: np.zeros((len(ids), max_len), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
    for row, i in enumerate(ids):
      title, body = self.title_ids(i), self.body_ids(i)
      head = np.concatenate([[special["cls"]], title, [special["sep"]]])
      tail = np.concatenate([body[: max(0, max_len - len(head) - 1)], [special["sep"]]])
      tokens = np.concatenate([head, tail])[:max_len]
      n = len(tokens)
      out["input_ids"][row, :n] = tokens
      out["input_mask"][row, :n] = 1
      out["segment_ids"][row, len(head) : n] = 1
    return out


def build_block_store(
    documents: Iterable[Document],
    out_dir: storage.PathLike,
    tokenizer: Tokenizer,
    corpus_fingerprint: str,
    max_block_len: int = 288,
    max_title_len: int = 64,
    total: int | None = None,
) -> dict:
  """Packs documents into blocks and writes the store; returns the manifest (with stats)."""
  packer = BlockPacker(tokenizer, max_block_len, max_title_len)

  def blocks() -> Iterator[Block]:
    for doc in tqdm(documents, total=total, desc="blocks", unit="doc", mininterval=2.0):
      packer.stats["documents"] += 1
      for block in packer.pack(doc):
        packer.stats["tokens"] += len(block.body_ids)
        yield block

  return write_block_store(
      blocks(), out_dir, tokenizer, max_block_len, corpus_fingerprint,
      manifest_extras=lambda: {"span_labels": packer.labels, "stats": dict(packer.stats)},
  )
