r"""Checks every byte of a block store (local, or gs:// streamed) and prints a one-line summary.

  python launch/verify_blocks.py --store=workdir/blocks

What opening a store checks (manifest keys and types, file sizes, offsets against num_blocks), plus every file's
sha256 against the manifest's `files` table, non-decreasing offsets, word-piece ids below vocab_size, spans and
sentence starts inside their block's body, and one valid texts.jsonl line per block whose uid matches uids.bin.
The first problem found ends it with `error: <file>: block <i>: ...` and exit status 2.
"""

from __future__ import annotations

from absl import flags

from launch import cli
from realm_jax.data.verify import verify_block_store

_STORE = flags.DEFINE_string("store", None, "Block store directory: local, or gs://BUCKET/blocks.", required=True)


def main(argv):
  del argv
  summary = verify_block_store(_STORE.value)
  print(f"OK {summary['store']}: {summary['num_blocks']} blocks, {summary['files']} files, {summary['bytes']} bytes "
        "checked (sha256s, offsets, word-piece ids, spans, sentence starts, texts)")


if __name__ == "__main__":
  cli.run(main)
