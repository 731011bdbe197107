"""The answer-in-corpus ceiling in one streaming pass over the block texts, for every question at once.

`has_answer` (eval/answers.py) per question and block is what the ceiling means; asking it for every pair is
questions x blocks regex or substring searches (hours at 13.35M blocks).  `AnswerMatcher` gives the same answer
per text for all questions together:
- plain answers (case-sensitive substrings): one Aho-Corasick automaton over all of them;
- regex answers (CuratedTrec, IGNORECASE): each pattern runs only on texts holding a literal that every match
  must contain (found from the parsed pattern: a run of ASCII letters, digits and spaces, or one per branch),
  found by a second automaton over the texts case-folded as `re` folds them; a pattern without such a literal
  runs on every text (`unfiltered` counts them).
`answer_in_corpus` streams `texts.jsonl` once (no list of texts in memory), finding the gold passages of the
questions as well; `cached_answer_in_corpus` keeps the result per dataset.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
from absl import logging

from realm_jax import storage
from realm_jax.data.questions import Question
from realm_jax.eval.answers import compile_answer_regex

_MIN_LITERAL = 3  # shorter required literals select too many texts to be worth the automaton
_LITERAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789 ")
CACHE_FORMAT = 1


@functools.cache
def _folding() -> tuple[re.Pattern, dict[int, str]]:
  """(a pattern finding them, a str.translate table) for the characters that `re` IGNORECASE matches to an ASCII
  letter but `str.lower` does not lower to it (e.g. the dotless i, the long s, the dotted capital I)."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  table = {}
  for code in range(0x80, 0x10000):  # case mappings onto ASCII are all in the basic plane
    c = chr(code)
    if 0xD800 <= code <= 0xDFFF:
      continue
    for letter in {*c.lower(), *c.upper(), *c.casefold()} & set(letters + letters.upper()):
      if re.fullmatch(letter, c, re.IGNORECASE) and c.lower() != letter.lower():
        table[code] = letter.lower()
  return re.compile("[" + "".join(map(chr, table)) + "]"), table


def fold(text: str) -> str:
  """`text` with every character `re` IGNORECASE takes for an ASCII letter as that lower-case letter, the rest
  lower-cased: an IGNORECASE match of an ASCII literal in `text` is a plain match of it in `fold(text)`."""
  special, table = _folding()
  return (text.translate(table) if special.search(text) else text).lower()


def _required_literals(items) -> list[str] | None:
  """Literals one of which every match of the parsed pattern `items` contains (the best of its required parts),
  or None when none is known."""
  best, run = None, ""

  def consider(literals: list[str] | None) -> None:
    nonlocal best
    if literals and min(map(len, literals)) >= _MIN_LITERAL and (
        best is None or min(map(len, literals)) > min(map(len, best))):
      best = literals

  for op, value in list(items) + [(None, None)]:
    char = chr(value).lower() if op == re._constants.LITERAL else None
    if char is not None and char in _LITERAL_CHARS:
      run += char
      continue
    consider([run] if run else None)
    run = ""
    if op == re._constants.SUBPATTERN:
      consider(_required_literals(value[-1]))
    elif op == re._constants.BRANCH:
      branches = [_required_literals(branch) for branch in value[1]]
      if all(branches):
        consider([literal for branch in branches for literal in branch])
    elif op in (re._constants.MAX_REPEAT, re._constants.MIN_REPEAT) and value[0] >= 1:
      consider(_required_literals(value[2]))
  return best


def required_literals(pattern: str) -> list[str] | None:
  """Lower-case ASCII literals one of which every IGNORECASE match of `pattern` contains, or None."""
  try:
    return _required_literals(re._parser.parse(pattern, re.IGNORECASE | re.UNICODE | re.MULTILINE))
  except (re.error, OverflowError, RecursionError):
    return None


