"""Hugging Face REALM checkpoints: import reproduces HF's numbers, export is bit-exact, bad files are named.

The reference (tests/data/realm_reference, made by tools/reference/make_realm_reference.py) holds small
random-init HF REALM models and their outputs on demo-slice text.  HF's definitions are reproduced through
realm-jax's own switches: the retriever projection's LayerNorm eps (HF 1e-12, released code 1e-3) and the
logit of spans outside the block (HF float32 min, released code -10000).
"""

import dataclasses
import json
import logging
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from realm_jax.checkpoints.hf_bert import CheckpointMismatchError
from realm_jax.checkpoints.hf_realm import (
  HF_CLASSES,
  SPEC_PREFIX,
  expected_shapes,
  load_hf_realm,
  load_hf_realm_bert,
  load_hf_realm_encoder,
  load_hf_realm_reader,
  load_hf_realm_retriever,
  realm_names,
  save_hf_realm,
)
from realm_jax.data.tokenization import WordPieceTokenizer
from realm_jax.errors import InputError
from realm_jax.models.reader import HF_INVALID_SPAN_LOGIT
from realm_jax.models.retriever import DualEncoder
from realm_jax.objectives.openqa import OpenQaModel
from realm_jax.objectives.realm import RealmModel, marginal_loss

DATA = REPO / "tests" / "data" / "realm_reference"
HF_PROJECTION_EPS = 1e-12  # HF's RealmScorerProjection uses config.layer_norm_eps


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(DATA / "outputs.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def ckpt():
  return {kind: load_hf_realm(DATA / kind) for kind in ("scorer", "encoder", "reader")}


def features(ref, prefix):
  return {name: ref[f"{prefix}_{name}"] for name in ("input_ids", "input_mask", "segment_ids")}


def flat(ref, prefix):
  return {k: v.reshape(-1, v.shape[-1]) for k, v in features(ref, prefix).items()}


def test_demo_text_tokenizes_as_in_the_reference():
  meta = json.loads((DATA / "reference.json").read_text())
  ids, _ = WordPieceTokenizer(DATA / "vocab.txt").encode(meta["reader_question"]["text"])
  reader_ids = np.load(DATA / "outputs.npz")["reader_input_ids"][0]
  np.testing.assert_array_equal(ids, reader_ids[1: 1 + len(ids)])


def test_config_gives_realm_architecture(ckpt):
  arch = ckpt["scorer"].architecture
  assert arch.bert.hidden_act == "gelu_new"  # HF REALM configs (and TF BERT) use the tanh GELU
  assert (arch.bert.hidden_size, arch.bert.num_layers, arch.projection_size) == (32, 2, 16)
  assert (arch.span_hidden_size, arch.max_span_width, arch.reader_layer_norm_eps) == (16, 10, 1e-3)


def test_scorer_embeddings_and_relevance_match_hf(ckpt, ref):
  c = ckpt["scorer"]
  assert set(c.params) == {"query_tower"}  # HF's RealmScorer shares its query embedder
  model = DualEncoder(c.architecture.bert, c.architecture.projection_size, layer_norm_eps=HF_PROJECTION_EPS)
  query, blocks = model.apply({"params": c.params}, features(ref, "query"), flat(ref, "block"))
  blocks = np.asarray(blocks).reshape(ref["block_embedding"].shape)
  np.testing.assert_allclose(query, ref["query_embedding"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(blocks, ref["block_embedding"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.einsum("bd,bkd->bk", query, blocks), ref["relevance_score"], rtol=0, atol=1e-4)


def test_released_projection_layer_norm_differs_from_hf(ckpt, ref):
  c = ckpt["scorer"]
  query = DualEncoder(c.architecture.bert, c.architecture.projection_size).apply(
      {"params": c.params}, features(ref, "query"), method=DualEncoder.embed_queries)
  assert np.abs(np.asarray(query) - ref["query_embedding"]).max() > 1e-3


def test_exact_gelu_would_not_match_realm_checkpoints(ref):
  c = load_hf_realm(DATA / "scorer", hidden_act="gelu")
  query = DualEncoder(c.architecture.bert, c.architecture.projection_size, layer_norm_eps=HF_PROJECTION_EPS).apply(
      {"params": c.params}, features(ref, "query"), method=DualEncoder.embed_queries)
  assert np.abs(np.asarray(query) - ref["query_embedding"]).max() > 1e-4


def test_knowledge_augmented_encoder_loss_matches_hf(ckpt, ref):
  arch = ckpt["encoder"].architecture
  model = RealmModel(arch.bert, arch.bert, arch.projection_size, retriever_layer_norm_eps=HF_PROJECTION_EPS)
  params = {"retriever": ckpt["scorer"].params, **ckpt["encoder"].params}
  batch = {f"{p}_{k}": v for p in ("query", "block", "joint") for k, v in features(ref, p).items()}
  scores, log_probs = model.apply({"params": params}, batch | {"mlm_positions": ref["mlm_positions"]})
  np.testing.assert_allclose(scores, ref["relevance_score"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(log_probs, jax.nn.log_softmax(ref["mlm_logits_at_masks"]), rtol=0, atol=1e-4)
  loss, _ = marginal_loss(scores, log_probs, ref["mlm_ids"], ref["mlm_weights"])
  np.testing.assert_allclose(loss, ref["mlm_loss"], rtol=1e-4)
  assert ref["mlm_weights"].sum() < (ref["mlm_labels"] >= 0).sum()  # a labelled mask is weighted out


def hf_marginal_nll(logits, correct):
  """HF RealmReader's `marginal_log_loss`: logsumexp(all) - logsumexp(correct)."""
  lse = lambda x: np.log(np.exp(x - x.max()).sum()) + x.max()  # noqa: E731
  return lse(logits) - lse(logits[correct]) if correct.any() else 0.0


def test_reader_span_logits_and_loss_match_hf(ckpt, ref):
  """The Open-QA model's reader logits (its retriever logit added to each span) are HF RealmReader's."""
  c, scorer = ckpt["reader"], ckpt["scorer"]
  arch = c.architecture
  model = OpenQaModel(scorer.architecture.bert, arch.bert, scorer.architecture.projection_size,
                      span_hidden_size=arch.span_hidden_size, max_span_width=arch.max_span_width,
                      retriever_layer_norm_eps=HF_PROJECTION_EPS, invalid_span_logit=HF_INVALID_SPAN_LOGIT,
                      reader_layer_norm_eps=arch.reader_layer_norm_eps)
  params = {"retriever": scorer.params, "reader": c.params}
  queries = {k: v[:1] for k, v in features(ref, "query").items()}
  query = np.asarray(model.apply({"params": params}, queries, method=OpenQaModel.embed_queries))[0]
  relevance = ref["reader_relevance_score"]
  assert np.abs(relevance).min() > 1e-2  # far above the tolerance below: a missing retriever logit shows
  batch = ({f"query_{k}": v for k, v in queries.items()}
           | {f"reader_{k}": v[None] for k, v in features(ref, "reader").items()}
           | {"reader_block_mask": ref["reader_block_mask"][None],
              "block_embeddings": (relevance[:, None] * query / (query @ query))[None]})  # q . e_z = HF's score
  retriever_logits, reader_logits = model.apply({"params": params}, batch)
  np.testing.assert_allclose(retriever_logits[0], relevance, rtol=1e-5, atol=1e-6)
  ours = np.asarray(reader_logits)[0]
  # HF orders spans by width then start and omits spans running past the sequence; ours is (start, width).
  starts, ends = ref["reader_span_starts"], ref["reader_span_ends"]
  ours = ours[:, starts * arch.max_span_width + (ends - starts)]
  np.testing.assert_allclose(ours, ref["reader_logits"], rtol=0, atol=1e-4)

  gold = (starts[None, None] == ref["reader_gold_starts"][..., None]) & (ends == ref["reader_gold_ends"][..., None])
  reader_correct = gold.any(1)
  assert reader_correct.sum() == 2  # the too-wide gold span is no candidate
  retriever_loss = hf_marginal_nll(ref["reader_relevance_score"], ref["reader_has_answers"])
  reader_loss = hf_marginal_nll(ours.ravel(), reader_correct.ravel())
  np.testing.assert_allclose(retriever_loss, ref["reader_retriever_loss"], rtol=1e-4)
  np.testing.assert_allclose(reader_loss, ref["reader_reader_loss"], rtol=1e-4)
  np.testing.assert_allclose(retriever_loss + reader_loss, ref["reader_loss"], rtol=1e-4)
  block, span = np.unravel_index(np.argmax(ours), ours.shape)
  hf_prediction = (ref["reader_block_idx"], ref["reader_start_pos"][0], ref["reader_end_pos"][0])
  assert (block, starts[span], ends[span]) == hf_prediction


@pytest.mark.parametrize("kind", ["scorer", "encoder", "reader"])
def test_round_trip_is_bit_identical(ckpt, kind, tmp_path):
  c = ckpt[kind]
  save_hf_realm(tmp_path, kind, c.architecture, c.params, c.passthrough, c.hf_config)
  assert (tmp_path / "model.safetensors").read_bytes() == (DATA / kind / "model.safetensors").read_bytes()
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads((DATA / kind / "config.json").read_text())


def test_embedder_openqa_and_separate_towers_round_trip(ckpt, tmp_path):
  tower = ckpt["scorer"].params["query_tower"]
  arch = ckpt["scorer"].architecture
  cases = {
      "embedder": {"query_tower": tower},
      "openqa": {"retriever": {"query_tower": tower}, "reader": ckpt["reader"].params},
      "scorer": {"query_tower": tower, "block_tower": ckpt["scorer"].params["query_tower"] | {
          "projection": {k: v + 1.0 for k, v in tower["projection"].items()}}},
  }
  for kind, params in cases.items():
    save_hf_realm(tmp_path / kind, kind, arch, params)
    back = load_hf_realm(tmp_path / kind)
    assert back.kind == kind
    flat_in = {k: np.asarray(v) for k, v in _flatten(params).items()}
    flat_out = {k: np.asarray(v) for k, v in _flatten(back.params).items()}
    assert flat_in.keys() == flat_out.keys(), kind
    for k in flat_in:
      np.testing.assert_array_equal(flat_in[k], flat_out[k], err_msg=f"{kind} {k}")


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    out |= _flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v}
  return out


def test_every_hf_tensor_has_one_home(ckpt):
  for kind in ("embedder", "scorer", "encoder", "reader", "openqa"):
    names = realm_names(kind, ckpt["scorer"].architecture)
    homes = [*names.params, *names.aliases, *names.unused]
    assert len(homes) == len(set(homes)), kind
    assert set(names.aliases.values()) <= set(names.params) | set(names.unused), kind


def _broken(tmp_path, kind, edit):
  shutil.copytree(DATA / kind, tmp_path / kind)
  tensors = load_file(str(tmp_path / kind / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / kind / "model.safetensors"))
  return tmp_path / kind


def test_missing_extra_misshaped_and_untied_tensors_are_named(tmp_path):
  def edit(t):
    del t["qa_outputs.dense_output.bias"]
    t["qa_outputs.extra"] = np.zeros(3, np.float32)
    t["realm.pooler.dense.weight"] = np.zeros((4, 4), np.float32)
    t["cls.predictions.decoder.bias"] = t["cls.predictions.decoder.bias"] + 1

  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_realm(_broken(tmp_path, "reader", edit))
  assert "cls.predictions.decoder.bias" in str(e.value)  # checked first: a tied copy that differs
  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_realm(_broken(tmp_path / "again", "reader", lambda t: (edit(t), t.pop("cls.predictions.decoder.bias"))))
  message = str(e.value)
  for fragment in ("missing tensor 'qa_outputs.dense_output.bias'", "unexpected tensor 'qa_outputs.extra'",
                   "'realm.pooler.dense.weight' has shape (4, 4)"):
    assert fragment in message


def test_untied_mlm_output_layer_is_refused(tmp_path):
  def untie(t):
    t["cls.predictions.decoder.weight"] = t["cls.predictions.decoder.weight"] * 2

  with pytest.raises(CheckpointMismatchError, match="cls.predictions.decoder.weight.*realm.embeddings.word_embed"):
    load_hf_realm(_broken(tmp_path, "encoder", untie))


def test_missing_files_and_unknown_kinds_are_reported(tmp_path):
  shutil.copytree(DATA / "reader", tmp_path / "r")
  (tmp_path / "r" / "model.safetensors").rename(tmp_path / "r" / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="convert_pytorch_bin"):
    load_hf_realm(tmp_path / "r")
  config = json.loads((DATA / "reader" / "config.json").read_text()) | {"architectures": ["BertModel"]}
  (tmp_path / "r" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="names no REALM class"):
    load_hf_realm(tmp_path / "r")
  del config["hidden_size"]
  (tmp_path / "r" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json: config lacks \['hidden_size'\]"):
    load_hf_realm(tmp_path / "r", kind="reader")


def test_convert_launcher_round_trip_is_bit_identical(tmp_path):
  import subprocess
  import sys

  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  run = lambda *args: subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), *args], cwd=REPO,  # noqa: E731
                                     env=env, capture_output=True, text=True, timeout=300)
  to_jax = run("--to=jax", f"--hf_dir={DATA / 'scorer'}", f"--params={tmp_path / 'scorer.safetensors'}")
  assert to_jax.returncode == 0, to_jax.stderr[-2000:]
  assert "params/query_tower/projection/kernel" in load_file(str(tmp_path / "scorer.safetensors"))
  to_hf = run("--to=hf", f"--params={tmp_path / 'scorer.safetensors'}", f"--hf_dir={tmp_path / 'hf'}")
  assert to_hf.returncode == 0, to_hf.stderr[-2000:]
  assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (DATA / "scorer" / "model.safetensors").read_bytes()


def test_exports_never_replace_what_the_tool_did_not_write(ckpt, tmp_path):
  from realm_jax.checkpoints.hf_realm import save_params_file

  c = ckpt["scorer"]
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(InputError, match="is not an HF REALM export"):
    save_hf_realm(foreign, "scorer", c.architecture, c.params, c.passthrough, c.hf_config, overwrite=True)
  assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
  export = save_hf_realm(tmp_path / "hf", "scorer", c.architecture, c.params, c.passthrough, c.hf_config)
  with pytest.raises(InputError, match="pass --overwrite"):
    save_hf_realm(export, "scorer", c.architecture, c.params, c.passthrough, c.hf_config)
  save_hf_realm(export, "scorer", c.architecture, c.params, c.passthrough, c.hf_config, overwrite=True)
  assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]  # no temporary left
  (tmp_path / "other.safetensors").write_bytes((DATA / "scorer" / "model.safetensors").read_bytes())
  with pytest.raises(InputError, match="pass --overwrite"):
    save_params_file(tmp_path / "other.safetensors", c)
  with pytest.raises(InputError, match="not a realm-jax REALM parameter file"):
    save_params_file(tmp_path / "other.safetensors", c, overwrite=True)  # an HF file is not ours to replace
  assert (tmp_path / "other.safetensors").read_bytes() == (DATA / "scorer" / "model.safetensors").read_bytes()


def _same(a, b):
  fa, fb = _flatten(a), _flatten(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def spec(model_dir):
  return f"{SPEC_PREFIX}{model_dir}"


def test_init_specs_load_released_checkpoints(ckpt):
  bert = ckpt["scorer"].architecture.bert
  assert _same(load_hf_realm_retriever(spec(DATA / "scorer"), bert, 16), ckpt["scorer"].params)
  assert _same(load_hf_realm_encoder(spec(DATA / "encoder"), bert), ckpt["encoder"].params)
  assert _same(load_hf_realm_reader(spec(DATA / "reader"), bert, 16, 10), ckpt["reader"].params)
  from_realm = load_hf_realm_reader(spec(DATA / "encoder"), bert, 16, 10)  # ORQA: BERT from REALM
  assert _same(from_realm, {"encoder": ckpt["encoder"].params["reader"]})


def test_an_openqa_checkpoint_gives_its_retriever_reader_and_bert(ckpt, tmp_path):
  arch, bert = ckpt["scorer"].architecture, ckpt["scorer"].architecture.bert
  save_hf_realm(tmp_path, "openqa", arch, {"retriever": ckpt["scorer"].params, "reader": ckpt["reader"].params})
  assert _same(load_hf_realm_retriever(spec(tmp_path), bert, 16), ckpt["scorer"].params)
  assert _same(load_hf_realm_reader(spec(tmp_path), bert, 16, 10), ckpt["reader"].params)
  assert _same(load_hf_realm_bert(spec(tmp_path), bert), ckpt["reader"].params["encoder"])


def test_bert_weights_of_any_realm_checkpoint_serve_where_bert_is_expected(ckpt):
  bert = ckpt["scorer"].architecture.bert
  assert _same(load_hf_realm_bert(spec(DATA / "encoder"), bert), ckpt["encoder"].params["reader"])
  assert _same(load_hf_realm_bert(spec(DATA / "reader"), bert), ckpt["reader"].params["encoder"])
  assert _same(load_hf_realm_bert(spec(DATA / "scorer"), bert), ckpt["scorer"].params["query_tower"]["encoder"])


def test_every_class_has_its_bert_where_the_table_says(ckpt):
  for kind, cls in HF_CLASSES.items():
    shapes = expected_shapes(kind, ckpt["scorer"].architecture)
    assert any(path[:len(cls.bert)] == cls.bert for path in shapes), kind
    assert cls.bert + ("embeddings", "word_embeddings", "embedding") in shapes, kind


def test_init_specs_refuse_other_architectures_and_kinds(ckpt):
  bert = ckpt["scorer"].architecture.bert
  with pytest.raises(InputError, match=r"scorer/config.json: architecture differs .*hidden_act=\('gelu', 'gelu_new'\)"):
    load_hf_realm_retriever(spec(DATA / "scorer"), dataclasses.replace(bert, hidden_act="gelu"), 16)
  with pytest.raises(InputError, match="RealmReader checkpoint cannot initialise the retriever"):
    load_hf_realm_retriever(spec(DATA / "reader"), bert, 16)
  with pytest.raises(InputError, match="RealmScorer checkpoint cannot initialise the knowledge-augmented encoder"):
    load_hf_realm_encoder(spec(DATA / "scorer"), bert)
  with pytest.raises(InputError, match="retriever_proj_size 16 != 128"):
    load_hf_realm_retriever(spec(DATA / "scorer"), bert, 128)


def test_init_specs_take_what_no_forward_pass_reads_from_gin(ckpt, caplog):
  bert = dataclasses.replace(ckpt["scorer"].architecture.bert, initializer_range=0.05, dtype="bfloat16",
                             hidden_dropout=0.0, remat=True)
  with caplog.at_level(logging.WARNING):
    assert _same(load_hf_realm_retriever(spec(DATA / "scorer"), bert, 16), ckpt["scorer"].params)
  assert "initializer_range=(0.05, 0.02)" in caplog.text


def test_a_reader_layer_norm_eps_other_than_the_models_is_refused(ckpt, tmp_path):
  bert = ckpt["reader"].architecture.bert
  shutil.copytree(DATA / "reader", tmp_path / "reader")
  config = tmp_path / "reader" / "config.json"
  config.write_text(json.dumps(json.loads(config.read_text()) | {"reader_layer_norm_eps": 1e-5}))
  message = f"{config}: reader_layer_norm_eps 1e-05 != the reader's 0.001; bind "
  with pytest.raises(InputError, match=re.escape(message + "openqa.OpenQaSpec.reader_layer_norm_eps = 1e-05")):
    load_hf_realm_reader(spec(tmp_path / "reader"), bert, 16, 10)
  params = load_hf_realm_reader(spec(tmp_path / "reader"), bert, 16, 10, reader_layer_norm_eps=1e-5)
  assert _same(params, ckpt["reader"].params)
  model = OpenQaModel(bert, bert, 16, span_hidden_size=16, reader_layer_norm_eps=1e-5)
  assert model.bind({"params": {"reader": params}}).reader.layer_norm_eps == 1e-5
  # a RealmKnowledgeAugEncoder gives no span scorer: its reader_layer_norm_eps does not matter
  assert load_hf_realm_reader(spec(DATA / "encoder"), bert, 16, 10, reader_layer_norm_eps=1e-5)


def test_gin_starts_pretraining_from_released_checkpoints():
  import gin

  gin.clear_config()
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings(
        ["gin/models/realm_hf.gin", "gin/runs/realm_pretrain.gin"],
        ["BLOCK_STORE = '/blocks'", "RETRIEVER_INIT = 'hf_realm:/ckpt/realm-cc-news-pretrained-embedder'",
         "READER_INIT = 'hf_realm:/ckpt/realm-cc-news-pretrained-encoder'"])
    config = gin.config_str()
    assert "retriever_init = %RETRIEVER_INIT" in config and "hidden_act = 'gelu_new'" in config
  finally:
    gin.clear_config()


def test_convert_exports_a_training_run_checkpoint(ckpt, tmp_path):
  import subprocess
  import sys

  import optax

  from realm_jax import partitioning
  from realm_jax.objectives.objective import Objective
  from realm_jax.train.trainer import Trainer, TrainerConfig

  class NoData:
    def get_state(self):
      return {}

  c = ckpt["scorer"]
  model = DualEncoder(c.architecture.bert, c.architecture.projection_size)
  seq = {k: np.zeros((1, 8), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
  trainer = Trainer(Objective(lambda rng: model.init(rng, seq, seq)["params"], None), optax.sgd(0.1),
                    partitioning.make_mesh(1, 1, jax.devices()[:1]), tmp_path / "run", TrainerConfig(1))
  trainer.save(trainer.init_state(lambda params: c.params), NoData())
  trainer.checkpoints.wait_until_finished()
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  result = subprocess.run(
      [sys.executable, str(REPO / "launch" / "convert.py"), "--to=hf", f"--workdir={tmp_path / 'run'}", "--subtree=",
       "--kind=scorer", f"--like={DATA / 'scorer'}", f"--hf_dir={tmp_path / 'hf'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (DATA / "scorer" / "model.safetensors").read_bytes()


def test_ask_answers_straight_from_released_checkpoints(ckpt, tmp_path):
  """NUM_STEPS = 0 keeps the imported weights as checkpoint 0 and embeds the frozen index; ask.py reads them."""
  from conftest import DEMO, DEMO_ENTITIES, DEMO_PASSAGES
  from test_launch import run_launcher

  from realm_jax import partitioning
  from realm_jax.eval.predict import load_predictor
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.objectives.openqa import OpenQaSpec

  result = run_launcher("build_blocks.py", f"--passages={DEMO_PASSAGES}", f"--entities={DEMO_ENTITIES}",
                        f"--vocab={DATA / 'vocab.txt'}", f"--out={tmp_path / 'blocks'}", "--max_block_len=64",
                        "--max_title_len=16")
  assert result.returncode == 0, result.stderr[-3000:]
  flags = ["--gin_file=tests/data/realm_reference/model.gin", "--gin_file=gin/runs/openqa.gin",
           f"--gin_bindings=BLOCK_STORE = '{tmp_path / 'blocks'}'", "--gin_bindings=BLOCK_LEN = 64",
           f"--gin_bindings=TRAIN_QUESTIONS = '{DEMO / 'questions' / 'nq_open_dev.jsonl'}'",
           f"--gin_bindings=RETRIEVER_INIT = 'hf_realm:{DATA / 'scorer'}'",
           f"--gin_bindings=READER_INIT = 'hf_realm:{DATA / 'reader'}'", "--gin_bindings=NUM_STEPS = 0",
           f"--gin_bindings=openqa.OpenQaSpec.vocab = '{DATA / 'vocab.txt'}'",
           "--gin_bindings=openqa.OpenQaSpec.span_hidden_size = 16",
           "--gin_bindings=openqa_data.OpenQaDataConfig.query_len = 32",
           "--gin_bindings=openqa_data.OpenQaDataConfig.reader_len = 96",
           "--gin_bindings=openqa_data.OpenQaDataConfig.retrieve_k = 16", f"--workdir={tmp_path / 'qa'}"]
  result = run_launcher("finetune.py", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_launcher("ask.py", *flags, "--question=who was the first president of the united states", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  answer = json.loads(result.stdout.strip().splitlines()[-1])
  assert answer["answer"] and len(answer["blocks"]) == 5 and all(b["title"] for b in answer["blocks"])

  arch = ckpt["scorer"].architecture
  spec = OpenQaSpec(str(tmp_path / "blocks"), RetrieverConfig(arch.bert, 16, block_len=64), arch.bert,
                    span_hidden_size=16, vocab=str(DATA / "vocab.txt"))
  predictor = load_predictor(tmp_path / "qa", spec, partitioning.make_mesh(devices=jax.devices()[:1]))
  assert _same(predictor.params["retriever"]["query_tower"], ckpt["scorer"].params["query_tower"])
  assert _same(predictor.params["reader"], ckpt["reader"].params)
