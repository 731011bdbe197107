"""Launchers: bad input is one `error:` line and exit status 2 (--verbose adds the traceback); gin macros bound but
never used are errors naming them; a run directory realm-jax did not make is refused and left untouched."""

import subprocess
import sys

import gin
import pytest
from conftest import REPO, subprocess_env

from launch import cli
from realm_jax.errors import InputError

MODEL_GINS = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin" / "models").glob("*.gin")
                    if p.name != "remat.gin")
RUN_GINS = sorted(str(p.relative_to(REPO)) for pattern in ("runs/*.gin", "experiments/*.gin")
                  for p in (REPO / "gin").glob(pattern))


def parse(files, bindings=()):
  gin.clear_config()
  try:
    cli.parse_gin(files, list(bindings))
  finally:
    gin.clear_config()


def run_ict(*args):
  return subprocess.run([sys.executable, "launch/ict.py", "--gin_file=gin/models/tiny.gin",
                         "--gin_file=gin/runs/ict_demo.gin", "--gin_bindings=BLOCK_STORE = 'unused'", *args],
                        cwd=REPO, env=subprocess_env(JAX_NUM_CPU_DEVICES="1"), capture_output=True, text=True,
                        timeout=300)


def required_macros(gin_file):
  """Bindings for the macros a gin file, or a file it includes, leaves `%gin.REQUIRED` and does not bind itself
  (a launcher flag or the user sets them)."""
  lines = (REPO / gin_file).read_text().splitlines()
  included = [b for line in lines if line.startswith("include ") for b in required_macros(line.split('"')[1])]
  bound = {line.split("=")[0].strip() for line in lines if "=" in line and not line.startswith((" ", "#"))}
  own = [f"{line.split('=')[0].strip()} = 'x'" for line in lines if "= %gin.REQUIRED" in line]
  return [b for b in included if b.split(" = ")[0] not in bound] + own


@pytest.mark.parametrize("run_gin", RUN_GINS)
def test_every_run_gin_parses_with_the_minilm_model_and_uses_every_macro_it_binds(run_gin):
  parse(["gin/models/minilm.gin", run_gin], required_macros(run_gin))


@pytest.mark.parametrize("model_gin", MODEL_GINS)
def test_every_model_gin_parses_with_the_refresher_and_realm_runs(model_gin):
  for run_gin in ("gin/runs/refresh.gin", "gin/runs/realm_pretrain.gin"):
    parse([model_gin, run_gin], [*required_macros(model_gin), *required_macros(run_gin)])


def test_a_macro_bound_on_the_command_line_but_never_used_is_an_error_naming_it():
  with pytest.raises(InputError, match=r"^--gin_bindings: gin macro NUM_STEP is bound but never used"):
    parse(["gin/models/tiny.gin", "gin/runs/ict_demo.gin"], ["BLOCK_STORE = 'blocks'", "NUM_STEP = 1"])


def test_a_macro_bound_in_a_gin_file_but_used_nowhere_is_an_error_naming_file_and_line(tmp_path):
  run_gin = tmp_path / "run.gin"
  run_gin.write_text((REPO / "gin/runs/ict_demo.gin").read_text() + "\nNUM_STEP = 1\n")
  lineno = len(run_gin.read_text().splitlines())
  with pytest.raises(InputError, match=rf"^{run_gin}:{lineno}: gin macro NUM_STEP is bound but never used"):
    parse(["gin/models/tiny.gin", str(run_gin)], ["BLOCK_STORE = 'blocks'"])


def test_a_misspelt_binding_is_an_input_error_on_one_line():
  with pytest.raises(InputError, match="hiden_size") as error:
    parse(["gin/models/tiny.gin"], ["bert.BertConfig.hiden_size = 3"])
  assert "\n" not in cli.one_line(error.value)


def test_bad_input_is_one_error_line_with_exit_status_2_and_verbose_shows_the_traceback(tmp_path):
  result = run_ict("--gin_bindings=NUM_STEP = 1", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: --gin_bindings: gin macro NUM_STEP") and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
  verbose = run_ict("--gin_bindings=NUM_STEP = 1", f"--workdir={tmp_path / 'run'}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "InputError" in verbose.stderr


def test_a_workdir_holding_files_no_job_writes_is_refused_and_left_untouched(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  (tmp_path / "train").mkdir()
  result = run_ict(f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: {tmp_path}: --workdir holds 'notes.txt', which no realm-jax job writes" in result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train"]
  assert (tmp_path / "notes.txt").read_text() == "mine" and not list((tmp_path / "train").iterdir())


def test_a_new_an_empty_or_a_realm_jax_workdir_is_accepted(tmp_path):
  assert cli.check_workdir(tmp_path / "new") == tmp_path / "new"
  cli.check_workdir(tmp_path)
  for name in ("train", "index", "eval", "tensorboard"):
    (tmp_path / name).mkdir()
  for name in ("ict.config.gin", "pretrain.operative_config.gin", "retriever.json", "TRAINING_DONE", "trainer.log"):
    (tmp_path / name).write_text("x")
  cli.check_workdir(tmp_path)
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(InputError, match="'a_file'"):
    cli.check_workdir(tmp_path)
  with pytest.raises(InputError, match="not a directory"):
    cli.check_workdir(tmp_path / "a_file")


def test_a_gcs_workdir_is_checked_the_same_way(gcs_bucket):
  from etils import epath

  workdir = epath.Path(f"{gcs_bucket}/foreign")
  (workdir / "index").mkdir(parents=True)
  (workdir / "index" / "x").write_text("x")
  cli.check_workdir(workdir)
  (workdir / "photo.jpg").write_text("x")
  with pytest.raises(InputError, match="'photo.jpg'"):
    cli.check_workdir(workdir)
