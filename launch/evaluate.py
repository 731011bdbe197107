r"""Evaluates a fine-tuned Open-QA run: exact match and answer-recall@k per dataset, with baselines.

  python launch/evaluate.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin \
    --workdir=workdir/demo/openqa
Loads the best checkpoint by dev exact match when fine-tuning recorded one (<workdir>/dev_eval/), else the
newest, and logs which step and why.  Writes <workdir>/eval/<dataset>.json (predictions + the blocks they came
from), results.json, results.md.
`--retrieval_only` skips the span reader (answer-recall@k of every system, no EM) and writes
<workdir>/eval_retrieval/: fast enough for whole datasets on a CPU.
"""

from __future__ import annotations

import gin
import jax
from absl import flags

from launch import cli, common
from realm_jax.eval import openqa_eval

_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N questions of each dataset.")
_RETRIEVAL_ONLY = flags.DEFINE_bool("retrieval_only", False, "Recall@k only: skip the span reader (no EM).")


def main(argv):
  del argv
  workdir, mesh = common.setup("evaluate")
  rows = gin.get_configurable(openqa_eval.run_evaluation)(workdir=str(workdir), mesh=mesh, limit=_LIMIT.value,
                                                          read=not _RETRIEVAL_ONLY.value)
  common.save_operative_config(workdir, "evaluate")
  if jax.process_index() == 0:
    print(openqa_eval.results_table(rows))
    print(f"results: {workdir / ('eval_retrieval' if _RETRIEVAL_ONLY.value else 'eval')}")


if __name__ == "__main__":
  cli.run(main)
