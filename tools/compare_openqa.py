r"""Table 1 of several Open-QA evaluations: EM per dataset with 95% bootstrap intervals, each row's paired
difference to a baseline row over the same questions, and the retrieval baselines' answer-recall beside them
(each run's R@5 also minus MiniLM zero-shot's, question by question, when a run was evaluated beside MiniLM).

  python tools/compare_openqa.py --run=orqa=workdir/table1/orqa_openqa_nq_open_dev/eval \
    --run=realm=workdir/table1/realm_openqa_nq_open_dev/eval --baseline=orqa

Each --run is an `evaluate.py` output folder (`<dataset>.json` per-question records, `results.json`); the runs
must have answered the same questions (by qid) of each dataset they share.  A NAME given more than once is one row
over several fine-tuning seeds (runs NAME:1, NAME:2, ... in the order given; run K of a row is paired with run K
of the baseline, so give both rows' seeds in the same order): each run gets its line, and a second table gives
each row's mean EM over its runs and its mean paired difference with a 95% t-interval over runs.

  python tools/compare_openqa.py --run=orqa=workdir/s2/orqa_openqa/eval --run=orqa=workdir/s3/orqa_openqa/eval \
    --run=realm=workdir/s2/realm_openqa/eval --run=realm=workdir/s3/realm_openqa/eval --baseline=orqa
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from absl import app, flags
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm_jax.errors import InputError  # noqa: E402
from realm_jax.eval import bootstrap  # noqa: E402

_RUNS = flags.DEFINE_multi_string("run", [], "NAME=DIR: an evaluate.py output folder (<workdir>/eval); a NAME "
                                   "given again adds a seed to that row.")
_BASELINE = flags.DEFINE_string("baseline", None, "The run the others are compared with, question by question.")
_SAMPLES = flags.DEFINE_integer("samples", 10_000, "Bootstrap resamples.")


REFERENCE = "MiniLM zero-shot"  # the sentence encoder both rows start from, as sentence-transformers retrieves


class Answer(NamedTuple):
  correct: bool
  retrieved: bool  # an answer in realm-jax's top 5 blocks
  baselines: dict[str, bool]  # {baseline: an answer in its top 5}, for the baselines evaluated beside the run


def per_question(directory: Path, dataset: str) -> dict[str, Answer]:
  """{qid: Answer} of one dataset's records."""
  path = directory / f"{dataset}.json"
  try:
    records = json.loads(path.read_text())
    return {str(r["qid"]): Answer(bool(r["correct"]), any(r["retrieved_has_answer"][:5]),
                                  {s: any(h[:5]) for s, h in r.get("baselines_has_answer", {}).items()})
            for r in records}
  except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise InputError(f"{path}: not an evaluate.py per-question file ({type(e).__name__}: {e})") from e


def reference_hits(answers: dict[Path, dict[str, Answer]], dataset: str, qids: list[str]) -> list[bool] | None:
  """Per qid, whether `REFERENCE` retrieved an answer in its top 5, from the runs evaluated beside it (None when
  none was); refuses runs whose reference retrievals differ (then they searched different block stores)."""
  found = {d: [got[q].baselines[REFERENCE] for q in qids] for d, got in answers.items()
           if all(REFERENCE in got[q].baselines for q in qids)}
  if not found:
    return None
  (first, hits), *others = found.items()
  for directory, other in others:
    if other != hits:
      raise InputError(f"{directory}/{dataset}.json: {REFERENCE}'s retrievals differ from {first}/{dataset}.json's "
                       "(evaluated over another block store?)")
  return hits


def datasets_of(directory: Path) -> list[str]:
  """The datasets an evaluation holds, in its results.json order (subset rows such as '(gold passage in corpus)'
  have no per-question file and are skipped)."""
  rows = json.loads((directory / "results.json").read_text())
  names = dict.fromkeys(r["dataset"] for r in rows)
  return [n for n in names if (directory / f"{n}.json").exists()]


def same_questions(answers: dict[Path, dict[str, Answer]], dataset: str) -> list[str]:
  """The qids every run of `answers` ({directory: per_question(...)}) answered; refuses runs that answered others."""
  first, qids = next(iter(answers)), sorted(next(iter(answers.values())))
  for directory, got in answers.items():
    if sorted(got) != qids:
      raise InputError(f"{directory}/{dataset}.json: answers other questions than {first}/{dataset}.json")
  return qids


