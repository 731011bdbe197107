"""What every launcher shares: bad input ends a run with one line and exit status 2, gin files are parsed and
checked (misspelt bindings and macros bound but never used are errors), and a run directory is refused unless
it is new, empty or made by realm-jax jobs."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gin
from absl import app, flags
from etils import epath

from realm_jax import storage
from realm_jax.errors import InputError

VERBOSE = flags.DEFINE_bool("verbose", False, "On a bad-input error, show the traceback too.")

BAD_INPUT = (InputError, storage.StorageError, FileNotFoundError)
BAD_INPUT_STATUS = 2
REPO = Path(__file__).resolve().parents[1]
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")

# Top-level names realm-jax jobs write in a run directory (WORKSPACE.md); hidden ones are in-flight writes.
WORKDIR_ENTRIES = (
    "blocks", ".blocks.staging-*", ".blocks.replaced-*", "*.config.gin", "*.operative_config.gin", "retriever.json",
    "TRAINING_DONE", "train", "tensorboard", "trainer.log", "refresher.log", "index", "eval", "eval_retrieval",
    "eval_step_*", "eval_retrieval_step_*",
    "reader_copy.json", "dev_eval", "queries.json", ".write_probe-*", ".*.partial",
)


def one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, printing `error: <message>` and exiting with status 2 on bad input."""

  def guarded(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except BAD_INPUT as e:
      if VERBOSE.value:
        raise
      print(f"error: {one_line(e)}", file=sys.stderr)
      sys.exit(BAD_INPUT_STATUS)

  app.run(guarded)


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files then bindings.  A gin error is an InputError naming it, and so is a macro bound but never
  used (`NUM_STEP = 1` for `NUM_STEPS`): used neither by this job's config nor by any gin file under gin/ (a
  model gin binds macros for every run gin that combines with it, e.g. READER_INIT for REALM pre-training but
  not for the refresher, which shares the model gin in a sweep)."""
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except (ValueError, SyntaxError, OSError) as e:
    raise InputError(f"gin: {one_line(e)}") from e
  config = gin.config._CONFIG  # noqa: SLF001 - gin has no public view of its bindings
  bound = {key[0] for key in config if key[1] == "gin.macro"}
  used = {"/".join(ref.scopes) for ref in gin.config.iterate_references(config) if ref.selector == "gin.macro"}
  unused = sorted(bound - used - _macros_used_in_repo_gin())
  if unused:
    raise InputError(f"{_where_bound(unused[0], files, bindings)}: gin macro {unused[0]} is bound but never used "
                     f"(misspelt? a binding uses it as %{unused[0]})")


@functools.cache
def _macros_used_in_repo_gin() -> frozenset[str]:
  return frozenset(m for path in (REPO / "gin").rglob("*.gin") for m in _MACRO_REFERENCE.findall(path.read_text()))


def _where_bound(macro: str, files: Sequence[str], bindings: Sequence[str]) -> str:
  """`file:line` (or `--gin_bindings`) of the binding of `macro`, for the error message."""
  pattern = re.compile(rf"^\s*{re.escape(macro)}\s*=")
  if any(pattern.match(line) for binding in bindings for line in binding.splitlines()):
    return "--gin_bindings"
  for file in files:
    path = Path(file) if Path(file).is_file() else REPO / file
    if path.is_file():
      for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if pattern.match(line):
          return f"{file}:{lineno}"
  return "gin (an included file)"


def check_workdir(workdir: storage.PathLike) -> epath.Path:
  """`workdir` when it is absent, empty, or holds only what realm-jax jobs write (WORKSPACE.md); anything else
  is refused, naming the first foreign entry, so no job writes into a directory it did not make."""
  workdir = storage.as_path(workdir)
  if not storage.retrying(workdir.exists, str(workdir)):
    return workdir
  if not workdir.is_dir():
    if not storage.retrying(workdir.exists, str(workdir)):
      return workdir  # an object-store prefix that emptied meanwhile (another job's write probe): absent now
    raise InputError(f"{workdir}: --workdir exists and is not a directory")
  names = sorted(os.path.basename(str(entry).rstrip("/")) for entry in storage.retrying(
      lambda: list(workdir.iterdir()), str(workdir)))
  foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in WORKDIR_ENTRIES)]
  if foreign:
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    raise InputError(f"{workdir}: --workdir holds {foreign[0]!r}{more}, which no realm-jax job writes "
                     "(WORKSPACE.md), so realm-jax did not make it; give a new or empty --workdir")
  return workdir
