"""Reading the document corpus: passages JSONL (+ pre-computed entity spans), validated line by line.

Passages: `{"id": str, "title": str, "text": str, ...}` one per line.
Entities: `{"id": str, "ents": [[start_char, end_char, LABEL], ...]}`, line i for passage i, with
`0 <= start_char < end_char <= len(text)`.
Files (these and the question files) are UTF-8 text, optionally starting with a byte-order mark, with LF or CRLF
line ends; blank lines are skipped.  A gzip-compressed file is read as such whatever its name.
Every problem is reported as `file:line: field: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import re
import reprlib
import zlib
from collections.abc import Iterator
from pathlib import Path

from realm_jax.errors import InputError


class CorpusError(InputError):
  """Malformed corpus input; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str
  title: str
  text: str
  spans: tuple[tuple[int, int, str], ...] = ()  # (start_char, end_char, label) into `text`
  source: str = ""  # "file:line" the document came from, for error messages


_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json_line(path: Path, lineno: int, line: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  except ValueError as e:  # an integer of more than 4300 digits
    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from e
  except RecursionError as e:
    raise CorpusError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from e
  if not isinstance(record, dict):
    raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
  if _SURROGATE_ESCAPE.search(line) and (surrogate := _unpaired_surrogate(record)):
    raise CorpusError(f"{path}:{lineno}: a string holds an unpaired UTF-16 surrogate ({surrogate!r}), "
                      "not Unicode text")
  return record


def _unpaired_surrogate(record: dict) -> str | None:
  """The first half of a UTF-16 pair that a `\\ud800`-style escape left alone in a string of `record`, if any."""
  stack: list = [record]
  while stack:  # no recursion: JSON nested hundreds deep is valid
    value = stack.pop()
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        return value[e.start]
    elif isinstance(value, dict):
      stack.extend(value)
      stack.extend(value.values())
    elif isinstance(value, list):
      stack.extend(value)
  return None


def _field(record: dict, name: str, kind: type, where: str):
  if name not in record:
    raise CorpusError(f"{where}: missing field {name!r}")
  value = record[name]
  if not isinstance(value, kind):
    raise CorpusError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
  return value


def _read_lines(path: Path, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, str]]:
  """(line number, text) of the non-blank lines, line ends removed: UTF-8 (optional BOM), LF or CRLF, maybe gzip.

  `start`: (byte offset, line number) to begin at, a `record_positions` entry (a gzip file's offsets are of its
  decompressed bytes; reaching one decompresses what comes before)."""
  for lineno, line, _ in _lines_at(path, start):
    yield lineno, line


def _lines_at(path: Path, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, str, int]]:
  """`_read_lines` with each line's byte offset: (line number, text, offset)."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  with path.open("rb") as f:
    gzipped = f.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
  offset, lineno = start
  with path.open("rb") as stored, gzip.GzipFile(fileobj=stored) if gzipped else stored as f:
    try:
      f.seek(offset)
    except (OSError, EOFError, zlib.error) as e:
      raise CorpusError(f"{path}: corrupt or truncated gzip data before byte {offset} ({e})") from e
    while True:
      try:
        raw = f.readline()
      except (OSError, EOFError, zlib.error) as e:
        if not gzipped:
          raise
        raise CorpusError(f"{path}:{lineno + 1}: corrupt or truncated gzip data ({e})") from e
      if not raw:
        return
      lineno += 1
      at, offset = offset, offset + len(raw)
      if lineno == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from e
      line = line.rstrip("\r\n")
      if line.strip():
        yield lineno, line, at


def record_positions(path: str | Path, every: int) -> tuple[int, list[tuple[int, int]]]:
  """(records, where records 0, every, 2 * every, ... begin): the non-blank lines of `path` (as `read_documents`
  reads them) counted in one pass, with the (byte offset, line number before it) that `_read_lines` starts at."""
  positions, count = [], 0
  for lineno, _, at in _lines_at(Path(path)):
    if count % every == 0:
      positions.append((at, lineno - 1))
    count += 1
  return count, positions


def validate_spans(ents: object, text: str, where: str) -> tuple[tuple[int, int, str], ...]:
  """Checks `[[start, end, label], ...]` against the passage text."""
  if not isinstance(ents, list):
    raise CorpusError(f"{where}: field 'ents' must be a list")
  spans = []
  for k, ent in enumerate(ents):
    ok = (
        isinstance(ent, list) and len(ent) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in ent[:2]) and isinstance(ent[2], str)
    )
    if not ok:
      raise CorpusError(f"{where}: ents[{k}] must be [start_char, end_char, label], got {reprlib.repr(ent)}")
    start, end, label = ent
    if start > end:
      raise CorpusError(f"{where}: ents[{k}] = {reprlib.repr(ent)}: start > end")
    if start == end:
      raise CorpusError(f"{where}: ents[{k}] = {reprlib.repr(ent)}: empty span (start == end)")
    if start < 0 or end > len(text):
      raise CorpusError(f"{where}: ents[{k}] = {reprlib.repr(ent)} is outside the passage text (length {len(text)})")
    spans.append((start, end, label))
  return tuple(spans)


def read_documents(passages: str | Path, entities: str | Path | None = None,
                   start: tuple[tuple[int, int], tuple[int, int] | None] | None = None,
                   count: int | None = None) -> Iterator[Document]:
  """Yields documents in file order; entity line i must describe passage line i.

  A part of the corpus (a shard): `start` = where its first passage and entity records begin
  (`record_positions`), `count` = how many records (None: to the end, where the files must end together).
  Duplicate ids are found within what is read."""
  passages = Path(passages)
  passages_at, entities_at = start or ((0, 0), (0, 0))
  entity_lines = _read_lines(Path(entities), entities_at or (0, 0)) if entities else None
  seen_ids: set[str] = set()
  for lineno, line in itertools.islice(_read_lines(passages, passages_at), count):
    where = f"{passages}:{lineno}"
    record = _parse_json_line(passages, lineno, line)
    doc_id = _field(record, "id", str, where)
    title = _field(record, "title", str, where)
    text = _field(record, "text", str, where)
    if doc_id in seen_ids:
      raise CorpusError(f"{where}: field 'id': duplicate document id {doc_id!r}")
    seen_ids.add(doc_id)
    spans: tuple[tuple[int, int, str], ...] = ()
    if entity_lines is not None:
      try:
        ent_lineno, ent_line = next(entity_lines)
      except StopIteration:
        raise CorpusError(f"{entities}: ends before passage {doc_id!r} ({where})") from None
      ent_where = f"{entities}:{ent_lineno}"
      ent_record = _parse_json_line(Path(entities), ent_lineno, ent_line)
      ent_id = _field(ent_record, "id", str, ent_where)
      if ent_id != doc_id:
        raise CorpusError(f"{ent_where}: field 'id': {ent_id!r} does not match passage {doc_id!r} ({where})")
      spans = validate_spans(_field(ent_record, "ents", list, ent_where), text, ent_where)
    yield Document(doc_id, title, text, spans, where)
  if entity_lines is not None and count is None:
    for ent_lineno, _ in entity_lines:
      raise CorpusError(f"{entities}:{ent_lineno}: more entity lines than passages in {passages}")


def fingerprint_files(*paths: str | Path | None) -> str:
  """sha256 over the bytes of the given files (a corpus fingerprint for manifests)."""
  digest = hashlib.sha256()
  for path in paths:
    if path is None:
      continue
    with Path(path).open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()
