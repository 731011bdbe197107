"""Init specs (`checkpoints.init`): each role takes the kinds its table lists, typed weights go where they say."""

import jax
import numpy as np
import pytest
from conftest import TINY_BERT as TINY

from realm_jax.checkpoints import init as init_lib
from realm_jax.errors import InputError
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.realm import RealmModel


def test_the_kind_of_a_spec_is_its_prefix_and_a_plain_path_is_a_hf_bert_directory():
  assert [init_lib.kind(s) for s in ("ict:/a", "realm:gs://b/c", "hf_realm:/d", "minilm", "/e/bert")] == [
      init_lib.ICT, init_lib.REALM, init_lib.HF_REALM, init_lib.HF_BERT, init_lib.HF_BERT]


@pytest.mark.parametrize(("load", "spec", "role"), [
    (lambda s: init_lib.load_encoder(s, TINY), "ict:/run", "encoder"),
    (lambda s: init_lib.load_encoder(s, TINY), "realm:/run", "encoder"),
    (lambda s: init_lib.load_realm_reader(s, RealmModel(TINY, TINY)), "ict:/run", "reader"),
    (lambda s: init_lib.load_openqa_reader(s, TINY, 16, 10, 1e-3), "ict:/run", "reader"),
])
def test_a_role_refuses_a_kind_its_table_does_not_list_naming_what_it_takes(load, spec, role):
  with pytest.raises(InputError, match=rf"{role} init '{spec}': not accepted here; use .*HF BERT directory"):
    load(spec)


def test_a_run_directory_without_checkpoints_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train: no ICT checkpoint"):
    init_lib.load_retriever(f"ict:{tmp_path}", RetrieverConfig(TINY))


def test_one_tower_fills_every_tower_and_named_towers_must_be_the_models():
  a, b = {"w": np.ones(2)}, {"w": np.zeros(2)}
  shared = init_lib.TowerWeights({"query_tower": a}).into_retriever({"query_tower": {}, "block_tower": {}})
  assert shared == {"query_tower": a, "block_tower": a}
  both = init_lib.TowerWeights({"query_tower": a, "block_tower": b})
  assert both.into_retriever({"query_tower": {}, "block_tower": {}}) == {"query_tower": a, "block_tower": b}
  with pytest.raises(InputError, match=r"towers \['block_tower', 'query_tower'\], the model has \['query_tower'\]"):
    both.into_retriever({"query_tower": {}})


def test_encoder_weights_replace_only_each_towers_encoder():
  retriever = {"query_tower": {"encoder": "random", "projection": "p"}}
  got = init_lib.EncoderWeights({"layer_0": "bert"}).into_retriever(retriever)
  assert got == {"query_tower": {"encoder": {"layer_0": "bert"}, "projection": "p"}}


@pytest.fixture(scope="module")
def realm_run(demo_store, tmp_path_factory):
  """The workdir of a 2-step REALM run on the demo store (retrieval off: no index to build), TINY towers and
  reader."""
  from realm_jax import partitioning
  from realm_jax.data.realm import RealmDataConfig
  from realm_jax.objectives.realm import RealmSpec
  from realm_jax.train.optimizer import OptimizerConfig
  from realm_jax.train.pretrain import run_pretrain
  from realm_jax.train.trainer import TrainerConfig

  workdir = tmp_path_factory.mktemp("realm_run")
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4)
  spec = RealmSpec(str(demo_store.path), RetrieverConfig(TINY, block_len=48), TINY, data, retrieval=False)
  run_pretrain(str(workdir), partitioning.make_mesh(), spec, TrainerConfig(2, checkpoint_every=2, log_every=2),
               OptimizerConfig(1e-3, 1))
  return workdir


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_a_realm_run_starts_the_retriever_of_pretraining_and_open_qa_and_the_open_qa_reader(demo_store, realm_run):
  from realm_jax.data.realm import RealmDataConfig
  from realm_jax.objectives.openqa import OpenQaSpec
  from realm_jax.objectives.realm import RealmSpec
  from realm_jax.train import finetune, pretrain

  retriever = RetrieverConfig(TINY, block_len=48)
  run, step = init_lib.load_realm_run(realm_run, RealmModel(TINY, TINY), ("retriever", "reader"))
  towers = init_lib.load_retriever(f"realm:{realm_run}", retriever)
  assert step == 2 and isinstance(towers, init_lib.TowerWeights) and set(towers.towers) == {"query_tower"}
  assert _same(towers.towers["query_tower"], run["retriever"]["query_tower"])
  reader = init_lib.load_openqa_reader(f"realm:{realm_run}", TINY, 16, 10, 1e-3)
  assert set(reader) == {"encoder"} and _same(reader["encoder"], run["reader"])
  # REALM pre-training from another run's retriever (here with separate towers: its one tower fills both).
  separate = RetrieverConfig(TINY, block_len=48, share_towers=False)
  spec = RealmSpec(str(demo_store.path), separate, TINY, RealmDataConfig(block_len=48),
                   retriever_init=f"realm:{realm_run}")
  started = pretrain.starting_weights(spec)({"retriever": {"query_tower": 0, "block_tower": 0}, "reader": 0})
  assert started["reader"] == 0
  assert all(_same(started["retriever"][t], run["retriever"]["query_tower"]) for t in ("query_tower", "block_tower"))
  # Table 2's mixed rows in fine-tuning: REALM retriever + baseline reader, baseline retriever + REALM reader.
  for retriever_init, reader_init in ((f"realm:{realm_run}", None), (None, f"realm:{realm_run}")):
    qa = OpenQaSpec(str(demo_store.path), retriever, TINY, retriever_init=retriever_init, reader_init=reader_init)
    pretrained, _ = finetune.starting_weights(qa)
    started = pretrained({"retriever": {"query_tower": 0}, "reader": {"encoder": 0, "span_scorer": 0}})
    if retriever_init:
      assert _same(started["retriever"]["query_tower"], run["retriever"]["query_tower"])
      assert started["reader"] == {"encoder": 0, "span_scorer": 0}
    else:
      assert started["retriever"] == {"query_tower": 0} and started["reader"]["span_scorer"] == 0
      assert _same(started["reader"]["encoder"], run["reader"])


