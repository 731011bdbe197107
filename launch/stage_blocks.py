r"""Stages a block store from GCS onto this host's disk (a verified copy), and prints the local path.

  python launch/stage_blocks.py --source=gs://BUCKET/blocks --dest=/tmp/realm-jax-blocks

Then point jobs at the copy: --gin_bindings="BLOCK_STORE = '/tmp/realm-jax-blocks'".  Every file is checked
against the size and sha256 in the store's manifest; re-running on a staged copy is a fast no-op, and a --dest
holding anything else is refused, never overwritten.  launch/tpu/pod.py's `stage` step runs this on every host.
"""

from __future__ import annotations

from absl import flags

from launch import cli
from realm_jax.data.staging import stage_block_store

_SOURCE = flags.DEFINE_string("source", None, "Block store to copy (gs://BUCKET/blocks, or a local path).",
                              required=True)
_DEST = flags.DEFINE_string("dest", None, "Local directory for the copy (created; its parent may exist).",
                            required=True)


def main(argv):
  del argv
  print(stage_block_store(_SOURCE.value, _DEST.value))


if __name__ == "__main__":
  cli.run(main)
