"""Open-QA question sets: JSONL files, a TFDS builder for them, and the TFDS catalog datasets.

JSONL (the small corpus's `questions/*.jsonl`): `{"question": str, "answers": [str, ...]}` plus optional
`answer_is_regex` (CuratedTrec), `gold_passage_ids`, `answer_in_corpus` and an id field.  Problems are
reported as `file:line: field: what is wrong`.

TFDS: `RealmQuestions(path=...)` prepares any such file as array_record (no TensorFlow needed);
`catalog_questions("natural_questions_open" | "web_questions", split)` reads the public catalog datasets
once the user has prepared them (`tfds build ... --file_format=array_record`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from realm_jax.data.corpus import CorpusError, _field, _parse_json_line, _read_lines

ID_FIELDS = ("id", "nq_example_id", "wq_id", "trec_id", "squad_id")


class UnanswerableQuestion(CorpusError):
  """A question whose answers are all empty strings (e.g. 20 lines of the QED NQ-train subset)."""


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  answers: tuple[str, ...]
  is_regex: bool = False
  gold_passage_ids: tuple[str, ...] = ()
  answer_in_corpus: bool | None = None
  qid: str = ""


def parse_question(record: dict, where: str, index: int) -> Question:
  question = _field(record, "question", str, where)
  if not question.strip():
    raise CorpusError(f"{where}: field 'question' is empty")
  answers = _field(record, "answers", list, where)
  if not answers or not all(isinstance(a, str) for a in answers):
    raise CorpusError(f"{where}: field 'answers' must be a non-empty list of strings")
  answers = [a for a in answers if a.strip()]
  if not answers:
    raise UnanswerableQuestion(f"{where}: field 'answers' holds only empty strings")
  gold = record.get("gold_passage_ids", [])
  if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
    raise CorpusError(f"{where}: field 'gold_passage_ids' must be a list of strings")
  qid = next((str(record[f]) for f in ID_FIELDS if f in record), str(index))
  return Question(question, tuple(answers), bool(record.get("answer_is_regex", False)), tuple(gold),
                  record.get("answer_in_corpus"), qid)


def read_questions(path: str | Path, limit: int | None = None, skip_unanswerable: bool = False) -> list[Question]:
  """Questions of a JSONL file.  `skip_unanswerable` (for training sets) skips, and logs by line, questions
  whose answers are all empty; otherwise they are an error like any other malformed line."""
  path = Path(path)
  out, skipped = [], []
  for lineno, line in _read_lines(path):
    if limit is not None and len(out) >= limit:
      break
    try:
      out.append(parse_question(_parse_json_line(path, lineno, line), f"{path}:{lineno}", len(out)))
    except UnanswerableQuestion:
      if not skip_unanswerable:
        raise
      skipped.append(lineno)
  if skipped:
    logging.warning("%s: skipped %d questions with only empty answers (lines %s)", path, len(skipped), skipped)
  if not out:
    raise CorpusError(f"{path}: no questions")
  return out


class RealmQuestions(tfds.core.GeneratorBasedBuilder):
  """One question JSONL file as a TFDS dataset (split 'test' by default)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Open-QA questions with answers (strings or CuratedTrec regexes)."}

  def __init__(self, *, path: str | Path | None = None, split: str = "test", **kwargs):
    self._path, self._split = path, split
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "qid": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "answer_is_regex": np.bool_,
        "gold_passage_ids": tfds.features.Sequence(tfds.features.Text()),
    })
    return self.dataset_info_from_configs(features=features, supervised_keys=None, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    if self._path is None:
      raise ValueError("RealmQuestions needs path=<questions .jsonl> to prepare")
    return {self._split: self._generate_examples(self._path)}

  def _generate_examples(self, path):
    for i, q in enumerate(read_questions(path)):
      yield i, {"qid": q.qid, "question": q.question, "answers": list(q.answers),
                "answer_is_regex": q.is_regex, "gold_passage_ids": list(q.gold_passage_ids)}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def question_from_record(record: dict, where: str, index: int) -> Question:
  """A TFDS record (ours or the catalog's `natural_questions_open` / `web_questions`) -> Question."""
  answers = record.get("answers", record.get("answer"))
  if answers is None:
    raise CorpusError(f"{where}: record has neither 'answers' nor 'answer'")
  return parse_question({
      "question": _text(record["question"]),
      "answers": [_text(a) for a in answers],
      "answer_is_regex": bool(record.get("answer_is_regex", False)),
      "gold_passage_ids": [_text(g) for g in record.get("gold_passage_ids", [])],
      **({"id": _text(record["qid"])} if "qid" in record else {}),
  }, where, index)


def read_tfds_questions(builder: tfds.core.DatasetBuilder, split: str) -> list[Question]:
  source = builder.as_data_source(split)
  return [question_from_record(source[i], f"tfds:{builder.name}/{split}[{i}]", i) for i in range(len(source))]


CATALOG = {"natural_questions_open": ("train", "validation"), "web_questions": ("train", "test")}


def catalog_questions(name: str, split: str, data_dir: str | None = None) -> list[Question]:
  """Questions of a prepared TFDS catalog dataset (array_record); a clear error when it is not prepared."""
  if name not in CATALOG:
    raise ValueError(f"unknown TFDS question dataset {name!r}; known: {sorted(CATALOG)}")
  if split not in CATALOG[name]:
    raise ValueError(f"{name} has splits {CATALOG[name]}, not {split!r}")
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name} is not prepared under {builder.data_dir}; run "
        f"`tfds build {name} --file_format=array_record` where it can be downloaded")
  return read_tfds_questions(builder, split)
