r"""Open-QA fine-tuning (ORQA/REALM): frozen index, query tower + span reader trained.

  python launch/finetune.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin \
    --gin_bindings="FINETUNE_INIT = 'realm:workdir/demo/realm'" --workdir=workdir/demo/openqa
"""

from __future__ import annotations

import gin

from launch import cli, common
from realm_jax.checkpoints import best
from realm_jax.train import finetune


def main(argv):
  del argv
  workdir, mesh = common.setup("finetune")
  history = gin.get_configurable(finetune.run_finetune)(workdir=str(workdir), mesh=mesh)
  common.save_operative_config(workdir, "finetune")
  if not history:
    print(f"Open-QA fine-tuning already finished: {workdir} holds its final checkpoint (nothing to do)")
    return
  last = history[-1]
  print(f"Open-QA fine-tuning finished at step {last['step']}: loss {last['loss']:.3f}, "
        f"retrieval recall {last['retrieval_recall']:.3f}, reader oracle {last['reader_oracle']:.3f}, "
        f"span EM {last['span_exact_match']:.3f}")
  record = best.newest_record(workdir)
  if record is not None:
    print(f"best dev exact match {record.best_dev_exact_match:.2f}% ({record.dev_questions} dev questions) at step "
          f"{record.best_step}: evaluate.py and ask.py load that checkpoint ({workdir / best.DEV_EVAL_DIR})")


if __name__ == "__main__":
  cli.run(main)