def test_a_realm_retriever_of_another_architecture_is_refused_naming_it(realm_run):
  from conftest import TINY_BERT_H32

  with pytest.raises(InputError, match=r"retriever.json: architecture differs .*hidden_size=\(32, 64\)"):
    init_lib.load_retriever(f"realm:{realm_run}", RetrieverConfig(TINY_BERT_H32, block_len=48))
  with pytest.raises(InputError, match=r"retriever.json: projection_size 128, the retriever's is 16"):
    init_lib.load_retriever(f"realm:{realm_run}", RetrieverConfig(TINY, 16, block_len=48))
  with pytest.raises(FileNotFoundError, match=r"retriever.json: no retriever description"):
    init_lib.load_retriever(f"realm:{realm_run / 'train'}", RetrieverConfig(TINY))


def test_a_pretrained_retriever_searches_its_runs_index_of_its_newest_checkpoint_with_its_query_tower(
    demo_store, realm_run, tmp_path):
  import shutil

  from realm_jax import partitioning
  from realm_jax.data.openqa import OpenQaDataConfig
  from realm_jax.eval.openqa_eval import EvaluationConfig, run_evaluation
  from realm_jax.eval.predict import PretrainedRetriever
  from realm_jax.objectives.openqa import OpenQaSpec
  from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
  from realm_jax.retrieval import index as index_lib
  from realm_jax.retrieval.mips import exact_top_k_numpy

  run_dir = tmp_path / "realm"
  shutil.copytree(realm_run, run_dir)
  retriever = RetrieverConfig(TINY, block_len=48)
  spec = OpenQaSpec(str(demo_store.path), retriever, TINY, OpenQaDataConfig(query_len=16))
  mesh = partitioning.make_mesh()
  with pytest.raises(FileNotFoundError, match=r"index: no index of step 2, the run's newest checkpoint"):
    PretrainedRetriever(run_dir, spec, mesh)
  run, _ = init_lib.load_realm_run(run_dir, RealmModel(TINY, TINY), ("retriever",))
  rows = embed_all_blocks(run["retriever"]["query_tower"], RefreshConfig(retriever, batch_size=64), demo_store, mesh)
  index_lib.publish_index(run_dir / "index", 2, rows, demo_store)
  pretrained = PretrainedRetriever(run_dir, spec, mesh)
  questions = ["who wrote the origin of species", "when did the first moon landing happen", "what is the capital"]
  queries = pretrained.featurizer.queries(questions)
  tower = retriever.tower()
  query_emb = np.asarray(tower.apply({"params": run["retriever"]["query_tower"]}, queries["input_ids"],
                                     queries["input_mask"], queries["segment_ids"], True))
  np.testing.assert_array_equal(pretrained.search(questions, 5), exact_top_k_numpy(rows.embeddings, query_emb, 5)[0])
  with pytest.raises(InputError, match=r"a pre-training run has no span reader; evaluate its retrieval only"):
    run_evaluation(str(tmp_path / "eval"), mesh, spec, EvaluationConfig({}), pretrained_run=str(run_dir))
