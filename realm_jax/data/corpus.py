"""Reading the document corpus: passages JSONL (+ pre-computed entity spans), validated line by line.

Passages: `{"id": str, "title": str, "text": str, ...}` one per line.
Entities: `{"id": str, "ents": [[start_char, end_char, LABEL], ...]}`, line i for passage i.
Every problem is reported as `file:line: field: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def _parse_json_line(path: Path, lineno: int, line: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(record, dict):
    raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
  return record


def _field(record: dict, name: str, kind: type, where: str):
  if name not in record:
    raise CorpusError(f"{where}: missing field {name!r}")
  value = record[name]
  if not isinstance(value, kind):
    raise CorpusError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
  return value


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        yield lineno, line


def validate_spans(ents: object, text: str, where: str) -> tuple[tuple[int, int, str], ...]:
  """Checks `[[start, end, label], ...]` against the passage text."""
  if not isinstance(ents, list):
    raise CorpusError(f"{where}: field 'ents' must be a list")
  spans = []
  for k, ent in enumerate(ents):
    ok = (
        isinstance(ent, list) and len(ent) == 3 and all(isinstance(v, int) for v in ent[:2])
        and isinstance(ent[2], str)
    )
    if not ok:
      raise CorpusError(f"{where}: ents[{k}] must be [start_char, end_char, label], got {ent!r}")
    start, end, label = ent
    if not 0 <= start < end <= len(text):
      raise CorpusError(
          f"{where}: ents[{k}] = {ent!r} is outside the passage text (length {len(text)})"
      )
    spans.append((start, end, label))
  return tuple(spans)


def read_documents(passages: str | Path, entities: str | Path | None = None) -> Iterator[Document]:
  """Yields documents in file order; entity line i must describe passage line i."""
  passages = Path(passages)
  entity_lines = _read_lines(Path(entities)) if entities else None
  seen_ids: set[str] = set()
  for lineno, line in _read_lines(passages):
    where = f"{passages}:{lineno}"
    record = _parse_json_line(passages, lineno, line)
    doc_id = _field(record, "id", str, where)
    title = _field(record, "title", str, where)
    text = _field(record, "text", str, where)
    if doc_id in seen_ids:
      raise CorpusError(f"{where}: field 'id': duplicate document id {doc_id!r}")
    seen_ids.add(doc_id)
    if not text.strip():
      raise CorpusError(f"{where}: field 'text': empty document {doc_id!r}")
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
  if entity_lines is not None:
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
