"""The project's bad-input error: the launchers print its one-line message (no traceback) and exit with status 2."""

from __future__ import annotations


class InputError(ValueError):
  """A file, flag, config, block store, index or checkpoint that cannot be used as given.

  The message is one line, `file:line: field: what is wrong` where there is a file, line and field, and says
  how to fix it where there is one way to.
  """
