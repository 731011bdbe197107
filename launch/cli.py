"""Runs a launcher's `main`: bad input ends it with one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from realm_jax.errors import InputError
from realm_jax.storage import StorageError

VERBOSE = flags.DEFINE_bool("verbose", False, "On a bad-input error, show the traceback too.")

BAD_INPUT = (InputError, StorageError, FileNotFoundError)
BAD_INPUT_STATUS = 2


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
