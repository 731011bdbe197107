"""Answer matching as in ORQA/REALM: exact match, CuratedTrec regexes, `HasAnswer`, gold reader spans.

- `normalize_answer`: Unicode NFD, lowercase, ASCII punctuation dropped, articles a/an/the dropped,
  whitespace collapsed (SQuAD normalisation + NFD, `orqa/utils/eval_utils.py`).
- `regex_match`: `re.match` (anchored at the start only) with IGNORECASE|UNICODE|MULTILINE; an invalid
  regex counts as wrong (question files are checked with `compile_answer_regex` when read, so none is).
- `has_answer`: the retriever's supervision, a raw case-sensitive substring search of any answer in the
  block text (released `HasAnswer` op); for regex answers (CuratedTrec, not in the released code) a
  case-insensitive `re.search`.
- `gold_spans`: every exact word-piece match of a tokenised answer inside the block part of the reader input.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


def normalize_answer(text: str) -> str:
  text = unicodedata.normalize("NFD", text).lower().translate(_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def compile_answer_regex(pattern: str) -> re.Pattern:
  """A CuratedTrec answer pattern with the matching flags; `re.error` for any invalid pattern."""
  try:
    return re.compile(pattern, _REGEX_FLAGS)
  except (OverflowError, RecursionError) as e:  # `a{99999999999}`, thousands of nested groups
    raise re.error(str(e) or type(e).__name__, pattern) from e


def _compile(pattern: str) -> re.Pattern | None:
  try:
    return compile_answer_regex(pattern)
  except re.error:
    return None


def regex_match(prediction: str, pattern: str) -> bool:
  compiled = _compile(pattern)
  return compiled is not None and compiled.match(prediction) is not None


def exact_match(prediction: str, answers: Sequence[str], is_regex: bool = False) -> bool:
  """ORQA's correctness: normalised string equality with any answer, or a regex match (CuratedTrec)."""
  if is_regex:
    return any(regex_match(prediction, pattern) for pattern in answers)
  normalized = normalize_answer(prediction)
  return any(normalized == normalize_answer(answer) for answer in answers)


def answer_strings_in(text: str, answers: Sequence[str], is_regex: bool = False) -> list[str]:
  """The answer strings occurring in `text`: the answers themselves, or the regex matches (CuratedTrec)."""
  if not is_regex:
    return [a for a in answers if a and a in text]
  found = []
  for pattern in answers:
    compiled = _compile(pattern)
    if compiled is not None:
      found.extend(m.group(0) for m in compiled.finditer(text) if m.group(0).strip())
  return found


def has_answer(text: str, answers: Sequence[str], is_regex: bool = False) -> bool:
  return bool(answer_strings_in(text, answers, is_regex))


def gold_spans(
    input_ids: np.ndarray, block_mask: np.ndarray, answer_ids: Sequence[np.ndarray]
) -> list[tuple[int, int]]:
  """(start, end) inclusive token positions where a tokenised answer occurs wholly inside the block part."""
  spans = set()
  for answer in answer_ids:
    n = len(answer)
    if not n:
      continue
    for start in np.flatnonzero(input_ids[: len(input_ids) - n + 1] == answer[0]):
      end = start + n - 1
      if block_mask[start] and block_mask[end] and np.array_equal(input_ids[start : end + 1], answer):
        spans.add((int(start), int(end)))
  return sorted(spans)
