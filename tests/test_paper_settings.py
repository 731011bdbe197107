"""The paper's and the released code's settings: docs/paper_settings.md's table is what the paper-scale gin files
bind, read back through gin (bert_base.gin + the row's gin file, macros followed)."""

import ast

import gin
import pytest
from conftest import REPO

DOC = REPO / "docs" / "paper_settings.md"
MODEL_GIN = "gin/models/bert_base.gin"
OPEN = "open:"


def table_rows():
  """(stage, setting, value cell, gin file, binding) for each row of the doc's gin-bound table."""
  section = DOC.read_text().split("## Gin-bound settings", 1)[1].split("\n## ", 1)[0]
  rows = []
  for line in section.splitlines():
    if not line.startswith("|"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    assert len(cells) == 6, f"{DOC.name}: a row of 6 cells expected: {line}"
    if cells[0] in ("stage", "---"):
      continue
    stage, setting, value, _, gin_file, binding = cells
    rows.append((stage, setting, value, gin_file.strip("`"), binding.strip("`")))
  return rows


def expected_value(cell):
  """The table's value: a backticked Python literal, or None for an `open:` setting."""
  if cell.startswith(OPEN):
    return None
  assert cell.startswith("`") and cell.endswith("`"), f"value {cell!r}: a `literal` or '{OPEN} ...' expected"
  return ast.literal_eval(cell.strip("`"))


def bound_value(binding):
  """The value gin binds to `binding`, through macros (`%NAME`)."""
  value = gin.query_parameter(binding)
  while isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
    value = gin.query_parameter(str(value))
  return value


def required_macros(gin_file):
  """Placeholder bindings for the macros `gin_file` leaves `%gin.REQUIRED` (a launcher flag sets them)."""
  lines = (REPO / gin_file).read_text().splitlines()
  return [f"{line.split('=')[0].strip()} = 'unused'" for line in lines if "= %gin.REQUIRED" in line]


ROWS = table_rows()
GIN_FILES = sorted({row[3] for row in ROWS})


def test_the_table_gives_batch_size_learning_rate_and_steps_of_every_paper_run():
  assert len(ROWS) >= 40
  by_file = {f: {row[4] for row in ROWS if row[3] == f} for f in GIN_FILES}
  for run in ("gin/runs/realm_pretrain.gin", "gin/runs/ict.gin", "gin/runs/openqa.gin"):
    assert {"trainer.TrainerConfig.num_steps", "optimizer.OptimizerConfig.learning_rate"} <= by_file[run], run
    assert any(b.endswith(".batch_size") for b in by_file[run]), run
  assert all((REPO / f).is_file() for f in GIN_FILES)
  open_rows = [(stage, setting) for stage, setting, value, _, _ in ROWS if value.startswith(OPEN)]
  assert open_rows == [("Open-QA fine-tuning", "training steps")]  # NQ's step count is not in the released code


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_paper_gin_files_bind_the_documented_values(gin_file):
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings([MODEL_GIN, gin_file], required_macros(gin_file))
    drifted = []
    for stage, setting, cell, row_file, binding in ROWS:
      if row_file != gin_file:
        continue
      value = bound_value(binding)  # also for `open:` rows: the binding the table names must exist
      expected = expected_value(cell)
      if expected is not None and (type(value) is not type(expected) or value != expected):
        drifted.append(f"{stage} {setting}: {binding} = {value!r}, {DOC.name} says {expected!r}")
    assert not drifted, "\n".join(drifted)
  finally:
    gin.clear_config()
