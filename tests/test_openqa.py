"""Open-QA fine-tuning: question sets, ORQA featurisation, the joint span loss, learning, and the launchers."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEMO, DEMO_ENTITIES, DEMO_PASSAGES, REPO
from test_launch import run_launcher

from realm_jax.data.corpus import CorpusError
from realm_jax.data.features import span_grid
from realm_jax.data.openqa import OpenQaDataConfig, OpenQaFeaturizer
from realm_jax.data.questions import (
  RealmQuestions,
  UnanswerableQuestion,
  question_from_record,
  read_questions,
  read_tfds_questions,
)
from realm_jax.models.bert import BertConfig
from realm_jax.models.reader import INVALID_SPAN_LOGIT, SpanScorer
from realm_jax.objectives.openqa import OpenQaModel, openqa_loss

QUESTIONS = DEMO / "questions"


# ---- question sets ---------------------------------------------------------------------------------------------

def test_demo_question_sets_read_with_their_answer_kinds():
  nq = read_questions(QUESTIONS / "nq_open_dev.jsonl")
  trec = read_questions(QUESTIONS / "curatedtrec_test.jsonl")
  assert len(nq) == 300 and all(q.gold_passage_ids and not q.is_regex for q in nq)
  assert len(trec) == 100 and all(q.is_regex for q in trec)
  assert trec[0].qid == json.loads((QUESTIONS / "curatedtrec_test.jsonl").open().readline())["trec_id"]


def test_a_malformed_question_line_names_file_line_and_field(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_text('{"question": "who?", "answers": ["me"]}\n{"question": "why?", "answers": "because"}\n')
  with pytest.raises(CorpusError, match=r"q.jsonl:2: field 'answers'"):
    read_questions(path)
  path.write_text('{"question": "who?", "answers": ["me"]}\n{"question": "why?"\n')
  with pytest.raises(CorpusError, match=r"q.jsonl:2: not valid JSON"):
    read_questions(path)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    read_questions(tmp_path / "missing.jsonl")


def test_questions_with_only_empty_answers_fail_unless_a_training_set_skips_them(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"question": "a?", "answers": ["x"]}\n{"question": "b?", "answers": [""]}\n'
                  '{"question": "c?", "answers": ["y", ""]}\n')
  with pytest.raises(UnanswerableQuestion, match="train.jsonl:2"):
    read_questions(path)
  kept = read_questions(path, skip_unanswerable=True)
  assert [(q.question, q.answers) for q in kept] == [("a?", ("x",)), ("c?", ("y",))]


def test_tfds_builder_gives_the_same_questions_as_the_jsonl(tmp_path):
  path = QUESTIONS / "curatedtrec_test.jsonl"
  builder = RealmQuestions(path=path, data_dir=str(tmp_path))
  builder.download_and_prepare(file_format="array_record")
  from_tfds = read_tfds_questions(builder, "test")
  assert [(q.question, q.answers, q.is_regex, q.qid) for q in from_tfds] == [
      (q.question, q.answers, q.is_regex, q.qid) for q in read_questions(path)]


def test_catalog_records_natural_questions_open_and_web_questions_map_to_questions():
  nq = question_from_record({"question": b"who sang it", "answer": [b"Queen", b"Freddie Mercury"]}, "nq[0]", 0)
  wq = question_from_record({"url": b"u", "question": b"where is it?", "answers": [b"Paris"]}, "wq[0]", 0)
  assert nq.answers == ("Queen", "Freddie Mercury") and not nq.is_regex
  assert wq.question == "where is it?" and wq.answers == ("Paris",)
  with pytest.raises(CorpusError, match="neither 'answers' nor 'answer'"):
    question_from_record({"question": b"q"}, "x[3]", 3)


# ---- span reader and loss ---------------------------------------------------------------------------------------

def test_span_grid_is_every_start_with_widths_up_to_the_maximum():
  starts, ends = span_grid(4, 3)
  assert list(zip(starts[:4], ends[:4], strict=True)) == [(0, 0), (0, 1), (0, 2), (1, 1)]
  assert len(starts) == 12 and (ends - starts).max() == 2


def test_spans_outside_the_block_or_past_the_sequence_get_the_invalid_logit():
  config = BertConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=50)
  scorer = SpanScorer(config, span_hidden_size=8, max_span_width=3)
  hidden = jax.random.normal(jax.random.key(0), (1, 6, 16))
  block_mask = jnp.asarray([[0, 0, 1, 1, 1, 0]])
  logits, _ = scorer.init_with_output(jax.random.key(1), hidden, block_mask)
  starts, ends = span_grid(6, 3)
  valid = np.asarray([2 <= s and e <= 4 for s, e in zip(starts, ends, strict=True)])
  assert valid.sum() == 6  # (2,2) (2,3) (2,4) (3,3) (3,4) (4,4)
  assert np.all(np.asarray(logits)[0, ~valid] == INVALID_SPAN_LOGIT)
  assert np.all(np.asarray(logits)[0, valid] > INVALID_SPAN_LOGIT / 2)


def _log_softmax_marginal(logits, correct):
  logits, correct = logits.reshape(-1).astype(np.float64), correct.reshape(-1)
  if not correct.any():
    return 0.0
  log_z = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
  gold = np.log(np.exp(logits[correct] - logits.max()).sum()) + logits.max()
  return log_z - gold


def test_openqa_loss_equals_a_direct_numpy_computation():
  rng = np.random.default_rng(0)
  batch, retrieve_k, reader_k, spans = 3, 7, 2, 5
  retriever_logits = rng.normal(size=(batch, retrieve_k)).astype(np.float32)
  span_logits = rng.normal(size=(batch, reader_k, spans)).astype(np.float32)
  reader_logits = span_logits + retriever_logits[:, :reader_k, None]
  retriever_correct = rng.random((batch, retrieve_k)) < 0.3
  span_correct = rng.random((batch, reader_k, spans)) < 0.2
  retriever_correct[:2, 0], span_correct[0, 0, 0], span_correct[2, 1, 2] = True, True, True
  retriever_correct[2] = False  # no positive: that loss is zero
  span_correct[1] = False
  loss, metrics = openqa_loss(jnp.asarray(retriever_logits), jnp.asarray(reader_logits),
                              jnp.asarray(retriever_correct), jnp.asarray(span_correct))
  expected = [_log_softmax_marginal(retriever_logits[b], retriever_correct[b])
              + _log_softmax_marginal(reader_logits[b], span_correct[b]) for b in range(batch)]
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  assert float(metrics["retrieval_recall"]) == pytest.approx(2 / 3)
  assert float(metrics["reader_oracle"]) == pytest.approx(2 / 3)


def test_the_retriever_logit_is_added_to_every_span_of_its_block():
  """The model's reader logits are its span logits plus the block's retriever logit (score_scale times the inner
  product), for every span of each of the top reader_k blocks; blocks past reader_k do not reach them."""
  import flax.linen as nn

  config = BertConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=50)
  model = OpenQaModel(config, config, projection_size=8, span_hidden_size=8, max_span_width=3)
  rng = np.random.default_rng(0)
  queries = {"input_ids": rng.integers(1, 50, (2, 6)), "input_mask": np.ones((2, 6), np.int32),
             "segment_ids": np.zeros((2, 6), np.int32)}
  reader = {"input_ids": rng.integers(1, 50, (2, 2, 8)), "input_mask": np.ones((2, 2, 8), np.int32),
            "segment_ids": np.tile([0, 0, 0, 1, 1, 1, 1, 1], (2, 2, 1)),
            "block_mask": np.tile([0, 0, 0, 1, 1, 1, 1, 0], (2, 2, 1))}
  batch = {f"query_{k}": v for k, v in queries.items()} | {f"reader_{k}": v for k, v in reader.items()}
  zeros = np.zeros((2, 3, 8), np.float32)  # retrieve_k 3 blocks of which reader_k 2 are read
  params = nn.meta.unbox(model.init(jax.random.key(0), batch | {"block_embeddings": zeros})["params"])
  apply = lambda e: [np.asarray(x) for x in model.apply({"params": params}, batch | {"block_embeddings": e})]  # noqa: E731
  query = np.asarray(model.apply({"params": params}, queries, method=OpenQaModel.embed_queries))
  wanted = np.asarray([[1.5, -2.0, 0.7], [3.0, 0.5, -1.0]], np.float32)
  embeddings = wanted[..., None] * (query / (query**2).sum(-1, keepdims=True))[:, None]  # q . e = wanted
  retriever_logits, reader_logits = apply(embeddings)
  _, span_logits = apply(zeros)  # retriever logits 0: the span scorer's own logits
  np.testing.assert_allclose(retriever_logits, wanted, rtol=1e-5, atol=1e-5)
  added = np.broadcast_to(retriever_logits[:, :2, None], reader_logits.shape)
  np.testing.assert_allclose(reader_logits - span_logits, added, rtol=0, atol=2e-3)  # every span, invalid ones too
  valid = span_logits > INVALID_SPAN_LOGIT / 2
  assert valid.any() and (~valid).any()
  np.testing.assert_allclose(reader_logits[valid], (span_logits + added)[valid], rtol=1e-5, atol=1e-5)
  moved = embeddings.copy()
  moved[:, 2] *= -3.0  # the third block: retrieved, not read
  moved_retriever, moved_reader = apply(moved)
  assert np.abs(moved_retriever[:, 2] - retriever_logits[:, 2]).min() > 0.1
  np.testing.assert_array_equal(moved_reader, reader_logits)
  scaled = model.clone(retriever_score_scale=0.25)  # RetrieverConfig.score_scale: the logit itself is scaled
  scaled_retriever, scaled_reader = (np.asarray(x) for x in scaled.apply(
      {"params": params}, batch | {"block_embeddings": embeddings}))
  np.testing.assert_allclose(scaled_retriever, 0.25 * wanted, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scaled_reader[valid], (span_logits + 0.25 * added)[valid], rtol=1e-5, atol=1e-5)


# ---- featurisation -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def featurizer(demo_store, wordpiece):
  return OpenQaFeaturizer(demo_store, wordpiece, OpenQaDataConfig(reader_len=160, retrieve_k=8, reader_k=2))


def _block_of(store, doc_id):
  return next(i for i in range(store.num_blocks) if store.text(i)["doc_id"] == doc_id)


def test_reader_inputs_are_question_then_block_body_without_title(featurizer, demo_store, wordpiece):
  question = read_questions(QUESTIONS / "nq_open_dev.jsonl")[0]  # the moon landing question
  block = _block_of(demo_store, question.gold_passage_ids[0])
  query = featurizer.query(question.question)
  reader = featurizer.reader_inputs(query["input_ids"], np.asarray([block]))
  q_ids, _ = wordpiece.encode(question.question)
  n = len(q_ids)
  ids = reader["input_ids"][0]
  assert ids[0] == wordpiece.cls_id and list(ids[1 : n + 1]) == list(q_ids) and ids[n + 1] == wordpiece.sep_id
  body = demo_store.body_ids(block)
  assert list(ids[n + 2 : n + 2 + len(body)]) == list(body[: 160 - n - 3])
  assert reader["block_mask"][0, : n + 2].sum() == 0 and reader["block_mask"][0, n + 2] == 1
  assert reader["segment_ids"][0, n + 2] == 1 and reader["segment_ids"][0, n + 1] == 0


def test_gold_span_is_marked_and_maps_back_to_the_original_text(featurizer, demo_store):
  question = read_questions(QUESTIONS / "nq_open_dev.jsonl")[0]
  block = _block_of(demo_store, question.gold_passage_ids[0])
  query = featurizer.query(question.question)
  reader = featurizer.reader_inputs(query["input_ids"], np.asarray([block]))
  correct = featurizer.span_correct(question, reader, np.asarray([block]))
  assert correct.any()
  texts = {featurizer.answer_text(block, query["input_ids"], int(featurizer.starts[s]), int(featurizer.ends[s]))
           for s in np.flatnonzero(correct[0])}
  assert texts <= set(question.answers) and texts  # original case, e.g. "December 1972"
  assert featurizer.retriever_correct(question, np.asarray([block])).tolist() == [True]


def test_curatedtrec_gold_spans_come_from_the_regex_matches(featurizer, demo_store):
  trec = read_questions(QUESTIONS / "curatedtrec_test.jsonl")
  texts = [demo_store.text(i)["text"] for i in range(demo_store.num_blocks)]
  question, block = next((q, i) for q in trec for i, t in enumerate(texts)
                         if featurizer.retriever_correct(q, np.asarray([i]))[0])
  query = featurizer.query(question.question)
  reader = featurizer.reader_inputs(query["input_ids"], np.asarray([block]))
  spans = np.flatnonzero(featurizer.span_correct(question, reader, np.asarray([block]))[0])
  answers = {featurizer.answer_text(block, query["input_ids"], int(featurizer.starts[s]), int(featurizer.ends[s]))
             for s in spans}
  assert answers and all(any(re.search(p, a, re.IGNORECASE) for p in question.answers) for a in answers)


# ---- learning and the launchers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_qa_setup(tmp_path_factory, wordpiece):
  """A 300-block store holding the gold passages of 6 NQ dev questions, and those questions."""
  from realm_jax.data.blocks import BlockStore, build_block_store
  from realm_jax.data.corpus import fingerprint_files, read_documents

  root = tmp_path_factory.mktemp("qa")
  lines = (QUESTIONS / "nq_open_dev.jsonl").read_text().splitlines()[:6]
  gold = {g for line in lines for g in json.loads(line)["gold_passage_ids"]}
  passages = DEMO_PASSAGES.read_text().splitlines()
  entities = DEMO_ENTITIES.read_text().splitlines()
  keep = [i for i, p in enumerate(passages) if json.loads(p)["id"] in gold] + list(range(300))
  keep = sorted(set(keep))[:300]
  (root / "p.jsonl").write_text("\n".join(passages[i] for i in keep) + "\n")
  (root / "e.jsonl").write_text("\n".join(entities[i] for i in keep) + "\n")
  (root / "q.jsonl").write_text("\n".join(lines) + "\n")
  build_block_store(read_documents(root / "p.jsonl", root / "e.jsonl"), root / "blocks", wordpiece,
                    fingerprint_files(root / "p.jsonl", root / "e.jsonl"))
  return root, BlockStore(root / "blocks")


def test_minilm_zero_shot_baseline_retrieves_answer_blocks(small_qa_setup, minilm_path):
  """Sentence-transformers' recipe (mean pooling, cosine); blocks embedded per length group or padded alike."""
  from realm_jax import partitioning
  from realm_jax.checkpoints.init import load_encoder
  from realm_jax.data.tokenization import load_tokenizer
  from realm_jax.eval.answers import has_answer
  from realm_jax.eval.baselines import MeanPoolRetriever

  root, store = small_qa_setup
  encoder = BertConfig.from_hf_json(minilm_path / "config.json")
  weights = load_encoder("minilm", encoder)
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  tokenizer = load_tokenizer(minilm_path / "vocab.txt")
  questions = read_questions(root / "q.jsonl")
  texts = [q.question for q in questions]
  bucketed = MeanPoolRetriever(encoder, weights, store, tokenizer, mesh, block_len=128).search(texts, 5)
  padded = MeanPoolRetriever(encoder, weights, store, tokenizer, mesh, block_len=128, length_bucket=0).search(texts, 5)
  np.testing.assert_array_equal(bucketed, padded)
  in_store = {store.text(i)["doc_id"] for i in range(store.num_blocks)}
  for q, row in zip(questions, bucketed, strict=True):  # (MiniLM was trained on NQ question-passage pairs)
    if set(q.gold_passage_ids) & in_store:
      top = [store.text(int(i)) for i in row]
      assert any(set(q.gold_passage_ids) & {b["doc_id"]} and has_answer(b["text"], q.answers) for b in top), q
  assert sum(bool(set(q.gold_passage_ids) & in_store) for q in questions) >= 3


