r"""REALM pre-training with the live index (run launch/refresh_index.py beside it).

  python launch/pretrain.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/realm_pretrain_demo.gin \
    --workdir=workdir/demo/realm
"""

from __future__ import annotations

import gin

from launch import cli, common
from realm_jax.train import pretrain


def main(argv):
  del argv
  workdir, mesh = common.setup("pretrain")
  history = gin.get_configurable(pretrain.run_pretrain)(workdir=str(workdir), mesh=mesh)
  common.save_operative_config(workdir, "pretrain")
  if not history:
    print(f"REALM pre-training already finished: {workdir} holds its final checkpoint (nothing to do)")
    return
  last = history[-1]
  null = (f"retrieval utility {last['retrieval_utility']:.3f}, p(null) {last['p_null']:.3f}, "
          if "p_null" in last else "no null block, ")
  held_out = ""
  if "eval_loss" in last:
    held_out = f"; held-out ({last['eval_queries']:.0f} queries): loss {last['eval_loss']:.3f} with retrieval, "
    if "eval_retrieval_utility" in last:
      held_out += (f"{last['eval_loss'] + last['eval_retrieval_utility']:.3f} reading the null block only "
                   f"(retrieval utility {last['eval_retrieval_utility']:.3f} ± "
                   f"{last['eval_retrieval_utility_se']:.3f} s.e. over queries), ")
    held_out += f"MLM accuracy {last['eval_mlm_accuracy']:.3f}"
  print(f"REALM pre-training finished at step {last['step']}: loss {last['loss']:.3f}, "
        f"MLM accuracy {last['mlm_accuracy']:.3f}, {null}masked span retrieved {last['span_retrieved']:.3f}"
        + held_out)


if __name__ == "__main__":
  cli.run(main)
