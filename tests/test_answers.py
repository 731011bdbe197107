"""Answer matching is ORQA's: SQuAD normalisation + NFD, anchored CuratedTrec regexes, raw HasAnswer."""

import json

import numpy as np
import pytest
from conftest import DEMO

from realm_jax.eval.answers import exact_match, gold_spans, has_answer, normalize_answer, regex_match


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
  assert normalize_answer("The  Beatles!") == "beatles"
  assert normalize_answer("an Apple, a day") == "apple day"
  assert normalize_answer("Theatre") == "theatre"  # "the" only as a word


def test_normalisation_is_nfd_so_composed_and_decomposed_accents_agree():
  assert normalize_answer("Ro\u0308ntgen") == normalize_answer("R\u00f6ntgen")
  assert exact_match("Wilhelm R\u00f6ntgen", ["wilhelm ro\u0308ntgen"])
  assert not exact_match("Wilhelm Rontgen", ["Wilhelm R\u00f6ntgen"])  # accents are kept, not stripped


def test_exact_match_is_against_any_reference():
  assert exact_match("the United Kingdom", ["UK", "United Kingdom"])
  assert not exact_match("United Kingdom of Great Britain", ["United Kingdom"])


def test_curatedtrec_regexes_are_anchored_at_the_start_only_and_case_insensitive():
  assert regex_match("sweden", "Sweden")
  assert regex_match("Sweden, in Gothenburg", "Sweden")  # re.match: a prefix match is enough
  assert not regex_match("in Sweden", "Sweden")
  assert exact_match("20,320 feet", [r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t"], is_regex=True)


def test_an_invalid_regex_counts_as_wrong_instead_of_raising():
  assert not regex_match("anything", "(unclosed")
  assert not has_answer("(unclosed", ["(unclosed"], is_regex=True)


def test_has_answer_is_a_raw_case_sensitive_substring_search():
  assert has_answer("landed in December 1972.", ["December 1972"])
  assert not has_answer("landed in december 1972.", ["December 1972"])
  assert has_answer("made in SWEDEN", ["Sweden"], is_regex=True)  # regexes ignore case


def test_every_curatedtrec_regex_of_the_demo_set_compiles_or_is_reported_wrong():
  lines = (DEMO / "questions" / "curatedtrec_test.jsonl").read_text().splitlines()
  patterns = [a for line in lines for a in json.loads(line)["answers"]]
  assert patterns and all(isinstance(regex_match("x", p), bool) for p in patterns)


def test_gold_spans_are_exact_word_piece_matches_inside_the_block_only():
  ids = np.asarray([101, 7, 8, 102, 5, 7, 8, 9, 7, 8, 102, 0])
  block_mask = np.asarray([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
  assert gold_spans(ids, block_mask, [np.asarray([7, 8])]) == [(5, 6), (8, 9)]  # the question's 7 8 is not gold
  assert gold_spans(ids, block_mask, [np.asarray([8, 9, 7]), np.asarray([9])]) == [(6, 8), (7, 7)]
  assert gold_spans(ids, block_mask, [np.asarray([8, 102])]) == []  # runs out of the block


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Northern Ireland", ["Scotland", "England", "Wales", "Northern Ireland"], True),
    ("northern ireland.", ["Northern Ireland"], True),
    ("Ireland", ["Northern Ireland"], False),
])
def test_webquestions_style_multiple_answers(prediction, answers, expected):
  assert exact_match(prediction, answers) is expected