@pytest.mark.slow
def test_finetuning_from_minilm_learns_to_answer_its_training_questions(small_qa_setup, minilm_path):
  from realm_jax import partitioning
  from realm_jax.eval.answers import exact_match
  from realm_jax.eval.predict import load_predictor
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.objectives.openqa import OpenQaSpec
  from realm_jax.train.finetune import run_finetune
  from realm_jax.train.optimizer import OptimizerConfig
  from realm_jax.train.trainer import TrainerConfig

  root, store = small_qa_setup
  encoder = BertConfig.from_hf_json(minilm_path / "config.json", pooling="mean")
  spec = OpenQaSpec(str(store.path), RetrieverConfig(encoder, block_len=128), encoder,
                    OpenQaDataConfig(batch_size=2, reader_len=128, retrieve_k=16, reader_k=2),
                    retriever_init="minilm", reader_init="minilm")
  mesh = partitioning.make_mesh(devices=jax.devices()[:2])
  questions = read_questions(root / "q.jsonl")
  history = run_finetune(str(root / "run"), mesh, spec, TrainerConfig(36, checkpoint_every=36, log_every=6),
                         OptimizerConfig(1e-4), str(root / "q.jsonl"))
  assert history[-1]["reader_loss"] < 0.5 * history[0]["reader_loss"]
  predictor = load_predictor(root / "run", spec, mesh)
  predictions = predictor.answer([q.question for q in questions])
  correct = [exact_match(p.answer, q.answers) for p, q in zip(predictions, questions, strict=True)]
  assert sum(correct) >= 3, [(p.answer, q.answers) for p, q in zip(predictions, questions, strict=True)]
  assert all(len(p.blocks) == 2 and p.block_id in [b.block_id for b in p.blocks] for p in predictions)


