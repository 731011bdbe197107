r"""Evaluates a fine-tuned Open-QA run: exact match and answer-recall@k per dataset, with baselines.

  python launch/evaluate.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin \
    --workdir=workdir/demo/openqa
Loads the best checkpoint by dev exact match when fine-tuning recorded one (<workdir>/dev_eval/), else the
newest, and logs which step and why.  Writes <workdir>/eval/<dataset>.json (predictions + the blocks they came
from), results.json, results.md; `--step=N` evaluates checkpoint N instead, into <workdir>/eval_step_N/.
`--retrieval_only` skips the span reader (answer-recall@k of every system, no EM) and writes
<workdir>/eval_retrieval/: fast enough for whole datasets on a CPU.
`--pretrained_run=<REALM workdir> --retrieval_only` measures a pre-trained retriever before any fine-tuning (the
zero-shot answer-recall of Table 2 at small scale), searching the index its refresher published of its newest
checkpoint; --workdir is a new directory for the results.
Any question file, without editing the project's data folders or gin files: `--questions=NAME=PATH` (repeat it;
JSONL as realm_jax/data/questions.py describes, local or gs://) replaces the gin's datasets, and
`--answer_format=NAME=regex` (or `strings`) declares a file's answers when its records lack `answer_is_regex`:
  python launch/evaluate.py <same flags> --questions=trec=/data/trec_test.jsonl --answer_format=trec=regex
"""

from __future__ import annotations

import dataclasses

import gin
import jax
from absl import flags

from launch import cli, common
from realm_jax.errors import InputError
from realm_jax.eval import openqa_eval

_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N questions of each dataset.")
_STEP = flags.DEFINE_integer("step", None, "Evaluate this fine-tuning checkpoint, not the best by dev EM "
                             "(results in <workdir>/eval_step_<N>/).")
_RETRIEVAL_ONLY = flags.DEFINE_bool("retrieval_only", False, "Recall@k only: skip the span reader (no EM).")
_PRETRAINED_RUN = flags.DEFINE_string("pretrained_run", None, "With --retrieval_only: the recall of this REALM "
                                      "pre-training workdir's retriever (newest checkpoint, its own index) instead "
                                      "of a fine-tuned model's; results go to --workdir.")
_QUESTIONS = flags.DEFINE_multi_string("questions", [], "NAME=PATH: evaluate this JSONL question file (repeatable) "
                                       "instead of the gin's EvaluationConfig.datasets.")
_ANSWER_FORMAT = flags.DEFINE_multi_string("answer_format", [], "NAME=FORMAT (auto, strings, regex): how the answers "
                                           "of --questions file NAME are read (default auto: answer_is_regex).")


def named_values(flag: str, values: list[str]) -> dict[str, str]:
  """{NAME: VALUE} of `--flag=NAME=VALUE` values; a value without '=' or a repeated NAME is refused."""
  out = {}
  for value in values:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
      raise InputError(f"--{flag}={value}: expected NAME=VALUE")
    if name in out:
      raise InputError(f"--{flag}: {name!r} given twice")
    out[name] = rest
  return out


def evaluation_config() -> openqa_eval.EvaluationConfig:
  """The gin's EvaluationConfig, its datasets replaced by --questions and --answer_format when given."""
  config = gin.get_configurable(openqa_eval.EvaluationConfig)()
  files = named_values("questions", _QUESTIONS.value)
  formats = named_values("answer_format", _ANSWER_FORMAT.value)
  if formats and not files:
    raise InputError("--answer_format needs --questions (the gin's datasets set theirs with "
                     "EvaluationConfig.answer_formats)")
  if not files:
    return config
  return dataclasses.replace(config, datasets=files, questions_dir=".", answer_formats=formats)


def main(argv):
  del argv
  workdir, mesh = common.setup("evaluate")
  rows = gin.get_configurable(openqa_eval.run_evaluation)(workdir=str(workdir), mesh=mesh, limit=_LIMIT.value,
                                                          read=not _RETRIEVAL_ONLY.value, config=evaluation_config(),
                                                          pretrained_run=_PRETRAINED_RUN.value, step=_STEP.value)
  common.save_operative_config(workdir, "evaluate")
  if jax.process_index() == 0:
    print(openqa_eval.results_table(rows))
    print(f"results: {openqa_eval.output_dir(workdir, not _RETRIEVAL_ONLY.value, _STEP.value)}")


if __name__ == "__main__":
  cli.run(main)
