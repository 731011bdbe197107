"""The readers of passages, entity spans and questions: damaged files end as one `CorpusError` naming file and line."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO, SHARED_CORPUS
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax.data.corpus import CorpusError, read_documents
from realm_jax.data.questions import UnanswerableQuestion, question_from_record, read_questions

PASSAGES = ['{"id": "p0", "title": "T", "text": "Paris is big."}', '{"id": "p1", "title": "U", "text": "Rome is old."}']
ENTITIES = ['{"id": "p0", "ents": [[0, 5, "GPE"]]}', '{"id": "p1", "ents": [[0, 4, "GPE"]]}']
QUESTIONS = ['{"question": "who?", "answers": ["me"], "answer_in_corpus": true, "trec_id": "7"}',
             '{"question": "why?", "answers": ["because"], "answer_is_regex": false, "nq_example_id": 12}']
GOOD = {"passages": PASSAGES, "entities": ENTITIES, "questions": QUESTIONS}
KINDS = sorted(GOOD)
PROPERTY = settings(max_examples=200, deadline=None, database=None)


def read(kind: str, path: Path) -> list:
  """Reads `path` as a file of `kind`; entity files go with the two good passages next to them."""
  if kind == "questions":
    return read_questions(path)
  if kind == "passages":
    return list(read_documents(path))
  passages = path.with_name("good_passages.jsonl")
  passages.write_text("\n".join(PASSAGES) + "\n")
  return list(read_documents(passages, path))


def write(path: Path, lines: list[str], end: str = "\n") -> Path:
  path.write_bytes("".join(line + end for line in lines).encode("utf-8"))
  return path


def values(kind: str, result: list) -> list[tuple]:
  if kind == "questions":
    return [(q.question, q.answers, q.qid) for q in result]
  return [(d.doc_id, d.title, d.text, d.spans) for d in result]


# ---- bytes and text ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_invalid_utf8_names_file_and_line(tmp_path, kind):
  path = tmp_path / f"{kind}.jsonl"
  path.write_bytes(GOOD[kind][0].encode() + b"\n" + GOOD[kind][1].encode().replace(b"\"", b"\xff\"", 1) + b"\n")
  with pytest.raises(CorpusError, match=rf"{kind}.jsonl:2: not UTF-8 text \(invalid start byte at byte 2 of the line"):
    read(kind, path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_byte_order_mark_at_the_start_is_accepted(tmp_path, kind):
  plain = read(kind, write(tmp_path / "plain.jsonl", GOOD[kind]))
  with_bom = tmp_path / "bom.jsonl"
  with_bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())
  assert values(kind, read(kind, with_bom)) == values(kind, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_a_byte_order_mark_after_the_start_is_refused_with_its_line(tmp_path, kind):
  path = tmp_path / "bom.jsonl"
  path.write_bytes((GOOD[kind][0] + "\n\ufeff" + GOOD[kind][1] + "\n").encode())
  with pytest.raises(CorpusError, match=r"bom.jsonl:2: not valid JSON"):
    read(kind, path)


@pytest.mark.parametrize("kind", KINDS)
def test_crlf_line_ends_are_accepted_and_not_kept_in_values(tmp_path, kind):
  plain = read(kind, write(tmp_path / "lf.jsonl", GOOD[kind]))
  crlf = read(kind, write(tmp_path / "crlf.jsonl", GOOD[kind], "\r\n"))
  assert values(kind, crlf) == values(kind, plain)
  assert not any("\r" in str(v) for v in values(kind, crlf))


def test_crlf_passages_keep_their_source_line_numbers_across_blank_lines(tmp_path):
  path = write(tmp_path / "p.jsonl", [PASSAGES[0], "", PASSAGES[1]], "\r\n")
  assert [d.source for d in read_documents(path)] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl"])
@pytest.mark.parametrize("kind", KINDS)
def test_gzip_files_are_read_whatever_their_name(tmp_path, kind, name):
  plain = read(kind, write(tmp_path / "plain.jsonl", GOOD[kind]))
  path = tmp_path / name
  path.write_bytes(gzip.compress(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes()))
  assert values(kind, read(kind, path)) == values(kind, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_gzip_file_names_the_file(tmp_path, kind):
  data = gzip.compress(("\n".join(GOOD[kind]) + "\n").encode())
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(data[: len(data) - 12])
  with pytest.raises(CorpusError, match=r"cut.jsonl.gz:\d+: corrupt or truncated gzip data \(Compressed file ended"):
    read(kind, path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_gzip_file_names_the_file(tmp_path, kind):
  data = bytearray(gzip.compress(("\n".join(GOOD[kind]) + "\n").encode()))
  data[-8] ^= 0xFF  # the CRC-32 of the trailer
  path = tmp_path / "bad.jsonl.gz"
  path.write_bytes(bytes(data))
  with pytest.raises(CorpusError, match=r"bad.jsonl.gz:3: corrupt or truncated gzip data \(CRC check failed"):
    read(kind, path)


def test_gzip_magic_with_garbage_after_it_names_the_file(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_bytes(b"\x1f\x8b" + b"not really gzip\n")
  with pytest.raises(CorpusError, match=r"q.jsonl:1: corrupt or truncated gzip data"):
    read_questions(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_file_is_named(tmp_path, kind):
  with pytest.raises(FileNotFoundError, match="missing.jsonl: file not found"):
    read(kind, tmp_path / "missing.jsonl")


@pytest.mark.parametrize("kind", KINDS)
def test_binary_junk_names_file_and_line(tmp_path, kind):
  path = tmp_path / "junk.bin"
  path.write_bytes(GOOD[kind][0].encode() + b"\n\x00\x01\x02\x03 PK\x03\x04\n")
  with pytest.raises(CorpusError, match=r"junk.bin:2: not valid JSON"):
    read(kind, path)


def test_an_unpaired_surrogate_escape_is_refused_and_a_pair_is_kept(tmp_path):
  path = write(tmp_path / "p.jsonl", ['{"id": "p0", "title": "T", "text": "cut \\ud83d here"}'])
  with pytest.raises(CorpusError, match=r"p.jsonl:1: a string holds an unpaired UTF-16 surrogate \('\\ud83d'\)"):
    list(read_documents(path))
  write(path, ['{"id": "p0", "title": "T", "text": "smile \\ud83d\\ude00 and \\\\ud800 as text"}'])
  assert [d.text for d in read_documents(path)] == ["smile \U0001f600 and \\ud800 as text"]


@pytest.mark.parametrize("line, message", [
    ('{"id": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"id": ' + "7" * 5000 + "}", "Exceeds the limit"),
])
def test_json_the_parser_cannot_hold_is_a_corpus_error(tmp_path, line, message):
  with pytest.raises(CorpusError, match=rf"p.jsonl:1: not valid JSON \(.*{message}"):
    list(read_documents(write(tmp_path / "p.jsonl", [line])))


# ---- entity spans -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ents, message", [
    ([[5, 0, "GPE"]], r"ents\[0\] = \[5, 0, 'GPE'\]: start > end"),
    ([[0, 5, "GPE"], [3, 3, "X"]], r"ents\[1\] = \[3, 3, 'X'\]: empty span \(start == end\)"),
    ([[9, 14, "GPE"]], r"ents\[0\] = \[9, 14, 'GPE'\] is outside the passage text \(length 13\)"),
    ([[-1, 5, "GPE"]], r"ents\[0\] = \[-1, 5, 'GPE'\] is outside the passage text"),
    ([[True, 5, "X"]], r"ents\[0\] must be \[start_char, end_char, label\], got \[True, 5, 'X'\]"),
    ([[0, False, "X"]], r"ents\[0\] must be \[start_char, end_char, label\]"),
    ([[0.0, 5, "X"]], r"ents\[0\] must be \[start_char, end_char, label\]"),
    ([[0, 5, 7]], r"ents\[0\] must be \[start_char, end_char, label\]"),
])
def test_each_bad_entity_span_is_named_for_what_it_is(tmp_path, ents, message):
  path = write(tmp_path / "e.jsonl", [json.dumps({"id": "p0", "ents": ents}), ENTITIES[1]])
  with pytest.raises(CorpusError, match=rf"e.jsonl:1: {message}"):
    read("entities", path)


def test_a_span_ending_at_the_end_of_the_text_is_accepted(tmp_path):
  path = write(tmp_path / "e.jsonl", ['{"id": "p0", "ents": [[9, 13, "X"]]}', ENTITIES[1]])
  assert read("entities", path)[0].spans == ((9, 13, "X"),)


# ---- question fields --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, shown", [
    ("answer_is_regex", "false", '"false"'),
    ("answer_is_regex", "true", '"true"'),
    ("answer_is_regex", 0, "0"),
    ("answer_is_regex", None, "null"),
    ("answer_in_corpus", "yes", '"yes"'),
    ("answer_in_corpus", 1, "1"),
    ("answer_in_corpus", [], "list"),
])
def test_boolean_question_fields_must_be_json_booleans(tmp_path, field, value, shown):
  path = write(tmp_path / "q.jsonl", [QUESTIONS[0], json.dumps({"question": "q?", "answers": ["a"], field: value})])
  allowed = "true, false or null" if field == "answer_in_corpus" else "true or false"
  with pytest.raises(CorpusError, match=rf"q.jsonl:2: field '{field}' must be {allowed}, got {shown}$"):
    read_questions(path)


def test_boolean_question_fields_are_read_as_written(tmp_path):
  path = write(tmp_path / "q.jsonl", [
      '{"question": "a?", "answers": ["x"], "answer_is_regex": true, "answer_in_corpus": false}',
      '{"question": "b?", "answers": ["x"], "answer_is_regex": false, "answer_in_corpus": null}',
      '{"question": "c?", "answers": ["x"]}'])
  flags = [(q.is_regex, q.answer_in_corpus) for q in read_questions(path)]
  assert flags == [(True, False), (False, None), (False, None)]


@pytest.mark.parametrize("pattern, error", [
    ("Sievert \\(Sv\\)\\", r"bad escape \(end of pattern\) at position 14"),
    ("(unclosed", "missing \\), unterminated subpattern"),
    ("a{99999999999}", "the repetition number is too large"),
])
def test_a_bad_curatedtrec_regex_names_file_line_and_answer(tmp_path, pattern, error):
  line = json.dumps({"question": "q?", "answers": ["fine|ok", pattern], "answer_is_regex": True})
  path = write(tmp_path / "trec.jsonl", [QUESTIONS[0], line])
  with pytest.raises(CorpusError, match=rf"trec.jsonl:2: field 'answers': answers\[1\] is not a valid regular "
                                        rf"expression \({error}"):
    read_questions(path, skip_unanswerable=True)  # another answer compiles: not skippable, the file needs fixing


def test_a_question_whose_only_regex_is_invalid_is_unanswerable_and_a_training_set_skips_it(tmp_path):
  line = json.dumps({"question": "q?", "answers": ["Sv\\"], "answer_is_regex": True})
  path = write(tmp_path / "trec.jsonl", [QUESTIONS[0], line])
  with pytest.raises(UnanswerableQuestion, match=r"trec.jsonl:2: field 'answers': answers\[0\] is not a valid regular"):
    read_questions(path)
  assert [q.question for q in read_questions(path, skip_unanswerable=True)] == ["who?"]


def test_an_invalid_regex_is_fine_as_a_plain_answer(tmp_path):
  path = write(tmp_path / "q.jsonl", ['{"question": "q?", "answers": ["(unclosed"]}'])
  assert read_questions(path)[0].answers == ("(unclosed",)


@pytest.mark.parametrize("record, message", [
    ({"trec_id": ["7"]}, "field 'trec_id' must be a string or an integer, got list"),
    ({"nq_example_id": True}, "field 'nq_example_id' must be a string or an integer, got true"),
    ({"id": 1.5}, "field 'id' must be a string or an integer, got 1.5"),
    ({"gold_passage_ids": "p0"}, "field 'gold_passage_ids' must be a list of strings"),
    ({"gold_passage_ids": [0]}, "field 'gold_passage_ids' must be a list of strings"),
    ({"question": 5}, "field 'question' must be str, got int"),
    ({"answers": [1]}, "field 'answers' must be a non-empty list of strings"),
])
def test_question_fields_of_the_wrong_type_are_named(tmp_path, record, message):
  path = write(tmp_path / "q.jsonl", [json.dumps({"question": "q?", "answers": ["a"], **record})])
  with pytest.raises(CorpusError, match=rf"q.jsonl:1: {message}"):
    read_questions(path)


def test_an_empty_question_file_is_named(tmp_path):
  with pytest.raises(CorpusError, match=r"empty.jsonl: no questions"):
    read_questions(write(tmp_path / "empty.jsonl", ["", "  "]))


def test_tfds_question_records_go_through_the_same_validation():
  record = {"qid": b"7", "question": b"q?", "answers": [b"Swed(en|ish)"], "gold_passage_ids": []}
  assert question_from_record({**record, "answer_is_regex": np.bool_(True)}, "t[0]", 0).is_regex
  assert not question_from_record({**record, "answer_is_regex": np.array(False)}, "t[0]", 0).is_regex
  with pytest.raises(CorpusError, match=r"t\[0\]: field 'answer_is_regex' must be true or false, got \"false\""):
    question_from_record({**record, "answer_is_regex": "false"}, "t[0]", 0)
  with pytest.raises(CorpusError, match=r"t\[0\]: field 'answer_is_regex' must be true or false, got 1$"):
    question_from_record({**record, "answer_is_regex": np.int64(1)}, "t[0]", 0)
  with pytest.raises(CorpusError, match=r"t\[0\]: field 'answer_is_regex' must be true or false, got ndarray"):
    question_from_record({**record, "answer_is_regex": np.array([True, False])}, "t[0]", 0)
  with pytest.raises(CorpusError, match=r"t\[0\]: field 'answers': answers\[1\] is not a valid regular expression"):
    question_from_record({**record, "answers": [b"ok", b"(bad"], "answer_is_regex": np.bool_(True)}, "t[0]", 0)
  with pytest.raises(CorpusError, match=r"t\[0\]: missing field 'question'"):
    question_from_record({"answers": [b"a"]}, "t[0]", 0)
  with pytest.raises(CorpusError, match=r"t\[0\]: field 'question': not UTF-8 text"):
    question_from_record({"question": b"\xffq", "answers": [b"a"]}, "t[0]", 0)


REAL_QUESTION_FILES = sorted(SHARED_CORPUS.glob("questions/*.jsonl")) + sorted(DEMO.glob("questions/*.jsonl"))


@pytest.mark.parametrize("path", REAL_QUESTION_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_real_question_file_still_loads(path):
  """Training sets are read as fine-tuning reads them: questions without a usable answer are skipped."""
  questions = read_questions(path, skip_unanswerable="train" in path.name)
  assert questions and all(q.answers for q in questions)
  assert all(q.is_regex for q in questions) == path.name.startswith("curatedtrec")


def test_the_real_question_files_are_found():
  assert len(REAL_QUESTION_FILES) >= 4  # the demo set at least; the small corpus adds 8 when present


# ---- properties: any file ends in documents/questions or in one CorpusError naming it --------------------------

def assert_reads_or_names(kind: str, path: Path, data: bytes) -> None:
  path.write_bytes(data)
  try:
    read(kind, path)
  except CorpusError as e:
    assert str(path) in str(e) and "\n" not in str(e), str(e)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10)
_TEXT = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=12)
_REGEX = st.text(st.sampled_from("ab1()[]{}|*+?.^$\\,-:<>=!P"), max_size=12)
_SPAN = st.lists(st.integers(-3, 20) | st.booleans() | st.text(max_size=3), min_size=2, max_size=4)
_FIELDS = {
    "passages": {"id": st.sampled_from(["p0", "p1"]) | _JSON, "title": _TEXT | _JSON, "text": _TEXT | _JSON},
    "entities": {"id": st.sampled_from(["p0", "p1"]) | _JSON, "ents": st.lists(_SPAN | _JSON, max_size=3) | _JSON},
    "questions": {
        "question": _TEXT | _JSON, "answers": st.lists(_REGEX | _TEXT | _JSON, max_size=3) | _JSON,
        "answer_is_regex": st.booleans() | _JSON, "answer_in_corpus": st.booleans() | _JSON,
        "gold_passage_ids": st.lists(_TEXT, max_size=2) | _JSON, "trec_id": _TEXT | _JSON, "nq_example_id": _JSON,
    },
}


def _records(kind: str):
  return st.fixed_dictionaries({}, optional=_FIELDS[kind])


def _encode(lines: list[str], ending: str, ascii_only: bool) -> bytes:
  text = "".join(line + ending for line in lines)
  return text.encode("utf-8", "surrogatepass") if not ascii_only else text.encode("ascii", "backslashreplace")


_BYTES = (
    st.binary(max_size=200)
    | st.binary(max_size=60).map(lambda b: b"\x1f\x8b" + b)
    | st.tuples(st.binary(max_size=200), st.integers(0, 250)).map(lambda t: gzip.compress(t[0])[: t[1]])
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("readers")


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=_BYTES)
def test_any_bytes_read_or_fail_naming_the_file(scratch, kind, data):
  assert_reads_or_names(kind, scratch / f"bytes_{kind}.jsonl", data)


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(lines=st.lists(_TEXT, max_size=4), ending=st.sampled_from(["\n", "\r\n", "\r"]), ascii_only=st.booleans())
def test_any_text_lines_read_or_fail_naming_the_file(scratch, kind, lines, ending, ascii_only):
  assert_reads_or_names(kind, scratch / f"text_{kind}.jsonl", _encode(lines, ending, ascii_only))


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data(), ending=st.sampled_from(["\n", "\r\n"]), ascii_json=st.booleans(), compress=st.booleans())
def test_any_json_records_read_or_fail_naming_the_file(scratch, kind, data, ending, ascii_json, compress):
  records = data.draw(st.lists(_records(kind), min_size=1, max_size=3))
  raw = _encode([json.dumps(r, ensure_ascii=ascii_json) for r in records], ending, False)
  assert_reads_or_names(kind, scratch / f"json_{kind}.jsonl", gzip.compress(raw) if compress else raw)
