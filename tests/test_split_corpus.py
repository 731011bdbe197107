"""tools/split_corpus.py: a corpus split by source tag, line for line, refusing what it cannot split cleanly."""

import json
import subprocess
import sys

from conftest import DEMO_ENTITIES, DEMO_PASSAGES, REPO


def _split(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "tools/split_corpus.py", *flags], cwd=REPO, capture_output=True, text=True,
                        timeout=120)


def test_passages_and_their_entity_lines_go_to_the_corpus_of_their_source_byte_for_byte(tmp_path):
  result = _split(f"--passages={DEMO_PASSAGES}", f"--entities={DEMO_ENTITIES}", "--sources=wiki_vital_summary",
                  f"--selected={tmp_path}/x", f"--rest={tmp_path}/z")
  assert result.returncode == 0, result.stderr
  passages, entities = DEMO_PASSAGES.read_bytes().splitlines(True), DEMO_ENTITIES.read_bytes().splitlines(True)
  chosen = [json.loads(line)["source"] == "wiki_vital_summary" for line in passages]
  for directory, want in (("x", True), ("z", False)):
    assert (tmp_path / directory / "passages.jsonl").read_bytes() == b"".join(
        p for p, c in zip(passages, chosen, strict=True) if c == want)
    assert (tmp_path / directory / "entities.jsonl").read_bytes() == b"".join(
        e for e, c in zip(entities, chosen, strict=True) if c == want)
  assert json.loads(result.stdout)["selected_passages"] == sum(chosen) == 758


def test_misaligned_entities_an_unknown_source_or_a_used_destination_are_refused_and_nothing_is_written(tmp_path):
  lines = DEMO_ENTITIES.read_text().splitlines(True)
  swapped = tmp_path / "entities.jsonl"
  swapped.write_text("".join([lines[1], lines[0], *lines[2:]]))
  first_id = json.loads(DEMO_PASSAGES.read_text().splitlines()[0])["id"]
  result = _split(f"--passages={DEMO_PASSAGES}", f"--entities={swapped}", "--sources=wiki_vital_summary",
                  f"--selected={tmp_path}/x", f"--rest={tmp_path}/z")
  assert result.returncode != 0
  assert f"{swapped}:1: field 'id' is {json.loads(lines[1])['id']!r}, the passage on that line is {first_id!r}" in (
      result.stderr)
  result = _split(f"--passages={DEMO_PASSAGES}", "--sources=wiki_vital_summry", f"--selected={tmp_path}/x",
                  f"--rest={tmp_path}/z")
  assert result.returncode != 0 and "--sources: wiki_vital_summry not found" in result.stderr
  assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
  (tmp_path / "z").mkdir()
  (tmp_path / "z" / "notes.txt").write_text("mine")
  result = _split(f"--passages={DEMO_PASSAGES}", "--sources=wiki_vital_summary", f"--selected={tmp_path}/x",
                  f"--rest={tmp_path}/z")
  assert result.returncode != 0 and "z: exists and is not an empty directory" in result.stderr
  assert [p.name for p in (tmp_path / "z").iterdir()] == ["notes.txt"] and not (tmp_path / "x").exists()