class AnswerMatcher:
  """Which of `questions` have an answer in a text (`has_answer`, all questions in one pass per text)."""

  def __init__(self, questions: Sequence[Question]):
    self.plain = ahocorasick.Automaton()
    self.literals = ahocorasick.Automaton()
    self.unfiltered: list[tuple[int, re.Pattern]] = []
    self.regexes: dict[int, list[re.Pattern]] = {}
    for index, question in enumerate(questions):
      for answer in question.answers:
        if not question.is_regex:
          if answer:
            self.plain.add_word(answer, self.plain.get(answer, ()) + (index,))
          continue
        try:
          compiled = compile_answer_regex(answer)
        except re.error:
          continue  # as has_answer: an invalid regex never matches
        literals = required_literals(answer)
        if literals is None:
          self.unfiltered.append((index, compiled))
          continue
        self.regexes.setdefault(index, []).append(compiled)
        for literal in literals:
          self.literals.add_word(literal, self.literals.get(literal, frozenset()) | {index})
    for automaton in (self.plain, self.literals):
      if len(automaton):
        automaton.make_automaton()

  def __call__(self, text: str, skip: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Indices of the questions with an answer in `text` (those in `skip` need not be tested)."""
    found = set()
    if len(self.plain):
      for _, indices in self.plain.iter(text):
        found.update(indices)
    candidates = set()
    if len(self.literals):
      for _, indices in self.literals.iter(fold(text)):
        candidates |= indices
    for index in candidates - found - skip:
      if any(_matches(pattern, text) for pattern in self.regexes[index]):
        found.add(index)
    for index, pattern in self.unfiltered:
      if index not in found and index not in skip and _matches(pattern, text):
        found.add(index)
    return found


def _matches(pattern: re.Pattern, text: str) -> bool:
  return any(m.group(0).strip() for m in pattern.finditer(text))


def answer_in_corpus(records: Iterable[dict], questions: Sequence[Question],
                     rebuild_every: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
  """([questions] an answer occurs in the text of one of `records`, [questions] one of its gold passage ids is a
  record's doc_id), in one pass over the records (`BlockStore.iter_texts`).

  Every `rebuild_every` records, once a twentieth of the questions still open have been answered, the matcher is
  rebuilt without them: frequent answers ("2", "John") are found early and then cost nothing."""
  wanted: dict[str, list[int]] = {}
  for i, q in enumerate(questions):
    for doc in q.gold_passage_ids:
      wanted.setdefault(doc, []).append(i)
  answered, gold = set(), set()
  open_ = list(range(len(questions)))
  matcher, found_here, since = AnswerMatcher(questions), set(), 0
  for record in records:
    found_here |= matcher(record["text"], found_here)
    gold.update(wanted.get(record["doc_id"], ()))
    since += 1
    if since >= rebuild_every and len(found_here) * 20 >= len(open_) > 0:
      answered.update(open_[j] for j in found_here)
      open_ = [i for i in open_ if i not in answered]
      matcher, found_here, since = AnswerMatcher([questions[i] for i in open_]), set(), 0
  answered.update(open_[j] for j in found_here)
  return tuple(np.isin(np.arange(len(questions)), sorted(found)) for found in (answered, gold))


def cached_answer_in_corpus(store, name: str, questions: Sequence[Question],
                            cache_dir: storage.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """`answer_in_corpus` over `store`'s texts, kept in `<cache_dir>/answer_in_corpus/<name>.json` for this store
  (corpus fingerprint, block count) and these questions (answers, gold ids); recomputed when either differs."""
  path = storage.as_path(cache_dir) / "answer_in_corpus" / f"{name}.json"
  key = {"format": CACHE_FORMAT, "corpus_fingerprint": store.manifest["corpus_fingerprint"],
         "num_blocks": store.num_blocks,
         "questions": [[q.qid, list(q.answers), q.is_regex, list(q.gold_passage_ids)] for q in questions]}
  if path.exists():
    try:
      cached = json.loads(storage.read_bytes(path))
      if {k: cached.get(k) for k in key} == key and all(len(cached.get(f, [])) == len(questions)
                                                         for f in ("in_corpus", "gold_in_corpus")):
        return np.asarray(cached["in_corpus"], bool), np.asarray(cached["gold_in_corpus"], bool)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
      pass
    logging.info("%s: made for another store or questions; recomputing", path)
  in_corpus, gold = answer_in_corpus(store.iter_texts(), questions)
  storage.make_dirs(path.parent)
  storage.write_once(path, json.dumps({**key, "in_corpus": in_corpus.tolist(), "gold_in_corpus": gold.tolist()})
                     .encode())
  return in_corpus, gold
