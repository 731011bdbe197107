r"""The index refresh job: watches the trainer's checkpoints, re-embeds all blocks, publishes indexes.

  python launch/refresh_index.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/refresh.gin \
    --gin_bindings="BLOCK_STORE = 'workdir/demo/blocks'" --workdir=workdir/demo/ict [--once | --step=N]

Runs until the trainer writes <workdir>/TRAINING_DONE and its last checkpoint is indexed.
"""

from __future__ import annotations

import gin
from absl import app, flags

from launch import common
from realm_jax.refresh import refresher

_ONCE = flags.DEFINE_bool("once", False, "Index the newest checkpoint (if not yet indexed) and exit.")
_STEP = flags.DEFINE_integer("step", None, "Index this checkpoint step and exit.")
_POLL = flags.DEFINE_float("poll_seconds", 10.0, "Seconds between looks for a new checkpoint.")


def main(argv):
  del argv
  workdir, mesh = common.setup("refresh")
  published = gin.get_configurable(refresher.run_refresh)(
      workdir=str(workdir), mesh=mesh, once=_ONCE.value, step=_STEP.value, poll_seconds=_POLL.value
  )
  common.save_operative_config(workdir, "refresh")
  print(f"refresher published index steps {published}")


if __name__ == "__main__":
  app.run(main)
