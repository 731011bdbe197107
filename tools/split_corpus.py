r"""Splits a passages JSONL (and its line-aligned entities JSONL) by the passages' `source` field into two corpora.

  python tools/split_corpus.py --passages=data/demo/passages.jsonl \
    --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --sources=wiki_vital_summary \
    --selected=workdir/demo/query_corpus --rest=workdir/demo/knowledge_corpus

Passages whose `source` is one of --sources go to --selected, the others to --rest, each as `passages.jsonl` and
(with --entities) `entities.jsonl`, lines copied byte for byte and in order.  Made for the separate-corpus REALM
setting on the offline data (queries from one corpus X, retrieval from another Z, as the paper's CC-News rows):
build one block store from each (launch/build_blocks.py) and bind QUERY_STORE / BLOCK_STORE.  Both output
directories must be new or empty; a passage and its entity line must name the same `id`; a --sources tag that
no passage has is refused (a typo would otherwise give an empty corpus).  Nothing is written before the whole input
has been checked, and a failed write removes only the files this run created.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from absl import app, flags

_PASSAGES = flags.DEFINE_string("passages", None, "Passages JSONL {id, source, title, text}.", required=True)
_ENTITIES = flags.DEFINE_string("entities", None, "Entity spans JSONL {id, ents}, line-aligned with --passages.")
_SOURCES = flags.DEFINE_list("sources", None, "`source` tags that go to --selected.", required=True)
_SELECTED = flags.DEFINE_string("selected", None, "Directory for the passages with one of --sources.", required=True)
_REST = flags.DEFINE_string("rest", None, "Directory for the other passages.", required=True)


class SplitError(ValueError):
  """Input that cannot be split: one line naming the file, line and field."""


def _record(line: bytes, where: str, field: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise SplitError(f"{where}: not JSON ({e.msg})") from None
  value = record.get(field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    raise SplitError(f"{where}: field {field!r} is missing or not a string")
  return value


def plan_split(passages: Path, entities: Path | None, sources: set[str]) -> tuple[list[bool], Counter]:
  """Per passage line, whether it goes to the selected corpus; and the passages per source tag."""
  lines = passages.read_bytes().splitlines()
  entity_lines = entities.read_bytes().splitlines() if entities else None
  if entity_lines is not None and len(entity_lines) != len(lines):
    raise SplitError(f"{entities}: {len(entity_lines)} lines, {passages} has {len(lines)}: not line-aligned")
  selected, counts = [], Counter()
  for number, line in enumerate(lines, 1):
    source = _record(line, f"{passages}:{number}", "source")
    if entity_lines is not None:
      passage_id = _record(line, f"{passages}:{number}", "id")
      entity_id = _record(entity_lines[number - 1], f"{entities}:{number}", "id")
      if entity_id != passage_id:
        raise SplitError(f"{entities}:{number}: field 'id' is {entity_id!r}, the passage on that line is "
                         f"{passage_id!r}")
    counts[source] += 1
    selected.append(source in sources)
  unknown = sorted(sources - set(counts))
  if unknown:
    raise SplitError(f"--sources: {', '.join(unknown)} not found in {passages} (its sources: "
                     f"{', '.join(sorted(counts))})")
  if all(selected):
    raise SplitError(f"--sources: every passage of {passages} is selected, so --rest would be empty")
  return selected, counts


def _check_destination(directory: Path) -> None:
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    raise SplitError(f"{directory}: exists and is not an empty directory; give a new one")


def write_split(passages: Path, entities: Path | None, selected: list[bool], out: dict[bool, Path]) -> None:
  """Copies each input line to `out[selected]`; on failure removes the files it created, nothing else."""
  inputs = {"passages.jsonl": passages, **({"entities.jsonl": entities} if entities else {})}
  created: list[Path] = []
  try:
    for name, path in inputs.items():
      parts: dict[bool, list[bytes]] = {True: [], False: []}
      for line, chosen in zip(path.read_bytes().splitlines(keepends=True), selected, strict=True):
        parts[chosen].append(line if line.endswith(b"\n") else line + b"\n")
      for chosen, directory in out.items():
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        with open(target, "xb") as f:  # never replaces a file
          created.append(target)
          f.write(b"".join(parts[chosen]))
  except BaseException:
    for path in created:
      path.unlink(missing_ok=True)
    raise


def main(argv):
  del argv
  passages, entities = Path(_PASSAGES.value), Path(_ENTITIES.value) if _ENTITIES.value else None
  out = {True: Path(_SELECTED.value), False: Path(_REST.value)}
  try:
    if out[True].resolve() == out[False].resolve():
      raise SplitError("--selected and --rest are the same directory")
    for directory in out.values():
      _check_destination(directory)
    selected, counts = plan_split(passages, entities, set(_SOURCES.value))
    write_split(passages, entities, selected, out)
  except SplitError as e:
    sys.exit(f"error: {e}")
  chosen = sum(selected)
  print(json.dumps({"selected": str(out[True]), "selected_passages": chosen, "rest": str(out[False]),
                    "rest_passages": len(selected) - chosen, "passages_per_source": dict(sorted(counts.items()))}))


if __name__ == "__main__":
  app.run(main)
