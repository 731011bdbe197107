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


def _eval_dir(path, correct, recall5, minilm_top5=None):
  path.mkdir(parents=True)  # the first 30 questions have an answer in their top 5 blocks (at rank 5)
  records = [{"qid": str(i), "correct": bool(c), "retrieved_has_answer": [False] * 4 + [i < 30] + [True]}
             for i, c in enumerate(correct)]
  if minilm_top5 is not None:  # evaluated beside MiniLM: its first `minilm_top5` questions have an answer at rank 1
    for i, r in enumerate(records):
      r["baselines_has_answer"] = {"MiniLM zero-shot": [i < minilm_top5] + [False] * 5}
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
  assert lines[2].startswith("| nq_open_dev | 40 | orqa | 25.0 [") and lines[2].endswith("| – | 60.0 | – | 33.3 (30) |")
  assert lines[3].startswith("| nq_open_dev | 40 | realm | 50.0 [") and "| +25.0 [+" in lines[3]
  assert lines[3].endswith("| 70.0 | – | 66.7 (30) |")  # 20 right, all among the 30 whose top 5 hold an answer
  assert lines[4] == "| nq_open_dev | 40 | BM25 | – | – | 40.0 | – | – |" and len(lines) == 5
  other = _eval_dir(tmp_path / "other", [True] * 39, 1.0)
  result = subprocess.run([sys.executable, "tools/compare_openqa.py", f"--run=orqa={base}", f"--run=x={other}"],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and "other/nq_open_dev.json: answers other questions than" in result.stderr


def test_recall_is_compared_with_minilm_question_by_question_from_any_run_evaluated_beside_it(tmp_path):
  orqa = _eval_dir(tmp_path / "orqa", [True] * 10 + [False] * 30, 75.0, minilm_top5=32)  # MiniLM: 32 of 40
  realm = _eval_dir(tmp_path / "realm", [True] * 20 + [False] * 20, 75.0)  # evaluated without the baselines
  args = [sys.executable, "tools/compare_openqa.py", f"--run=orqa={orqa}", "--baseline=orqa", "--samples=2000"]
  result = subprocess.run([*args, f"--run=realm={realm}"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "MiniLM zero-shot [95% CI]" in lines[0]
  for line in lines[2:4]:  # both rows retrieve 30 of the 40 (questions 0-29), MiniLM 32 (0-31): 2 lost of 40
    assert "| 75.0 | -5.0 [-12.5, +0.0] |" in line, line
  other = _eval_dir(tmp_path / "other", [True] * 20 + [False] * 20, 75.0, minilm_top5=31)
  result = subprocess.run([*args, f"--run=other={other}"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and "MiniLM zero-shot's retrievals differ from" in result.stderr


def test_a_name_given_twice_is_one_row_over_seeds_paired_run_by_run_with_the_baseline(tmp_path):
  orqa = [_eval_dir(tmp_path / f"orqa{k}", [True] * n + [False] * (40 - n), 60.0) for k, n in ((1, 10), (2, 14))]
  realm = [_eval_dir(tmp_path / f"realm{k}", [True] * n + [False] * (40 - n), 70.0) for k, n in ((1, 20), (2, 16))]
  args = [sys.executable, "tools/compare_openqa.py", "--baseline=orqa", "--samples=500"]
  runs = [f"--run=orqa={d}" for d in orqa] + [f"--run=realm={d}" for d in realm]
  result = subprocess.run(args + runs, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "Run 1 of each row" and "| realm:1 | 50.0 [" in lines[5] and "| +25.0 [+" in lines[5]
  assert "| realm:2 | 40.0 [" in result.stdout and "| +5.0 [" in result.stdout  # 16 vs 14 of 40 right
  summary = lines[lines.index("Over runs (fine-tuning seeds)") + 4:]
  assert summary[0] == "| nq_open_dev | orqa | 2 | 25.0 / 35.0 | 30.0 ± 5.0 | – | – |"
  # Differences +25 and +5: mean +15, s.e. 10, t(1) 97.5% = 12.706.
  assert summary[1] == "| nq_open_dev | realm | 2 | 50.0 / 40.0 | 45.0 ± 5.0 | +25.0 / +5.0 | +15.0 [-112.1, +142.1] |"
  result = subprocess.run(args + runs[:3], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and result.stdout == ""
  assert "every row needs as many runs (orqa 2, realm 1)" in result.stderr


def test_a_kept_copy_of_an_evaluation_compares_exactly_as_the_full_folder(tmp_path):
  full = _eval_dir(tmp_path / "full", [True] * 12 + [False] * 28, 65.0, minilm_top5=35)
  records = json.loads((full / "nq_open_dev.json").read_text())
  for r in records:
    r.update(prediction="x", blocks=[{"text": "a long block"}] * 5)
  (full / "nq_open_dev.json").write_text(json.dumps(records))
  keep = [sys.executable, "tools/keep_eval_records.py", f"--eval={full}", f"--out={tmp_path / 'kept'}"]
  result = subprocess.run(keep, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0 and "kept nq_open_dev in" in result.stdout, result.stderr
  kept = json.loads((tmp_path / "kept" / "nq_open_dev.json").read_text())
  assert kept[0] == {"qid": "0", "prediction": "x", "correct": True, "retrieved_has_answer": [False] * 4 + [True],
                     "baselines_has_answer": {"MiniLM zero-shot": [True] + [False] * 4}}
  tables = [subprocess.run([sys.executable, "tools/compare_openqa.py", f"--run=a={d}", "--samples=300"], cwd=REPO,
                           capture_output=True, text=True).stdout for d in (full, tmp_path / "kept")]
  assert tables[0] == tables[1] and "| a | 30.0 [" in tables[0]
  result = subprocess.run(keep, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and "kept: exists; give a new folder" in result.stderr
