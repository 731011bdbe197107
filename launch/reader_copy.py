r"""Does the reader read?  Trains it on oracle candidates and reports its held-out copy gain.

  python launch/reader_copy.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/reader_copy_demo.gin \
    --gin_bindings="BLOCK_STORE = 'workdir/demo/blocks'" --workdir=workdir/reader_copy
Writes `<workdir>/reader_copy.json` (one row per evaluation) and prints a markdown table.
"""

from __future__ import annotations

import json

import gin
import jax

from launch import cli, common
from realm_jax import storage
from realm_jax.eval.reader_copy import markdown_table
from realm_jax.train import reader_copy


def main(argv):
  del argv
  workdir, mesh = common.setup("reader_copy")
  history = gin.get_configurable(reader_copy.run_reader_copy)(mesh=mesh)
  common.save_operative_config(workdir, "reader_copy")
  if jax.process_index() == 0:
    storage.write_once(workdir / "reader_copy.json", json.dumps(history, indent=1).encode())
  print(markdown_table(history))


if __name__ == "__main__":
  cli.run(main)
