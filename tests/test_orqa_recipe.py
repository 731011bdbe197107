"""ORQA's fine-tuning recipe (#25 item 5): the train/dev resplit, the best checkpoint by dev exact match, the length
in epochs, the answer string, whole questions, and ORQA's `answer` field."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DEMO

from realm_jax.checkpoints import best
from realm_jax.data.corpus import CorpusError
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer, join_wordpieces, orqa_answer
from realm_jax.data.questions import Question, read_questions, resplit
from realm_jax.errors import InputError
from realm_jax.eval.answers import exact_match
from realm_jax.train.finetune import BestCheckpoint, FinetuneRecipe, epochs_to_steps, split_questions
from realm_jax.train.trainer import TrainerConfig

QUESTIONS = DEMO / "questions"


# ---- ORQA's `answer` field -------------------------------------------------------------------------------------

def test_orqa_jsonl_answer_field_is_read_and_both_or_neither_is_one_clear_error(tmp_path):
  path = tmp_path / "nq.jsonl"
  path.write_text('{"question": "who sang it", "answer": ["Queen", "Freddie Mercury"]}\n'
                  '{"question": "where is it", "answers": ["Paris"]}\n')
  orqa, ours = read_questions(path)
  assert orqa.answers == ("Queen", "Freddie Mercury") and ours.answers == ("Paris",)
  assert orqa.source == f"{path}:1"
  path.write_text('{"question": "q", "answers": ["a"]}\n{"question": "q", "answer": ["a"], "answers": ["b"]}\n')
  with pytest.raises(CorpusError, match=r"nq.jsonl:2: fields 'answers' and 'answer' both given"):
    read_questions(path)
  path.write_text('{"question": "q"}\n')
  with pytest.raises(CorpusError, match=r"nq.jsonl:1: missing field 'answers' \(ORQA's files: 'answer'\)"):
    read_questions(path)
  path.write_text('{"question": "q", "answer": "Paris"}\n')
  with pytest.raises(CorpusError, match=r"nq.jsonl:1: field 'answer' must be a non-empty list of strings"):
    read_questions(path)


# ---- train/dev resplit -----------------------------------------------------------------------------------------

def test_resplit_holds_out_a_fraction_by_question_text_deterministically():
  questions = read_questions(QUESTIONS / "nq_open_dev.jsonl")
  train, dev = resplit(questions, 0.1)
  assert 15 <= len(dev) <= 45 and len(train) + len(dev) == len(questions)
  assert not {q.question for q in train} & {q.question for q in dev}
  shuffled_train, shuffled_dev = resplit(questions[::-1], 0.1)  # independent of order
  assert {q.qid for q in shuffled_dev} == {q.qid for q in dev} and len(shuffled_train) == len(train)
  copy = Question(dev[0].question, ("other",), qid="copy")  # the same text is dev wherever it comes from
  assert resplit([copy], 0.1) == ([], [copy])
  assert resplit(questions, 0.0) == (questions, [])
  with pytest.raises(InputError, match=r"dev_fraction=1.0: must be in \[0, 1\)"):
    resplit(questions, 1.0)


def test_split_questions_from_a_fraction_or_a_dev_file_never_trains_on_dev(tmp_path):
  lines = (QUESTIONS / "nq_open_dev.jsonl").read_text().splitlines()
  (tmp_path / "train.jsonl").write_text("\n".join(lines[:20]) + "\n")
  (tmp_path / "dev.jsonl").write_text("\n".join(lines[15:25]) + "\n")
  train, dev = split_questions(str(tmp_path / "train.jsonl"), FinetuneRecipe(dev_questions=str(tmp_path / "dev.jsonl")))
  assert len(train) == 15 and len(dev) == 10
  train, dev = split_questions(str(tmp_path / "train.jsonl"), FinetuneRecipe(dev_fraction=0.5))
  assert train and dev and len(train) + len(dev) == 20
  with pytest.raises(InputError, match="dev_fraction=0.5 and dev_questions=.* both given"):
    split_questions(str(tmp_path / "train.jsonl"), FinetuneRecipe(0.5, str(tmp_path / "dev.jsonl")))
  (tmp_path / "one.jsonl").write_text(lines[0] + "\n")
  assert resplit(read_questions(tmp_path / "one.jsonl"), 0.01)[1] == []
  with pytest.raises(InputError, match=r"one.jsonl: dev_fraction=0.01 holds out none of its 1 questions"):
    split_questions(str(tmp_path / "one.jsonl"), FinetuneRecipe(dev_fraction=0.01))


# ---- length in epochs ------------------------------------------------------------------------------------------

def test_num_epochs_sets_the_step_count_from_the_train_questions_and_batch():
  trainer = TrainerConfig(10000)
  assert epochs_to_steps(trainer, FinetuneRecipe(), 79168, 1) is trainer  # NUM_STEPS kept: ~0.13 NQ epoch
  assert epochs_to_steps(trainer, FinetuneRecipe(num_epochs=20), 3417, 1).num_steps == 68340  # ORQA's WQ
  assert epochs_to_steps(trainer, FinetuneRecipe(num_epochs=2), 10, 4).num_steps == 5  # ceil(20 / 4)
  with pytest.raises(InputError, match="num_epochs=0: must be > 0"):
    epochs_to_steps(trainer, FinetuneRecipe(num_epochs=0), 10, 4)


# ---- best checkpoint -------------------------------------------------------------------------------------------

def _save_steps(directory, steps, options=None):
  manager = ocp.CheckpointManager(str(directory), options=options or ocp.CheckpointManagerOptions(create=True),
                                  item_names=("state", "data"))
  for step in steps:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.full(2, step)}),
                                               data=ocp.args.JsonSave({"step": step})))
  manager.wait_until_finished()
  return manager


def test_the_best_checkpoint_survives_keeping_only_the_newest(tmp_path):
  tracker = BestCheckpoint(tmp_path, None)
  options = ocp.CheckpointManagerOptions(create=True, preservation_policy=best.keep_newest_and(2, tracker.keep))
  manager = _save_steps(tmp_path / "train", [], options)
  for step, em in [(1, 10.0), (2, 30.0), (3, 30.0), (4, 20.0), (5, 5.0), (6, 25.0)]:
    tracker.propose(step, em, 40, "orqa")
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.full(2, step)}),
                                               data=ocp.args.JsonSave({})))
    tracker.commit(step, manager)
  assert manager.all_steps() == [2, 5, 6]  # the best (2; 3 only ties it) and the newest two
  record = best.newest_record(tmp_path)
  assert (record.step, record.best_step, record.best_dev_exact_match, record.dev_exact_match) == (6, 2, 30.0, 25.0)
  assert json.loads(best.record_path(tmp_path, 3).read_text())["best_step"] == 2
  assert best.newest_record(tmp_path, up_to=1).best_step == 1  # what a run resumed at step 1 continues from
  assert best.choose_checkpoint(tmp_path) == (2, "the best dev exact match, 30.00% of 40 dev questions, of the "
                                              f"evaluations up to step 6 ({best.record_path(tmp_path, 6)})")


def test_evaluation_loads_the_newest_checkpoint_without_a_usable_record(tmp_path):
  _save_steps(tmp_path / "train", [3, 7])
  step, why = best.choose_checkpoint(tmp_path)
  assert step == 7 and why.startswith("the newest checkpoint (no dev evaluation recorded")
  best.write_record(tmp_path, best.DevRecord(7, 1.0, 5, "text", 5, 2.0))  # its best was deleted by hand
  step, why = best.choose_checkpoint(tmp_path)
  assert step == 7 and "the recorded best step 5" in why and "has no checkpoint left" in why
  with pytest.raises(FileNotFoundError, match="no fine-tuning checkpoint"):
    best.choose_checkpoint(tmp_path / "empty")


# ---- whole questions -------------------------------------------------------------------------------------------

def test_questions_are_never_cut_but_padded_to_a_length_bucket(demo_store, wordpiece):
  featurizer = OpenQaFeaturizer(demo_store, wordpiece, OpenQaDataConfig(query_len=8), max_query_len=32)
  short, long = "who wrote it", " ".join(["where is the big city"] * 3)  # 3 and 15 word pieces
  assert len(featurizer.query(short)["input_ids"]) == 8
  query = featurizer.query(long)
  ids, _ = wordpiece.encode(long)
  assert len(query["input_ids"]) == 32 and list(query["input_ids"][1 : len(ids) + 1]) == list(ids)
  assert query["input_ids"][len(ids) + 1] == wordpiece.sep_id and query["input_mask"].sum() == len(ids) + 2
  batch = featurizer.queries([short, long])
  assert batch["input_ids"].shape == (2, 32) and batch["input_mask"][0].sum() == 5
  assert [featurizer.query_length(n) for n in (8, 9, 17, 32)] == [8, 16, 32, 32]
  too_long = Question(" ".join(["where is the big city"] * 7), ("x",), source="q.jsonl:7")
  assert featurizer.check_questions([Question(short, ("x",)), Question(long, ("x",))]) == 32
  with pytest.raises(InputError, match=r"q.jsonl:7: field 'question': 35 word pieces \+ \[CLS\] \[SEP\] exceed the "
                     "query tower's 32 positions"):
    featurizer.check_questions([Question(short, ("x",)), too_long])


# ---- answer string ---------------------------------------------------------------------------------------------

def test_orqa_answer_is_the_original_words_projected_onto_the_span(wordpiece):
  text = "Oppenheimer met the U.S. Navy in Zürich"
  ids, offsets = wordpiece.encode(text)
  pieces = [wordpiece.id_to_token(int(i)) for i in ids]
  assert pieces[:3] == ["op", "##pen", "##heimer"] and pieces[4:9] == ["the", "u", ".", "s", "."]

  def three(start, end):
    return (text[offsets[start, 0] : offsets[end, 1]], orqa_answer(text, pieces, offsets, start, end, True),
            join_wordpieces(pieces[start : end + 1]))

  assert three(0, 1) == ("Oppen", "Oppenheimer", "oppen")  # a `##` piece: ORQA keeps the whole word
  assert three(1, 1) == ("pen", "Oppenheimer", "pen")
  assert three(0, 0) == ("Op", "Op", "op")  # no `##` piece: projected back onto the span, original case
  assert three(5, 8) == ("U.S.", "U . S .", "u . s .")  # words joined by one space
  assert three(10, 11) == ("in Zürich", "in Zürich", "in zurich")
  assert exact_match(three(5, 8)[0], ["U.S."]) and not exact_match(three(5, 8)[1], ["U.S."])


def test_the_featurizer_forms_each_answer_string_from_a_demo_block(demo_store, wordpiece):
  featurizers = {mode: OpenQaFeaturizer(demo_store, wordpiece, OpenQaDataConfig(reader_len=160, answer_text=mode))
                 for mode in ("text", "orqa", "wordpieces")}
  query = featurizers["text"].query("who is it")
  block_start = int(np.flatnonzero(query["input_ids"] == wordpiece.sep_id)[0]) + 1
  for block in range(demo_store.num_blocks):  # a word of 3+ pieces within the reader's reach
    pieces = [wordpiece.id_to_token(int(i)) for i in demo_store.body_ids(block)[:100]]
    starts = [p for p in range(len(pieces) - 2) if not pieces[p].startswith("##")
              and pieces[p + 1].startswith("##") and pieces[p + 2].startswith("##")]
    if starts:
      break
  p = starts[0]
  end = p + 2
  while end + 1 < len(pieces) and pieces[end + 1].startswith("##"):
    end += 1
  text = demo_store.text(block)["text"]
  ids, offsets = wordpiece.encode(text)
  word = text[offsets[p, 0] : offsets[end, 1]]
  got = {m: f.answer_text(block, query["input_ids"], block_start + p, block_start + p + 1)
         for m, f in featurizers.items()}
  assert got == {"text": text[offsets[p, 0] : offsets[p + 1, 1]], "orqa": word,
                 "wordpieces": pieces[p] + pieces[p + 1][2:]}
  assert len(got["text"]) < len(word)
  with pytest.raises(InputError, match="answer_text='chars': expected one of"):
    OpenQaFeaturizer(demo_store, wordpiece, OpenQaDataConfig(answer_text="chars"))
