r"""A small copy of an `evaluate.py` folder for the repository: results.json and, per question, what
tools/compare_openqa.py reads (qid, prediction, correct, whether each of the top 5 blocks of realm-jax and of each
baseline evaluated beside it holds an answer), so runs measured in one session can be compared with runs of later
ones (e.g. more fine-tuning seeds).

  python tools/keep_eval_records.py --eval=workdir/demo/openqa/eval \
    --out=docs/experiments/paper_tables_demo/table1_runs/realm_seed0

About 1/20 of the folder's size (~70 KB for the demo's 500 questions; the full records also hold each
prediction's blocks).  Refuses an existing --out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm_jax.errors import InputError  # noqa: E402

_EVAL = flags.DEFINE_string("eval", None, "An evaluate.py output folder (<workdir>/eval).", required=True)
_OUT = flags.DEFINE_string("out", None, "The folder to create.", required=True)

KEPT_FIELDS = ("qid", "prediction", "correct")
TOP_K_KEPT = 5


def keep(source: Path, out: Path) -> list[str]:
  """Writes the small copy of `source` into the new folder `out`; returns the datasets kept."""
  if out.exists():
    raise InputError(f"{out}: exists; give a new folder")
  results = (source / "results.json").read_text()
  kept = {}
  for path in sorted(source.glob("*.json")):
    if path.name == "results.json":
      continue
    try:
      kept[path.name] = [{**{f: r[f] for f in KEPT_FIELDS},
                          "retrieved_has_answer": r["retrieved_has_answer"][:TOP_K_KEPT],
                          **({"baselines_has_answer": {s: h[:TOP_K_KEPT] for s, h in r["baselines_has_answer"].items()}}
                             if "baselines_has_answer" in r else {})}
                         for r in json.loads(path.read_text())]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise InputError(f"{path}: not an evaluate.py per-question file ({type(e).__name__}: {e})") from e
  out.mkdir(parents=True)
  (out / "results.json").write_text(results)
  for name, records in kept.items():
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)  # one question per line
    (out / name).write_text(f"[\n{lines}\n]\n")
  return [name.removesuffix(".json") for name in kept]


def main(argv):
  del argv
  try:
    print(f"kept {', '.join(keep(Path(_EVAL.value), Path(_OUT.value)))} in {_OUT.value}")
  except (InputError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
