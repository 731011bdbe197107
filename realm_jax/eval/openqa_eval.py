"""Open-QA evaluation: exact match, retrieval answer-recall@k, baselines and the answer-in-corpus ceiling.

Answer-recall@k: an answer string (or the CuratedTrec regex) occurs in the text of one of the top k blocks
(ORQA's `HasAnswer`, the retriever's own supervision), each block's text read from the store when asked.  The
ceiling is the share of questions with an answer somewhere in the block store: one streaming pass over the texts
for all questions of a dataset (`corpus_answers`), cached in the output folder.  For NQ-open the subset whose
gold passage is in the store is also reported (found in the same pass).  Per dataset, `<out>/<name>.json` holds
every prediction with the blocks it was read from, and whether each of the top k blocks of realm-jax and of each
baseline holds an answer (so recall can be compared question by question).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from etils import epath
from tqdm import tqdm

from realm_jax import storage
from realm_jax.checkpoints.init import checkpoint_dir, load_encoder
from realm_jax.data.blocks import BlockStore
from realm_jax.data.questions import Question, read_questions
from realm_jax.errors import InputError
from realm_jax.eval.answers import exact_match, has_answer
from realm_jax.eval.baselines import Bm25Retriever, MeanPoolRetriever, check_baseline_size
from realm_jax.eval.corpus_answers import cached_answer_in_corpus
from realm_jax.eval.predict import Predictor, PretrainedRetriever, load_predictor
from realm_jax.models.bert import BertConfig
from realm_jax.objectives.openqa import OpenQaSpec

RECALL_KS = (1, 5, 20, 100)


class Retriever(Protocol):
  def search(self, questions: list[str], k: int) -> np.ndarray: ...


def answer_hits(store: BlockStore, question: Question, ids: np.ndarray) -> np.ndarray:
  return np.asarray([has_answer(store.text_bytes(int(i)).decode(), question.answers, question.is_regex) for i in ids])


def recall(hits: list[np.ndarray], ks: Sequence[int]) -> dict[str, float]:
  return {f"recall@{k}": 100.0 * float(np.mean([h[:k].any() for h in hits])) if hits else 0.0 for k in ks}


@dataclasses.dataclass
class Subset:
  name: str
  indices: np.ndarray


def subsets(name: str, questions: list[Question], gold_in_corpus: np.ndarray) -> list[Subset]:
  everything = [Subset(name, np.arange(len(questions)))]
  gold = np.flatnonzero(gold_in_corpus)
  if len(gold) and len(gold) < len(questions):
    everything.append(Subset(f"{name} (gold passage in corpus)", gold))
  return everything


def evaluate(
    predictor: Predictor | Retriever | None,
    baselines: Mapping[str, Retriever],
    datasets: Mapping[str, list[Question]],
    store: BlockStore,
    out_dir: storage.PathLike,
    ks: Sequence[int] = RECALL_KS,
    batch_size: int = 8,
    read: bool = True,
) -> list[dict]:
  """Runs every system on every dataset; writes `<out_dir>/<dataset>.json` and returns the table rows.
  `read=False` skips the span reader: retrieval recall only, no EM and no per-question predictions (then
  `predictor` may be any `Retriever`, e.g. a `PretrainedRetriever`)."""
  out_dir = storage.as_path(out_dir)
  storage.make_dirs(out_dir)
  k_max = min(max(ks), store.num_blocks)
  rows = []
  for name, questions in datasets.items():
    strings = [q.question for q in questions]
    ceiling, gold_in_corpus = cached_answer_in_corpus(store, name, questions, out_dir)
    systems: dict[str, list[np.ndarray]] = {}
    correct = None
    if predictor is not None and not read:
      ids = predictor.search(strings, k_max)
      systems["realm-jax"] = [answer_hits(store, q, ids[i]) for i, q in enumerate(questions)]
    elif predictor is not None:
      predictions = []
      for first in tqdm(range(0, len(strings), batch_size), desc=f"{name}: realm-jax", mininterval=2.0):
        predictions += predictor.answer(strings[first : first + batch_size], k_max, batch_size)
      systems["realm-jax"] = [answer_hits(store, q, p.retrieved) for q, p in zip(questions, predictions, strict=True)]
      correct = np.asarray([exact_match(p.answer, q.answers, q.is_regex)
                            for q, p in zip(questions, predictions, strict=True)])
    for system, retriever in baselines.items():
      ids = retriever.search(strings, k_max)
      systems[system] = [answer_hits(store, q, ids[i]) for i, q in enumerate(questions)]
    if correct is not None:
      records = [{
          "qid": q.qid, "question": q.question, "answers": list(q.answers), "prediction": p.answer,
          "correct": bool(c), "score": p.score, "probability": p.probability, "block_id": p.block_id,
          "blocks": [dataclasses.asdict(b) for b in p.blocks],
          "retrieved_has_answer": systems["realm-jax"][i][:k_max].tolist(),
          **({"baselines_has_answer": {s: systems[s][i][:k_max].tolist() for s in baselines}} if baselines else {}),
      } for i, (q, p, c) in enumerate(zip(questions, predictions, correct, strict=True))]
      storage.write_once(out_dir / f"{name}.json", json.dumps(records, indent=1, ensure_ascii=False).encode())
    for subset in subsets(name, questions, gold_in_corpus):
      for system, hits in systems.items():
        row = {"dataset": subset.name, "system": system, "questions": len(subset.indices),
               "answer_in_corpus": 100.0 * float(ceiling[subset.indices].mean()),
               **recall([hits[i] for i in subset.indices], ks)}
        if system == "realm-jax" and correct is not None:
          row["exact_match"] = 100.0 * float(correct[subset.indices].mean())
        rows.append(row)
  storage.write_once(out_dir / "results.json", json.dumps(rows, indent=1).encode())
  storage.write_once(out_dir / "results.md", results_table(rows, ks).encode())
  return rows


def results_table(rows: list[dict], ks: Sequence[int] = RECALL_KS) -> str:
  head = ["dataset", "questions", "answer in corpus", "system", "EM", *[f"R@{k}" for k in ks]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    em = f"{r['exact_match']:.1f}" if "exact_match" in r else "–"
    cells = [r["dataset"], str(r["questions"]), f"{r['answer_in_corpus']:.1f}", r["system"], em,
             *[f"{r[f'recall@{k}']:.1f}" for k in ks]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """What `run_evaluation` evaluates: `datasets` {name: JSONL question file, a path relative to `questions_dir`,
  absolute or `gs://`}, each read with its `answer_formats` entry ("auto" when absent; see
  `realm_jax.data.questions`), beside the `baselines` ('bm25', 'minilm': MiniLM zero-shot from
  `minilm_checkpoint`), `batch_size` questions at a time."""

  datasets: Mapping[str, str]
  questions_dir: str = "."
  answer_formats: Mapping[str, str] = dataclasses.field(default_factory=dict)
  baselines: Sequence[str] = ("bm25", "minilm")
  minilm_checkpoint: str = "minilm"
  batch_size: int = 8


DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_datasets(config: EvaluationConfig, limit: int | None = None) -> dict[str, list[Question]]:
  """{name: the first `limit` questions} of every dataset of `config`; names must be file-name safe (each
  becomes `<out>/<name>.json`) and every `answer_formats` entry must name a dataset."""
  for name in config.datasets:
    if not DATASET_NAME.fullmatch(name) or name == "results":
      raise InputError(f"EvaluationConfig.datasets: name {name!r}: letters, digits, '_', '.', '-' only, and not "
                       "'results' (it names the output file <name>.json)")
  stray = sorted(set(config.answer_formats) - set(config.datasets))
  if stray:
    raise InputError(f"EvaluationConfig.answer_formats: {stray[0]!r} is not a dataset (datasets: "
                     f"{', '.join(config.datasets)})")
  def located(file: str) -> storage.PathLike:
    return file if storage.is_remote(file) or os.path.isabs(file) else storage.as_path(config.questions_dir) / file

  return {name: read_questions(located(file), limit, answer_format=config.answer_formats.get(name, "auto"))
          for name, file in config.datasets.items()}


def output_dir(workdir: storage.PathLike, read: bool = True, step: int | None = None) -> epath.Path:
  """Where `run_evaluation` writes: `<workdir>/eval` (`read=False`: `eval_retrieval`), `_step_<step>` appended
  for a given checkpoint."""
  return storage.as_path(workdir) / (("eval" if read else "eval_retrieval") + ("" if step is None else f"_step_{step}"))


def run_evaluation(workdir: str, mesh, spec: OpenQaSpec, config: EvaluationConfig, limit: int | None = None,
                   read: bool = True, pretrained_run: str | None = None, step: int | None = None) -> list[dict]:
  """Evaluates `workdir`'s fine-tuned model (and the baselines) on the first `limit` questions (None: all) of each
  dataset; writes `<workdir>/eval/{<name>.json,results.json,results.md}` (`read=False`: recall only, into
  `<workdir>/eval_retrieval/`).  `pretrained_run` (recall only): the "realm-jax" rows are that REALM pre-training
  run's retriever with its own index (`PretrainedRetriever`), not a fine-tuned model's; results still go to
  `workdir`.  `step`: that fine-tuning checkpoint instead of the best, results in `eval_step_<step>/` (or
  `eval_retrieval_step_<step>/`).  The question files are read first: a bad one fails before any loading."""
  if pretrained_run is not None and step is not None:
    raise InputError(f"step={step} picks a fine-tuning checkpoint; pretrained_run={pretrained_run!r} reads the "
                     "pre-training run's newest")
  if pretrained_run is not None and read:
    raise InputError(f"pretrained_run={pretrained_run!r}: a pre-training run has no span reader; evaluate its "
                     "retrieval only (--retrieval_only)")
  questions = read_datasets(config, limit)
  unknown = sorted(set(config.baselines) - {"bm25", "minilm"})
  if unknown:
    raise InputError(f"EvaluationConfig.baselines: unknown baseline {unknown[0]!r}; known: bm25, minilm")
  store = spec.store()
  for name in config.baselines:
    check_baseline_size(name, store)
  predictor = (PretrainedRetriever(pretrained_run, spec, mesh) if pretrained_run
               else load_predictor(workdir, spec, mesh, step))
  systems: dict[str, Retriever] = {}
  for name in config.baselines:
    if name == "bm25":
      systems["BM25"] = Bm25Retriever(store)
    else:
      encoder = BertConfig.from_hf_json(checkpoint_dir(config.minilm_checkpoint) / "config.json")
      systems["MiniLM zero-shot"] = MeanPoolRetriever(encoder, load_encoder(config.minilm_checkpoint, encoder),
                                                      store, spec.tokenizer(), mesh, spec.retriever.block_len)
  return evaluate(predictor, systems, questions, store, output_dir(workdir, read, step), batch_size=config.batch_size,
                  read=read)
