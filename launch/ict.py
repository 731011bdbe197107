r"""ICT warm start of the retriever.

  python launch/ict.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/ict.gin \
    --gin_bindings="BLOCK_STORE = 'workdir/blocks'" --workdir=workdir/ict
"""

from __future__ import annotations

import gin

from launch import cli, common
from realm_jax.train import ict


def main(argv):
  del argv
  workdir, mesh = common.setup("ict")
  history = gin.get_configurable(ict.run_ict)(workdir=str(workdir), mesh=mesh)
  common.save_operative_config(workdir, "ict")
  if not history:
    print(f"ICT already finished: {workdir} holds its final checkpoint (nothing to do)")
    return
  last = history[-1]
  print(f"ICT finished at step {last['step']}: loss {last['loss']:.3f}, "
        f"in-batch accuracy@1 {last['accuracy']:.3f} (chance {last['chance']:.3f})")


if __name__ == "__main__":
  cli.run(main)