def table(runs: dict[str, Path], baseline: str | None, samples: int) -> str:
  """The markdown table: per dataset, each run's EM [95% interval], minus the baseline's, its R@5, its R@5 minus
  MiniLM zero-shot's over the same questions [95% interval] (when a run was evaluated beside MiniLM) and its EM on
  the questions whose top 5 blocks hold an answer (the reader's share of the misses), then the retrieval
  baselines' R@5 (from the runs' results.json)."""
  first = next(iter(runs.values()))
  results = {name: json.loads((d / "results.json").read_text()) for name, d in runs.items()}
  lines = ["| dataset | questions | system | EM [95% CI] | minus " + (baseline or "–") + " [95% CI] | R@5 | "
           f"R@5 minus {REFERENCE} [95% CI] | EM where the top 5 hold an answer |", "|---|---|---|---|---|---|---|---|"]
  for dataset in datasets_of(first):
    answers = {name: per_question(d, dataset) for name, d in runs.items()}
    by_directory = {runs[name]: got for name, got in answers.items()}
    qids = same_questions(by_directory, dataset)
    reference = reference_hits(by_directory, dataset, qids)
    recall = {r["system"]: r["recall@5"] for rows in results.values() for r in rows if r["dataset"] == dataset}
    for name, got in answers.items():
      correct = [got[q].correct for q in qids]
      em = bootstrap.interval(correct, samples)
      retrieved = [got[q].correct for q in qids if got[q].retrieved]
      reader = f"{100 * sum(retrieved) / len(retrieved):.1f} ({len(retrieved)})" if retrieved else "–"
      diff, versus_reference = "–", "–"
      if baseline and name != baseline:
        d = bootstrap.paired_difference(correct, [answers[baseline][q].correct for q in qids], samples)
        diff = f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
      if reference is not None:
        d = bootstrap.paired_difference([got[q].retrieved for q in qids], reference, samples)
        versus_reference = f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
      mine = next(r["recall@5"] for r in results[name] if r["dataset"] == dataset and r["system"] == "realm-jax")
      lines.append(f"| {dataset} | {len(qids)} | {name} | {em['em']:.1f} [{em['low']:.1f}, {em['high']:.1f}] | "
                   f"{diff} | {mine:.1f} | {versus_reference} | {reader} |")
    for system in ("BM25", REFERENCE):
      if system in recall:
        lines.append(f"| {dataset} | {len(qids)} | {system} | – | – | {recall[system]:.1f} | – | – |")
  return "\n".join(lines) + "\n"


def _mean_interval(values: list[float], level: float = 0.95) -> str:
  """'mean [low, high]' of per-run values: Student's t interval over the runs ('mean' alone for one run)."""
  mean = float(np.mean(values))
  if len(values) < 2:
    return f"{mean:+.1f}"
  half = stats.t.ppf((1 + level) / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
  return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def seed_table(rows: dict[str, list[Path]], baseline: str | None) -> str:
  """Per dataset and row: EM of each run, their mean ± standard error over runs, and the paired difference to
  the baseline row run by run (run K with run K) with its mean and 95% t-interval over runs.  The interval covers
  the fine-tuning seeds' spread on these questions, not the questions' sampling (the per-run intervals do)."""
  if baseline and any(len(runs) != len(rows[baseline]) for runs in rows.values()):
    counts = ", ".join(f"{name} {len(runs)}" for name, runs in rows.items())
    raise InputError(f"seeds are paired run by run with the baseline's, so every row needs as many runs ({counts})")
  lines = ["| dataset | system | runs | EM per run | mean EM ± s.e. | minus " + (baseline or "–") + " per run | "
           "mean difference [95% t-interval over runs] |", "|---|---|---|---|---|---|---|"]
  for dataset in datasets_of(next(iter(rows.values()))[0]):
    answers = {d: per_question(d, dataset) for runs in rows.values() for d in runs}
    same_questions(answers, dataset)
    em = {name: [100 * float(np.mean([a.correct for a in answers[d].values()])) for d in runs]
          for name, runs in rows.items()}
    for name, values in em.items():
      spread = f" ± {np.std(values, ddof=1) / np.sqrt(len(values)):.1f}" if len(values) > 1 else ""
      diff, mean_diff = "–", "–"
      if baseline and name != baseline:
        differences = [v - b for v, b in zip(values, em[baseline], strict=True)]
        diff = " / ".join(f"{d:+.1f}" for d in differences)
        mean_diff = _mean_interval(differences)
      lines.append(f"| {dataset} | {name} | {len(values)} | {' / '.join(f'{v:.1f}' for v in values)} | "
                   f"{np.mean(values):.1f}{spread} | {diff} | {mean_diff} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows: dict[str, list[Path]] = {}
  for value in _RUNS.value:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
      raise app.UsageError(f"--run={value}: expected NAME=DIR")
    rows.setdefault(name, []).append(Path(directory))
  if not rows:
    raise app.UsageError("give at least one --run")
  if _BASELINE.value and _BASELINE.value not in rows:
    raise app.UsageError(f"--baseline={_BASELINE.value}: not one of the runs {sorted(rows)}")
  try:
    if all(len(dirs) == 1 for dirs in rows.values()):
      print(table({name: dirs[0] for name, dirs in rows.items()}, _BASELINE.value, _SAMPLES.value), end="")
      return
    summary = seed_table(rows, _BASELINE.value)  # refuses unpaired seeds before anything is printed
    for k in range(max(len(dirs) for dirs in rows.values())):  # run K of each row beside run K of the baseline
      position = {f"{name}:{k + 1}": dirs[k] for name, dirs in rows.items() if k < len(dirs)}
      base = f"{_BASELINE.value}:{k + 1}" if _BASELINE.value else None
      print(f"Run {k + 1} of each row\n\n" + table(position, base, _SAMPLES.value))
    print("Over runs (fine-tuning seeds)\n\n" + summary, end="")
  except (InputError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
