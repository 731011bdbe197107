"""The one-pass answer-in-corpus ceiling equals asking `has_answer` of every question and block."""

import re

import numpy as np
import pytest
from conftest import DEMO, SHARED_CORPUS
from hypothesis import given, settings
from hypothesis import strategies as st

from realm_jax.data.questions import Question, read_questions
from realm_jax.eval.answers import has_answer
from realm_jax.eval.corpus_answers import answer_in_corpus, cached_answer_in_corpus, fold, required_literals

QUESTIONS = DEMO / "questions"


@pytest.mark.parametrize("dataset", ["nq_open_dev", "nq_train_qed", "curatedtrec_test", "webquestions_test",
                                     "shared/curatedtrec_train", "shared/squad_open_dev", "shared/efficientqa_dev"])
def test_the_streaming_ceiling_equals_has_answer_over_every_block(demo_store, dataset, tmp_path):
  path = (SHARED_CORPUS / "questions" / dataset.removeprefix("shared/") if dataset.startswith("shared/") else
          QUESTIONS / dataset).with_suffix(".jsonl")
  dataset = dataset.removeprefix("shared/")
  if not path.exists():
    pytest.skip(f"{path} is not in the demo data")
  questions = [q for q in read_questions(path, skip_unanswerable=True)][:400]
  texts = [t["text"] for t in demo_store.iter_texts()]
  expected = np.asarray([any(has_answer(t, q.answers, q.is_regex) for t in texts) for q in questions])
  doc_ids = {t["doc_id"] for t in demo_store.iter_texts()}
  expected_gold = np.asarray([bool(doc_ids.intersection(q.gold_passage_ids)) for q in questions])
  got, gold = cached_answer_in_corpus(demo_store, dataset, questions, tmp_path)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(gold, expected_gold)
  rebuilt = answer_in_corpus(demo_store.iter_texts(), questions, rebuild_every=37)  # answered ones dropped often
  np.testing.assert_array_equal(rebuilt[0], expected)
  np.testing.assert_array_equal(rebuilt[1], expected_gold)
  assert expected.any()
  cached = tmp_path / "answer_in_corpus" / f"{dataset}.json"
  assert cached.exists()
  again = cached_answer_in_corpus(demo_store, dataset, questions, tmp_path)  # from the cache: same answer
  np.testing.assert_array_equal(again[0], expected)
  other = cached_answer_in_corpus(demo_store, dataset, questions[:5], tmp_path)  # other questions: recomputed
  np.testing.assert_array_equal(other[0], expected[:5])


def test_regex_prefilter_literals_are_required_and_folded_as_re_folds_case():
  assert required_literals(r"(Paris|London) is") == ["paris", "london"]
  assert required_literals(r"Bill\s+Clinton") == ["clinton"]
  assert required_literals(r"\d+") is None and required_literals(r"(the )?Beatles?") == ["beatle"]
  assert required_literals(r"a?b|cd") is None  # a branch without a required literal
  # The dotless i, the long s and the dotted capital I match ASCII letters under IGNORECASE: fold maps them.
  for text, pattern in [("PıNK", "pink"), ("Miſſissippi", "mississippi"), ("İstanbul", "istanbul")]:
    assert re.search(pattern, text, re.IGNORECASE) and pattern in fold(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Paris", "paris", "PARIS", "Parıs", "1901", "the", "ſ", "İ", "x y", " "]),
                max_size=12),
       st.sampled_from([r"Par[iı]s", r"paris|london", r"19\d\d", r"(the )?paris", r"x\s+y", r"\s", r"İs?tanbul"]))
def test_a_regex_question_is_answered_in_a_text_exactly_when_has_answer_says_so(words, pattern):
  text = " ".join(words)
  question = Question("q", (pattern,), is_regex=True)
  assert answer_in_corpus([{"doc_id": "d", "text": text}], [question])[0][0] == has_answer(text, (pattern,), True)
