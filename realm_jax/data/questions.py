"""Open-QA question sets: JSONL files, a TFDS builder for them, and the TFDS catalog datasets.

JSONL (the small corpus's `questions/*.jsonl`): `{"question": str, "answers": [str, ...]}` (ORQA's NQ-open files
name the list `answer`, read alike; a record with both or neither is an error) plus optional
`answer_is_regex` (true/false; CuratedTrec, whose answers must then compile as regexes), `gold_passage_ids`
([str, ...]), `answer_in_corpus` (true/false/null) and an id field (str or int).  The file is read as the corpus
files are (`realm_jax.data.corpus`: UTF-8, optional BOM, LF or CRLF, maybe gzip-compressed).  Problems are
reported as `file:line: field: what is wrong`.

TFDS: `RealmQuestions(path=...)` prepares any such file as array_record (no TensorFlow needed);
`catalog_questions("natural_questions_open" | "web_questions", split)` reads the public catalog datasets
once the user has prepared them (`tfds build ... --file_format=array_record`).

A file's answer format (`answer_format`): "auto" reads `answer_is_regex` per record; "strings" or "regex"
declares it for the whole file (for question sets from elsewhere that lack the field); a record whose
`answer_is_regex` says otherwise is an error.

`resplit` is ORQA's train/dev resplit of a training set: dev = the questions whose text hashes into a
`dev_fraction` of the buckets (deterministic; equal texts land on the same side).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from realm_jax import storage
from realm_jax.data.corpus import CorpusError, _field, _parse_json_line, _read_lines
from realm_jax.errors import InputError
from realm_jax.eval.answers import compile_answer_regex

ID_FIELDS = ("id", "nq_example_id", "wq_id", "trec_id", "squad_id")
ANSWER_FORMATS = ("auto", "strings", "regex")


class UnanswerableQuestion(CorpusError):
  """A question without one usable answer: all empty strings (e.g. 20 lines of the QED NQ-train subset) or,
  for regex answers, none that compiles (line 701 of the small corpus's `curatedtrec_train.jsonl`)."""


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  answers: tuple[str, ...]
  is_regex: bool = False
  gold_passage_ids: tuple[str, ...] = ()
  answer_in_corpus: bool | None = None
  qid: str = ""
  source: str = dataclasses.field(default="", compare=False)  # `file:line` (or TFDS record) it was read from


def _shown(value: object) -> str:
  """A JSON scalar as written in the file (cut short), or the type of anything else, for error messages."""
  if value is None or isinstance(value, str | int | float):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
  return type(value).__name__


def _flag(record: dict, name: str, where: str, absent: bool | None) -> bool | None:
  """A JSON boolean field (`absent` when missing); null is accepted only where `absent` is None."""
  if name not in record:
    return absent
  value = record[name]
  if isinstance(value, bool) or (value is None and absent is None):
    return value
  allowed = "true, false or null" if absent is None else "true or false"
  raise CorpusError(f"{where}: field {name!r} must be {allowed}, got {_shown(value)}")


def _qid(record: dict, where: str, index: int) -> str:
  for name in ID_FIELDS:
    if name in record:
      value = record[name]
      if not isinstance(value, str | int) or isinstance(value, bool):
        raise CorpusError(f"{where}: field {name!r} must be a string or an integer, got {_shown(value)}")
      return str(value)
  return str(index)


def parse_question(record: dict, where: str, index: int, answer_format: str = "auto") -> Question:
  """One question record, validated; `index` is its qid when the record has no id field; `answer_format` as
  the module docstring says."""
  question = _field(record, "question", str, where)
  if not question.strip():
    raise CorpusError(f"{where}: field 'question' is empty")
  if "answers" in record and "answer" in record:
    raise CorpusError(f"{where}: fields 'answers' and 'answer' both given; one list of answers expected")
  name = "answer" if "answer" in record else "answers"
  if name not in record:
    raise CorpusError(f"{where}: missing field 'answers' (ORQA's files: 'answer')")
  answers = record[name]
  if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
    raise CorpusError(f"{where}: field {name!r} must be a non-empty list of strings")
  is_regex = _flag(record, "answer_is_regex", where, answer_format == "regex")
  if answer_format != "auto" and is_regex != (answer_format == "regex"):
    raise CorpusError(f"{where}: field 'answer_is_regex' is {json.dumps(is_regex)} in a file read as "
                      f"answer_format={answer_format!r}")
  invalid = _invalid_regexes(answers, where, name) if is_regex else {}
  gold = record.get("gold_passage_ids", [])
  if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
    raise CorpusError(f"{where}: field 'gold_passage_ids' must be a list of strings")
  in_corpus = _flag(record, "answer_in_corpus", where, None)
  qid = _qid(record, where, index)
  usable = [a for k, a in enumerate(answers) if a.strip() and k not in invalid]
  if not usable:
    raise UnanswerableQuestion(next(iter(invalid.values()), f"{where}: field {name!r} holds only empty strings"))
  if invalid:
    raise CorpusError(next(iter(invalid.values())))
  return Question(question, tuple(usable), is_regex, tuple(gold), in_corpus, qid, where)


def _invalid_regexes(patterns: list[str], where: str, name: str) -> dict[int, str]:
  """answers[k] -> the error message, for the patterns that do not compile as `regex_match` compiles them."""
  invalid = {}
  for k, pattern in enumerate(patterns):
    try:
      compile_answer_regex(pattern)
    except re.error as e:
      invalid[k] = f"{where}: field {name!r}: {name}[{k}] is not a valid regular expression ({e})"
  return invalid


def read_questions(path: str | Path, limit: int | None = None, skip_unanswerable: bool = False,
                   answer_format: str = "auto") -> list[Question]:
  """Questions of a JSONL file (local or `gs://`).  `skip_unanswerable` (for training sets) skips, and logs by
  line, questions without a usable answer (all empty, or no regex that compiles); otherwise they are an error like
  any other malformed line.  `answer_format`: one of ANSWER_FORMATS (module docstring)."""
  if answer_format not in ANSWER_FORMATS:
    raise InputError(f"{path}: answer format {answer_format!r}: expected one of {', '.join(ANSWER_FORMATS)}")
  path = storage.as_path(path)
  out, skipped = [], []
  for lineno, line in _read_lines(path):
    if limit is not None and len(out) >= limit:
      break
    try:
      out.append(parse_question(_parse_json_line(path, lineno, line), f"{path}:{lineno}", len(out), answer_format))
    except UnanswerableQuestion:
      if not skip_unanswerable:
        raise
      skipped.append(lineno)
  if skipped:
    logging.warning("%s: skipped %d questions without a usable answer (lines %s)", path, len(skipped), skipped)
  if not out:
    raise CorpusError(f"{path}: no questions")
  return out


def _dev_bucket(text: str, buckets: int) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % buckets


def resplit(questions: list[Question], dev_fraction: float) -> tuple[list[Question], list[Question]]:
  """(train, dev): ORQA's resplit of a training set (`orqa/preprocessing`: dev = questions whose hash bucket is
  0 mod 10, i.e. `dev_fraction` 0.1).  A question is dev when the SHA-256 of its text falls in the first
  `dev_fraction` of 10^6 buckets: deterministic, independent of order and file, and every copy of a question
  text is on the same side, so no dev question is trained on.  (ORQA hashed with TF's FarmHash, so its split
  differs; its published split is `gs://orqa-data/resplit`.)"""
  if not 0.0 <= dev_fraction < 1.0:
    raise InputError(f"dev_fraction={dev_fraction}: must be in [0, 1)")
  buckets = 10**6
  cut = round(dev_fraction * buckets)
  dev = [_dev_bucket(q.question, buckets) < cut for q in questions]
  return ([q for q, d in zip(questions, dev, strict=True) if not d],
          [q for q, d in zip(questions, dev, strict=True) if d])


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


def _text(value: object, where: str, name: str) -> str:
  if not isinstance(value, bytes):
    return str(value)
  try:
    return value.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CorpusError(f"{where}: field {name!r}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from e


def _scalar(value: object) -> object:
  """A numpy scalar (TFDS's `np.bool_` feature) as the Python value JSON would give; anything else unchanged."""
  return value.item() if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0 else value


def question_from_record(record: dict, where: str, index: int) -> Question:
  """A TFDS record (ours or the catalog's `natural_questions_open` / `web_questions`) -> Question, validated as
  a JSONL line is."""
  answers = record.get("answers", record.get("answer"))
  if answers is None:
    raise CorpusError(f"{where}: record has neither 'answers' nor 'answer'")
  fields = {
      "answers": [_text(a, where, "answers") for a in answers],
      "gold_passage_ids": [_text(g, where, "gold_passage_ids") for g in record.get("gold_passage_ids", [])],
  }
  if "question" in record:
    fields["question"] = _text(record["question"], where, "question")
  if "answer_is_regex" in record:
    fields["answer_is_regex"] = _scalar(record["answer_is_regex"])
  if "qid" in record:
    fields["id"] = _text(record["qid"], where, "qid")
  return parse_question(fields, where, index)


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