def test_finetune_evaluate_and_ask_launchers_end_to_end_on_a_gcs_workdir(small_qa_setup, gcs_bucket):
  from etils import epath

  root, store = small_qa_setup
  workdir = epath.Path(f"{gcs_bucket}/qa")
  flags = ["--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/openqa_demo.gin",
           f"--gin_bindings=BLOCK_STORE = '{store.path}'", f"--gin_bindings=TRAIN_QUESTIONS = '{root / 'q.jsonl'}'",
           f"--gin_bindings=QUESTIONS = '{QUESTIONS}'", "--gin_bindings=NUM_STEPS = 2",
           "--gin_bindings=NUM_EPOCHS = None", "--gin_bindings=openqa_data.OpenQaDataConfig.retrieve_k = 8",
           f"--workdir={workdir}",
           "--gin_bindings=finetune.FinetuneRecipe.dev_fraction = 0.3"]  # 1 of the 6 questions is dev
  result = run_launcher("finetune.py", *flags, "--gin_bindings=trainer.TrainerConfig.log_every = 1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Open-QA fine-tuning finished at step 2" in result.stdout
  assert "fine-tuning questions: 5 train, 1 dev" in result.stderr
  assert "num_steps=2 = 1.6 epochs of 5 train questions at batch 4" in result.stderr
  record = json.loads((workdir / "dev_eval" / "step_2.json").read_text())  # dev EM at the last step
  assert record["step"] == record["best_step"] == 2 and record["dev_questions"] == 1
  assert "at step 2: evaluate.py and ask.py load that checkpoint" in result.stdout
  result = run_launcher("evaluate.py", *flags, "--limit=3", "--gin_bindings=openqa_eval.EvaluationConfig.baselines = "
                        "('bm25',)")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loading fine-tuning checkpoint step 2 of" in result.stderr and "the best dev exact match" in result.stderr
  rows = json.loads((workdir / "eval" / "results.json").read_text())
  assert {(r["dataset"], r["system"]) for r in rows} >= {("nq_open_dev", "realm-jax"), ("curatedtrec_test", "BM25")}
  assert "| nq_open_dev | 3 |" in result.stdout
  records = json.loads((workdir / "eval" / "webquestions_test.json").read_text())
  assert len(records) == 3 and {"prediction", "blocks", "correct"} <= set(records[0])
  assert records[0]["blocks"][0]["title"]
  assert all(len(r["baselines_has_answer"]["BM25"]) == len(r["retrieved_has_answer"]) for r in records)
  bm25 = next(r for r in rows if (r["dataset"], r["system"]) == ("webquestions_test", "BM25"))
  assert bm25["recall@20"] == pytest.approx(100 * np.mean([any(r["baselines_has_answer"]["BM25"][:20])
                                                           for r in records]))
  result = run_launcher("evaluate.py", *flags, "--limit=3", "--retrieval_only",  # 3 questions on 2 devices: padded
                        "--gin_bindings=openqa_eval.EvaluationConfig.baselines = ('bm25',)")
  assert result.returncode == 0, result.stderr[-3000:]
  recall_rows = json.loads((workdir / "eval_retrieval" / "results.json").read_text())
  ours = [r for r in recall_rows if r["system"] == "realm-jax"]
  assert len(ours) >= 3 and all("recall@5" in r and "exact_match" not in r for r in ours)
  assert {r["dataset"]: r["questions"] for r in ours}["nq_open_dev"] == 3
  outside = [json.loads(line) for line in (QUESTIONS / "curatedtrec_test.jsonl").open()][:4]
  for record in outside:  # a question file from elsewhere: regex answers it does not mark as regexes
    del record["answer_is_regex"]
  question_file = epath.Path(f"{gcs_bucket}/elsewhere/outside.jsonl")  # gs://, outside the workdir
  question_file.parent.mkdir(parents=True, exist_ok=True)
  question_file.write_text("".join(json.dumps(r) + "\n" for r in outside))
  mine = ["--retrieval_only", f"--questions=mine={question_file}", "--answer_format=mine=regex",
          "--gin_bindings=openqa_eval.EvaluationConfig.baselines = ()"]
  result = run_launcher("evaluate.py", *flags, *mine, "--step=2")  # a given checkpoint, into its own folder
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| mine | 4 |" in result.stdout and "nq_open_dev" not in result.stdout
  assert "loading fine-tuning checkpoint step 2 of" in result.stderr and "the step asked for" in result.stderr
  rows = json.loads((workdir / "eval_retrieval_step_2" / "results.json").read_text())
  assert [r["dataset"] for r in rows] == ["mine"]
  assert {r["dataset"] for r in json.loads((workdir / "eval_retrieval" / "results.json").read_text())} >= {
      "nq_open_dev"}  # the best checkpoint's results are left as they were
  result = run_launcher("evaluate.py", *flags, *mine, "--step=1")
  assert result.returncode != 0 and re.search(r"no checkpoint of step 1; saved: \[2\]", result.stderr), \
      result.stderr[-2000:]
  result = run_launcher("ask.py", *flags, "--question=when was the last time anyone was on the moon", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  answer = json.loads(result.stdout.strip().splitlines()[-1])
  assert answer["answer"] and len(answer["blocks"]) == 5 and answer["blocks"][0]["snippet"]
  assert "loading fine-tuning checkpoint step 2 of" in result.stderr and "the best dev exact match" in result.stderr
  assert (REPO / "gin" / "runs" / "openqa.gin").is_file()


def test_evaluation_question_files_are_named_safely_and_read_with_their_declared_answer_format(tmp_path):
  from realm_jax.data.corpus import CorpusError
  from realm_jax.errors import InputError
  from realm_jax.eval.openqa_eval import EvaluationConfig, read_datasets

  (tmp_path / "trec.jsonl").write_text('{"question": "tallest?", "answers": ["Ever\\\\s?est"]}\n')
  (tmp_path / "marked.jsonl").write_text('{"question": "who?", "answers": ["x"], "answer_is_regex": false}\n')
  sets = read_datasets(EvaluationConfig({"a": "trec.jsonl", "b": str(tmp_path / "trec.jsonl")}, str(tmp_path),
                                        answer_formats={"a": "regex"}))
  assert sets["a"][0].is_regex and not sets["b"][0].is_regex  # "b": absolute path, read "auto"
  with pytest.raises(CorpusError, match=r"marked.jsonl:1: field 'answer_is_regex' is false in a file read as "
                                        r"answer_format='regex'$"):
    read_datasets(EvaluationConfig({"m": "marked.jsonl"}, str(tmp_path), answer_formats={"m": "regex"}))
  with pytest.raises(InputError, match=r"answer format 'regexes': expected one of auto, strings, regex$"):
    read_datasets(EvaluationConfig({"m": "marked.jsonl"}, str(tmp_path), answer_formats={"m": "regexes"}))
  with pytest.raises(InputError, match=r"^EvaluationConfig.answer_formats: 'x' is not a dataset"):
    read_datasets(EvaluationConfig({"m": "marked.jsonl"}, str(tmp_path), answer_formats={"x": "regex"}))
  for bad in ("../m", "results"):
    with pytest.raises(InputError, match=rf"^EvaluationConfig.datasets: name '{re.escape(bad)}': letters, digits"):
      read_datasets(EvaluationConfig({bad: "marked.jsonl"}, str(tmp_path)))


def test_evaluation_reads_its_question_files_before_loading_anything(tmp_path):
  from realm_jax.data.corpus import CorpusError
  from realm_jax.eval.openqa_eval import EvaluationConfig, run_evaluation

  (tmp_path / "bad.jsonl").write_text('{"question": "who?", "answers": ["x"], "answer_is_regex": "false"}\n')
  with pytest.raises(CorpusError, match=r"bad.jsonl:1: field 'answer_is_regex' must be true or false"):
    run_evaluation(str(tmp_path / "no_run"), mesh=None, spec=None,  # not touched: nothing is loaded first
                   config=EvaluationConfig({"bad": "bad.jsonl"}, questions_dir=str(tmp_path)))


@pytest.mark.parametrize("dataset", ["nq_open_dev", "curatedtrec_test", "webquestions_test"])
def test_answer_labels_from_block_text_bytes_equal_has_answer_on_the_parsed_texts(demo_store, wordpiece, dataset):
  from realm_jax.eval.answers import has_answer

  featurizer = OpenQaFeaturizer(demo_store, wordpiece, OpenQaDataConfig())
  questions = read_questions(QUESTIONS / f"{dataset}.jsonl")[:60]
  rng = np.random.default_rng(0)
  texts = [t["text"] for t in demo_store.iter_texts()]
  for question in questions:
    with_answer = [i for i in rng.permutation(len(texts))[:600] if has_answer(texts[i], question.answers,
                                                                              question.is_regex)]
    ids = np.concatenate([rng.integers(0, len(texts), 40), np.asarray(with_answer[:10], np.int64)])
    expected = np.asarray([has_answer(texts[i], question.answers, question.is_regex) for i in ids])
    np.testing.assert_array_equal(featurizer.retriever_correct(question, ids), expected)
    assert demo_store.text_bytes(int(ids[0])).decode() == texts[ids[0]]
