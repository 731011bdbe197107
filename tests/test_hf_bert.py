"""The one architecture check of imported checkpoints: what a forward pass reads is refused, the rest logged."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from flax.errors import FlaxError

from realm_jax.checkpoints.hf_bert import INIT_ONLY_FIELDS, RUNTIME_FIELDS, check_architecture
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder

GIN = BertConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
# A checkpoint value for every compared field.
OTHER = dict(vocab_size=96, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             max_position_embeddings=32, type_vocab_size=3, layer_norm_eps=1e-3, initializer_range=0.5,
             hidden_act="gelu_new")


def test_forward_pass_fields_are_refused_in_one_line():
  found = dataclasses.replace(GIN, num_layers=2, hidden_act="gelu_new", initializer_range=0.05)
  with pytest.raises(InputError) as e:
    check_architecture(GIN, found, "ckpt/config.json")
  message = str(e.value)
  assert message.startswith("ckpt/config.json: ") and "\n" not in message
  assert "num_layers=(1, 2)" in message and "hidden_act=('gelu', 'gelu_new')" in message
  assert "initializer_range" not in message


def test_init_only_fields_are_logged_and_runtime_fields_not_compared(caplog):
  with caplog.at_level(logging.WARNING):
    check_architecture(GIN, dataclasses.replace(GIN, initializer_range=0.05), "ckpt/config.json")
  assert "ckpt/config.json" in caplog.text and "initializer_range=(0.02, 0.05)" in caplog.text
  caplog.clear()
  runtime = dict(dtype="bfloat16", remat=True, hidden_dropout=0.0, attention_dropout=0.0, pooling="mean")
  assert set(runtime) == set(RUNTIME_FIELDS)
  with caplog.at_level(logging.WARNING):
    check_architecture(GIN, dataclasses.replace(GIN, **runtime), "ckpt/config.json")
  assert not caplog.records


def test_refused_fields_are_exactly_those_the_forward_pass_reads():
  assert set(OTHER) == {f.name for f in dataclasses.fields(BertConfig)} - set(RUNTIME_FIELDS)
  ids = np.arange(16, dtype=np.int32).reshape(2, 8) % 90
  mask = np.ones_like(ids)
  params = BertEncoder(GIN).init(jax.random.key(0), ids, mask)
  expected = BertEncoder(GIN).apply(params, ids, mask)
  for field, value in OTHER.items():
    try:
      outputs = BertEncoder(dataclasses.replace(GIN, **{field: value})).apply(params, ids, mask)
      same = all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))
    except FlaxError:  # the gin parameters do not fit the checkpoint's shapes
      same = False
    assert same == (field in INIT_ONLY_FIELDS), field
