r"""The index refresh job: watches the trainer's checkpoints, re-embeds all blocks, publishes indexes.

  python launch/refresh_index.py --block_store=workdir/demo/blocks --workdir=workdir/demo/realm [--once | --step=N]

(--gin_file defaults to gin/runs/refresh.gin; give it explicitly when adding other gin files.)

What to embed with (tower, block length, projection, LayerNorm eps) is read from the trainer's
<workdir>/retriever.json; gin (--gin_file=gin/runs/refresh.gin, refresher.RefreshJob) sets only the job's
batching and backend, and a retriever setting that disagrees with the trainer's is refused.  Runs until the
trainer writes <workdir>/TRAINING_DONE and its last checkpoint is indexed.  Compiled steps persist across restarts
in JAX's compilation cache, refresher.run_refresh.compilation_cache_dir (refresh.gin: ~/.cache/realm_jax/jax).
"""

from __future__ import annotations

import gin
from absl import flags

from launch import cli, common
from realm_jax.refresh import refresher

flags.FLAGS.set_default("gin_file", ["gin/runs/refresh.gin"])  # without --gin_file: the job's defaults
_ONCE = flags.DEFINE_bool("once", False, "Index the newest checkpoint (if not yet indexed) and exit.")
_STEP = flags.DEFINE_integer("step", None, "Index this checkpoint step and exit.")
_POLL = flags.DEFINE_float("poll_seconds", 10.0, "Seconds between looks for a new checkpoint.")
_BLOCK_STORE = flags.DEFINE_string("block_store", None, "Local block store (sets gin's BLOCK_STORE).")


def main(argv):
  del argv
  workdir, mesh = common.setup("refresh", [f"BLOCK_STORE = {_BLOCK_STORE.value!r}"] if _BLOCK_STORE.value else [])
  published = gin.get_configurable(refresher.run_refresh)(
      workdir=str(workdir), mesh=mesh, once=_ONCE.value, step=_STEP.value, poll_seconds=_POLL.value
  )
  common.save_operative_config(workdir, "refresh")
  print(f"refresher published index steps {published}")


if __name__ == "__main__":
  cli.run(main)
