"""ORQA's fine-tuning recipe (#25 item 5): the train/dev resplit, the best checkpoint by dev exact match, the length
in epochs, the answer string, whole questions, and ORQA's `answer` field."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DEMO, DEMO_ENTITIES, DEMO_PASSAGES, TINY_BERT_H32

from realm_jax.checkpoints import best
from realm_jax.data.corpus import CorpusError
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer, join_wordpieces, orqa_answer
from realm_jax.data.questions import Question, read_questions, resplit
from realm_jax.errors import InputError
from realm_jax.eval.answers import exact_match
from realm_jax.train.finetune import BestCheckpoint, FinetuneRecipe, epochs_to_steps, run_finetune, split_questions
from realm_jax.train.optimizer import OptimizerConfig
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


DEV = best.DevSet.of(["who", "what"], "orqa")


def test_the_best_checkpoint_survives_keeping_only_the_newest_and_a_tie_goes_to_the_later_step(tmp_path):
  tracker = BestCheckpoint(tmp_path, None, DEV)
  options = ocp.CheckpointManagerOptions(create=True, preservation_policy=best.keep_newest_and(2, tracker.keep))
  manager = _save_steps(tmp_path / "train", [], options)
  for step, em in [(1, 10.0), (2, 30.0), (3, 30.0), (4, 20.0), (5, 5.0), (6, 25.0)]:
    tracker.propose(step, em)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.full(2, step)}),
                                               data=ocp.args.JsonSave({})))
    tracker.commit(step, manager)
  assert manager.all_steps() == [3, 5, 6]  # the best (3: it ties 2 and trained longer) and the newest two
  record = best.newest_record(tmp_path)
  assert (record.step, record.best_step, record.best_dev_exact_match, record.dev_exact_match) == (6, 3, 30.0, 25.0)
  assert json.loads(best.record_path(tmp_path, 2).read_text())["best_step"] == 2
  assert json.loads(best.record_path(tmp_path, 4).read_text())["best_step"] == 3
  assert best.choose_checkpoint(tmp_path) == (3, "the best dev exact match, 30.00% of 2 dev questions, of the "
                                              f"evaluations up to step 6 ({best.record_path(tmp_path, 6)})")


def test_evaluation_loads_the_newest_checkpoint_without_a_usable_record(tmp_path):
  _save_steps(tmp_path / "train", [3, 7])
  step, why = best.choose_checkpoint(tmp_path)
  assert step == 7 and why.startswith("the newest checkpoint (no dev evaluation recorded")
  best.write_record(tmp_path, best.DevRecord(7, 1.0, 5, "text", "f" * 64, 5, 2.0))  # its best was deleted by hand
  step, why = best.choose_checkpoint(tmp_path)
  assert step == 7 and "the recorded best step 5" in why and "has no checkpoint left" in why
  with pytest.raises(FileNotFoundError, match="no fine-tuning checkpoint"):
    best.choose_checkpoint(tmp_path / "empty")
  assert best.choose_checkpoint(tmp_path, 3) == (3, "the step asked for")  # evaluate.py --step
  with pytest.raises(InputError, match=r"no checkpoint of step 4; saved: \[3, 7\]"):
    best.choose_checkpoint(tmp_path, 4)


def test_a_dev_record_that_cannot_be_read_names_its_file_and_field(tmp_path):
  best.write_record(tmp_path, best.DevRecord(4, 10.0, 2, "orqa", DEV.fingerprint, 4, 10.0))
  path = best.record_path(tmp_path, 4)
  good = json.loads(path.read_text())
  assert best.newest_record(tmp_path) == best.DevRecord(4, 10.0, 2, "orqa", DEV.fingerprint, 4, 10.0)
  path.write_text('{"step": 4, "dev_exact')
  with pytest.raises(InputError, match=r"dev_eval/step_4.json: not a JSON dev record \(Unterminated string"):
    best.newest_record(tmp_path)
  for broken, error in [({**good, "best_step": "4"}, r"field 'best_step' must be int, got '4'"),
                        ({**good, "dev_exact_match": True}, r"field 'dev_exact_match' must be int or float, got True"),
                        ({k: v for k, v in good.items() if k != "dev_fingerprint"}, "missing field 'dev_fingerprint'"),
                        ({**good, "note": 1}, "unknown field 'note'")]:
    path.write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"dev_eval/step_4.json: " + error):
      best.newest_record(tmp_path)
  path.write_text("[]")
  _save_steps(tmp_path / "train", [4])
  with pytest.raises(InputError, match="step_4.json: a dev record must be a JSON object, got list"):
    best.choose_checkpoint(tmp_path)  # what evaluate.py, ask.py and convert.py load by


def test_the_dev_fingerprint_is_the_sorted_question_texts_and_the_answer_mode():
  assert best.DevSet.of(["what", "who"], "orqa") == DEV  # any order
  assert best.DevSet.of(["who", "what"], "text").fingerprint != DEV.fingerprint
  assert best.DevSet.of(["who", "whom"], "orqa").fingerprint != DEV.fingerprint
  assert DEV.questions == 2 and len(DEV.fingerprint) == 64


def test_the_converter_exports_the_best_checkpoint_of_an_openqa_run(tmp_path):
  from launch import convert

  _save_steps(tmp_path / "train", [1, 2])
  assert convert.export_step(str(tmp_path), None) == (2, f"the newest checkpoint (no dev evaluation recorded in "
                                                         f"{tmp_path / 'dev_eval'})")
  best.write_record(tmp_path, best.DevRecord(2, 5.0, 2, "orqa", DEV.fingerprint, 1, 20.0))
  step, why = convert.export_step(str(tmp_path), None)
  assert step == 1 and why.startswith("the best dev exact match, 20.00% of 2 dev questions")
  assert convert.export_step(str(tmp_path), 2) == (2, "given by --step")


# ---- the recipe in a fine-tuning run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qa(tmp_path_factory, wordpiece):
  """(spec, mesh, train file, dev file): 40 demo blocks, 6 training and 2 dev questions, a tiny model."""
  from realm_jax import partitioning
  from realm_jax.data.blocks import build_block_store
  from realm_jax.data.corpus import fingerprint_files, read_documents
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.objectives.openqa import OpenQaSpec

  root = tmp_path_factory.mktemp("tiny_qa")
  (root / "p.jsonl").write_text("\n".join(DEMO_PASSAGES.read_text().splitlines()[:40]) + "\n")
  (root / "e.jsonl").write_text("\n".join(DEMO_ENTITIES.read_text().splitlines()[:40]) + "\n")
  build_block_store(read_documents(root / "p.jsonl", root / "e.jsonl"), root / "blocks", wordpiece,
                    fingerprint_files(root / "p.jsonl", root / "e.jsonl"))
  lines = (QUESTIONS / "nq_open_dev.jsonl").read_text().splitlines()
  (root / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
  (root / "dev.jsonl").write_text("\n".join(lines[6:8]) + "\n")
  spec = OpenQaSpec(str(root / "blocks"), RetrieverConfig(TINY_BERT_H32, projection_size=16, block_len=32),
                    TINY_BERT_H32, OpenQaDataConfig(batch_size=2, query_len=16, reader_len=48, retrieve_k=4, reader_k=2,
                                                    max_span_width=3, answer_text="orqa"), span_hidden_size=16)
  return spec, partitioning.make_mesh(devices=jax.devices()[:1]), root / "train.jsonl", root / "dev.jsonl"


def _finetune(tiny_qa, workdir, num_steps: int, keep_checkpoints: int = 5, dev=None):
  """A run evaluating every step at learning rate 0 (the dev EM never changes: the best is the first step)."""
  spec, mesh, train, dev_file = tiny_qa
  return run_finetune(str(workdir), mesh, spec, TrainerConfig(num_steps, checkpoint_every=1, log_every=1,
                                                              keep_checkpoints=keep_checkpoints, eval_every=1),
                      OptimizerConfig(0.0), str(train), index_batch_size=40,
                      recipe=FinetuneRecipe(dev_questions=str(dev or dev_file)))


@pytest.fixture
def compilation_cache(tmp_path):
  """JAX's persistent compilation cache in `tmp_path` while the test runs (a restarted run compiles less); JAX
  decides once per process whether it uses the cache, so that decision is reset on the way in and out."""
  from jax.experimental.compilation_cache import compilation_cache

  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  compilation_cache.reset_cache()


def test_a_restart_records_the_checkpoint_a_killed_job_did_not_and_keeps_the_best(tiny_qa, tmp_path, monkeypatch,
                                                                                  compilation_cache):
  """Killed between its last checkpoint (2) and that step's record, the restart evaluates and records step 2;
  with keep_checkpoints=1 the best (step 1) outlives newer checkpoints."""
  write_record = best.write_record
  propose = BestCheckpoint.propose
  # The tiny reader scores the same dev EM at every step and a tie goes to the later step: one point less per
  # step makes step 1 the best.
  monkeypatch.setattr(BestCheckpoint, "propose", lambda self, step, em: propose(self, step, em - step))

  def killed_at_step_2(workdir, record):
    if record.step == 2:
      raise SystemExit("killed between checkpoint 2 and its record")
    write_record(workdir, record)

  monkeypatch.setattr(best, "write_record", killed_at_step_2)
  with pytest.raises(SystemExit, match="killed between"):
    _finetune(tiny_qa, tmp_path / "run", 2, keep_checkpoints=1)
  monkeypatch.setattr(best, "write_record", write_record)
  assert best.record_steps(tmp_path / "run") == [1] and (tmp_path / "run" / "train" / "2").is_dir()
  assert _finetune(tiny_qa, tmp_path / "run", 2, keep_checkpoints=1) == []  # resumes at checkpoint 2: no step
  assert best.record_steps(tmp_path / "run") == [1, 2]
  record = best.newest_record(tmp_path / "run")
  assert (record.step, record.best_step, record.dev_questions, record.answer_text) == (2, 1, 2, "orqa")
  assert record.dev_fingerprint == best.read_record(best.record_path(tmp_path / "run", 1)).dev_fingerprint
  assert sorted(int(p.name) for p in (tmp_path / "run" / "train").iterdir() if p.name.isdigit()) == [1, 2]


def test_finetuning_gives_orbax_the_best_checkpoint_to_keep(tiny_qa, tmp_path, monkeypatch):
  from realm_jax.train import finetune

  spec, _, _, dev_file = tiny_qa
  dev = best.DevSet.of([q.question for q in read_questions(dev_file)], "orqa")
  _save_steps(tmp_path / "train", [2])
  best.write_record(tmp_path, best.DevRecord(2, 5.0, dev.questions, dev.answer_text, dev.fingerprint, 1, 20.0))
  given = {}

  def make_trainer(*args, preserve=None, **kwargs):
    given["preserve"] = preserve
    raise SystemExit("stop before training")

  monkeypatch.setattr(finetune, "make_trainer", make_trainer)
  with pytest.raises(SystemExit, match="stop before training"):
    _finetune(tiny_qa, tmp_path, 3, keep_checkpoints=1)
  assert given["preserve"] is not None and given["preserve"](1) and not given["preserve"](2)


def _fake_checkpoint_and_record(workdir, step: int, record_step: int, dev: best.DevSet):
  _save_steps(workdir / "train", [step])
  best.write_record(workdir, best.DevRecord.first(record_step, 10.0, dev))


def test_a_resume_on_another_dev_set_is_refused_naming_the_record(tiny_qa, tmp_path):
  spec, _, _, dev_file = tiny_qa
  texts = [q.question for q in read_questions(dev_file)]
  _fake_checkpoint_and_record(tmp_path, 2, 2, best.DevSet.of(texts[:1] + ["another question"], "orqa"))
  with pytest.raises(InputError, match=r"dev_eval/step_2.json: the dev set differs from the recorded one "
                     r"\(dev_fingerprint '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
    _finetune(tiny_qa, tmp_path, 3)
  with pytest.raises(InputError, match=r"step_2.json: the dev set differs .*\(dev_questions 2 -> 1, answer_text "
                     r"'orqa' -> 'text', dev_fingerprint"):
    best.resume_record(tmp_path, 2, best.DevSet.of(texts[:1], "text"))
  assert best.resume_record(tmp_path, 2, best.DevSet.of(texts[:1] + ["another question"], "orqa")).step == 2
  with pytest.raises(InputError, match=r"step_2.json: the run was evaluated on 2 dev questions, this start has no "
                     "dev set"):
    best.resume_record(tmp_path, 2, None)


def test_a_start_over_stale_dev_records_is_refused_naming_the_directory(tiny_qa, tmp_path):
  dev = best.DevSet.of(["q"], "orqa")
  best.write_record(tmp_path / "fresh", best.DevRecord.first(4, 10.0, dev))
  with pytest.raises(InputError, match=r"fresh/dev_eval: dev records of steps \[4\] but no checkpoint in "
                     r".*fresh/train: stale records of an earlier run"):
    _finetune(tiny_qa, tmp_path / "fresh", 3)
  assert not (tmp_path / "fresh" / "train").exists()  # refused before anything is written
  _fake_checkpoint_and_record(tmp_path / "old", 2, 2, dev)
  best.write_record(tmp_path / "old", best.DevRecord.first(3, 10.0, dev))
  with pytest.raises(InputError, match=r"old/dev_eval: dev records of steps \[3\] but the latest checkpoint 2 in "):
    best.resume_record(tmp_path / "old", 2, dev)


def test_a_dev_evaluation_is_refused_on_several_processes(tiny_qa, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(InputError, match=r"FinetuneRecipe: a dev evaluation \(2 dev questions\) runs on one JAX "
                     "process only, this run has 2"):
    _finetune(tiny_qa, tmp_path / "run", 2)
  assert not (tmp_path / "run").exists()


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
