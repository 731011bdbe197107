"""tools/compare_openqa.py and realm_jax.eval.bootstrap: Table 1's intervals and paired differences."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from realm_jax.errors import InputError
from realm_jax.eval import bootstrap


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_questions():
  rng = np.random.default_rng(0)
  small, large = rng.random(100) < 0.3, rng.random(10_000) < 0.3
  a, b = bootstrap.interval(small), bootstrap.interval(large)
  assert a["low"] < a["em"] < a["high"] and b["low"] < b["em"] < b["high"]
  assert (b["high"] - b["low"]) < 0.2 * (a["high"] - a["low"])  # ~1/sqrt(100) as wide
  assert abs(b["em"] - 30) < 2 and a["em"] == 100 * small.mean()
  with pytest.raises(InputError, match="non-empty"):
    bootstrap.interval([])


def test_a_paired_difference_is_resampled_by_question_so_shared_noise_cancels():
  rng = np.random.default_rng(1)
  base = rng.random(400) < 0.5
  better = base.copy()
  better[np.flatnonzero(~base)[:20]] = True  # 20 more questions right, none lost: +5 points
  d = bootstrap.paired_difference(better, base)
  assert d["difference"] == pytest.approx(5.0) and 0 < d["low"] <= d["high"] and d["p_not_better"] == 0.0
  unpaired = bootstrap.interval(better)["high"] - bootstrap.interval(better)["low"]
  assert d["high"] - d["low"] < unpaired / 2
  with pytest.raises(InputError, match="answered 400 and 3 questions"):
    bootstrap.paired_difference(better, base[:3])


def _eval_dir(path, correct, recall5):
  path.mkdir(parents=True)  # the first 30 questions have an answer in their top 5 blocks (at rank 5)
  records = [{"qid": str(i), "correct": bool(c), "retrieved_has_answer": [False] * 4 + [i < 30] + [True]}
             for i, c in enumerate(correct)]
  (path / "nq_open_dev.json").write_text(json.dumps(records))
  rows = [{"dataset": "nq_open_dev", "system": "realm-jax", "recall@5": recall5},
          {"dataset": "nq_open_dev (gold passage in corpus)", "system": "realm-jax", "recall@5": 1.0},
          {"dataset": "nq_open_dev", "system": "BM25", "recall@5": 40.0}]
  (path / "results.json").write_text(json.dumps(rows))
  return path


def test_compare_openqa_tabulates_each_run_with_intervals_and_the_paired_difference(tmp_path):
  base = _eval_dir(tmp_path / "orqa", [True] * 10 + [False] * 30, 60.0)
  realm = _eval_dir(tmp_path / "realm", [True] * 20 + [False] * 20, 70.0)
  result = subprocess.run([sys.executable, "tools/compare_openqa.py", f"--run=orqa={base}", f"--run=realm={realm}",
                           "--baseline=orqa", "--samples=2000"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[2].startswith("| nq_open_dev | 40 | orqa | 25.0 [") and lines[2].endswith("| – | 60.0 | 33.3 (30) |")
  assert lines[3].startswith("| nq_open_dev | 40 | realm | 50.0 [") and "| +25.0 [+" in lines[3]
  assert lines[3].endswith("| 70.0 | 66.7 (30) |")  # 20 right, all among the 30 whose top 5 hold an answer
  assert lines[4] == "| nq_open_dev | 40 | BM25 | – | – | 40.0 | – |" and len(lines) == 5
  other = _eval_dir(tmp_path / "other", [True] * 39, 1.0)
  result = subprocess.run([sys.executable, "tools/compare_openqa.py", f"--run=orqa={base}", f"--run=x={other}"],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and "other/nq_open_dev.json: answers other questions than" in result.stderr
