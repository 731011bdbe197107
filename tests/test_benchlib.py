"""BENCHMARKS.md upkeep: a rerun rewrites its own section, or only its own run's subsection, where it stands."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from benchlib import write_section  # noqa: E402

BEFORE = """# Benchmarks

## A (a.py)

intro A

### `--c=1` (3 blocks)

old 1

### `--c=2`

old 2

## B

old B
"""


def test_a_run_replaces_only_its_subsection_and_sections_stay_in_place(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text(BEFORE)
  write_section(path, "## A (a.py)", "### `--c=1` (4 blocks)\n\nnew 1\n", subsection="### `--c=1`")
  write_section(path, "## A (a.py)", "### `--c=3`\n\nnew 3\n", subsection="### `--c=3`")
  write_section(path, "## B", "## B\n\nnew B\n")
  write_section(path, "## C", "## C\n\nnew C\n")
  assert path.read_text() == """# Benchmarks

## A (a.py)

intro A

### `--c=1` (4 blocks)

new 1

### `--c=2`

old 2

### `--c=3`

new 3

## B

new B

## C

new C
"""


def test_a_subsection_of_a_missing_section_creates_the_section(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  write_section(path, "## A (a.py)", "### `--c=1`\n\nnew 1\n", subsection="### `--c=1`")
  assert path.read_text().endswith("## A (a.py)\n\n### `--c=1`\n\nnew 1\n")
