r"""Table 1 of several Open-QA evaluations: EM per dataset with 95% bootstrap intervals, each row's paired
difference to a baseline row over the same questions, and the retrieval baselines' answer-recall beside them.

  python tools/compare_openqa.py --run=orqa=workdir/table1/orqa/openqa/eval \
    --run=realm=workdir/table1/realm/openqa/eval --baseline=orqa > workdir/table1/table1.md

Each --run is an `evaluate.py` output folder (`<dataset>.json` per-question records, `results.json`); the runs
must have answered the same questions (by qid) of each dataset they share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm_jax.errors import InputError  # noqa: E402
from realm_jax.eval import bootstrap  # noqa: E402

_RUNS = flags.DEFINE_multi_string("run", [], "NAME=DIR: an evaluate.py output folder (<workdir>/eval).")
_BASELINE = flags.DEFINE_string("baseline", None, "The run the others are compared with, question by question.")
_SAMPLES = flags.DEFINE_integer("samples", 10_000, "Bootstrap resamples.")


def per_question(directory: Path, dataset: str) -> dict[str, tuple[bool, bool]]:
  """{qid: (correct, an answer in the top 5 retrieved blocks)} of one dataset's records."""
  path = directory / f"{dataset}.json"
  try:
    records = json.loads(path.read_text())
    return {str(r["qid"]): (bool(r["correct"]), any(r["retrieved_has_answer"][:5])) for r in records}
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise InputError(f"{path}: not an evaluate.py per-question file ({type(e).__name__}: {e})") from e


def datasets_of(directory: Path) -> list[str]:
  """The datasets an evaluation holds, in its results.json order (subset rows such as '(gold passage in corpus)'
  have no per-question file and are skipped)."""
  rows = json.loads((directory / "results.json").read_text())
  names = dict.fromkeys(r["dataset"] for r in rows)
  return [n for n in names if (directory / f"{n}.json").exists()]


def table(runs: dict[str, Path], baseline: str | None, samples: int) -> str:
  """The markdown table: per dataset, each run's EM [95% interval], minus the baseline's, its R@5 and its EM on
  the questions whose top 5 blocks hold an answer (the reader's share of the misses), then the retrieval
  baselines' R@5 (from the first run's results.json)."""
  first = next(iter(runs.values()))
  results = {name: json.loads((d / "results.json").read_text()) for name, d in runs.items()}
  lines = ["| dataset | questions | system | EM [95% CI] | minus " + (baseline or "–") + " [95% CI] | R@5 | "
           "EM where the top 5 hold an answer |", "|---|---|---|---|---|---|---|"]
  for dataset in datasets_of(first):
    answers = {name: per_question(d, dataset) for name, d in runs.items()}
    qids = sorted(answers[next(iter(runs))])
    for name, got in answers.items():
      if sorted(got) != qids:
        raise InputError(f"{runs[name]}/{dataset}.json: answers other questions than {first}/{dataset}.json")
    recall = {r["system"]: r["recall@5"] for rows in results.values() for r in rows if r["dataset"] == dataset}
    for name, got in answers.items():
      correct = [got[q][0] for q in qids]
      em = bootstrap.interval(correct, samples)
      retrieved = [got[q][0] for q in qids if got[q][1]]
      reader = f"{100 * sum(retrieved) / len(retrieved):.1f} ({len(retrieved)})" if retrieved else "–"
      diff = "–"
      if baseline and name != baseline:
        d = bootstrap.paired_difference(correct, [answers[baseline][q][0] for q in qids], samples)
        diff = f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
      mine = next(r["recall@5"] for r in results[name] if r["dataset"] == dataset and r["system"] == "realm-jax")
      lines.append(f"| {dataset} | {len(qids)} | {name} | {em['em']:.1f} [{em['low']:.1f}, {em['high']:.1f}] | "
                   f"{diff} | {mine:.1f} | {reader} |")
    for system in ("BM25", "MiniLM zero-shot"):
      if system in recall:
        lines.append(f"| {dataset} | {len(qids)} | {system} | – | – | {recall[system]:.1f} | – |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  runs = {}
  for value in _RUNS.value:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
      raise app.UsageError(f"--run={value}: expected NAME=DIR")
    runs[name] = Path(directory)
  if not runs:
    raise app.UsageError("give at least one --run")
  if _BASELINE.value and _BASELINE.value not in runs:
    raise app.UsageError(f"--baseline={_BASELINE.value}: not one of the runs {sorted(runs)}")
  try:
    print(table(runs, _BASELINE.value, _SAMPLES.value), end="")
  except (InputError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
