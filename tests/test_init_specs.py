"""Init specs (`checkpoints.init`): each role takes the kinds its table lists, typed weights go where they say."""

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
    (lambda s: init_lib.load_retriever(s, RetrieverConfig(TINY)), "realm:/run", "retriever"),
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
