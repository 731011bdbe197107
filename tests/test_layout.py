"""The code's shape: every training run has one signature, and the layers import one way."""

import ast
import inspect

import pytest
from conftest import REPO

from realm_jax.train import finetune, ict, pretrain, reader_copy

PACKAGE = REPO / "realm_jax"


@pytest.mark.parametrize("run", [ict.run_ict, pretrain.run_pretrain, finetune.run_finetune])
def test_every_training_run_takes_workdir_mesh_spec_trainer_and_optimizer_then_few_more(run):
  params = list(inspect.signature(run).parameters)
  assert params[:5] == ["workdir", "mesh", "spec", "trainer", "optimizer"] and len(params) <= 8


def test_the_probe_run_takes_trainer_and_optimizer_configs_too():
  params = inspect.signature(reader_copy.run_reader_copy).parameters
  assert {"trainer", "optimizer"} <= set(params) and len(params) <= 8


def test_the_refresh_job_and_the_evaluation_take_config_objects_not_parameter_bags():
  from realm_jax.eval.openqa_eval import run_evaluation
  from realm_jax.refresh.refresher import run_refresh

  assert "job" in inspect.signature(run_refresh).parameters and "config" in inspect.signature(run_evaluation).parameters
  assert all(len(inspect.signature(run).parameters) <= 8 for run in (run_refresh, run_evaluation))


def _imports(package: str) -> dict[str, set[str]]:
  """realm_jax modules imported by each file of `realm_jax/<package>`."""
  found = {}
  for path in sorted((PACKAGE / package).glob("*.py")):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
    found[path.name] = {n for n in names if n.startswith("realm_jax.")}
  return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("refresh", "realm_jax.train"), ("eval", "realm_jax.train"), ("data", "realm_jax.models"),
    ("objectives", "realm_jax.train"), ("retrieval", "realm_jax.train"), ("checkpoints", "realm_jax.train"),
    ("eval", "realm_jax.refresh"), ("checkpoints", "realm_jax.refresh"), ("models", "realm_jax.train"),
])
def test_layers_import_one_way(package, forbidden):
  offending = {f: sorted(n for n in names if n.startswith(forbidden)) for f, names in _imports(package).items()}
  assert not {f: n for f, n in offending.items() if n}, f"realm_jax/{package} imports {forbidden}"
