"""BERT encoder: real MiniLM weights reproduce the original PyTorch model; bad checkpoints are named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from realm_jax.checkpoints.hf_bert import CheckpointMismatchError, load_hf_bert
from realm_jax.models.bert import BertConfig, BertEncoder, MlmHead

REFERENCE = REPO / "tests" / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm(minilm_path):
  return load_hf_bert(minilm_path)


@pytest.mark.parametrize("prefix", ["", "pair_"])
def test_minilm_matches_pytorch_reference(minilm, prefix):
  config, params = minilm
  ref = np.load(REFERENCE, allow_pickle=False)
  seq, pooled = BertEncoder(config).apply(
      {"params": params}, ref[prefix + "input_ids"], ref[prefix + "attention_mask"],
      ref[prefix + "token_type_ids"],
  )
  mask = ref[prefix + "attention_mask"].astype(bool)
  seq_diff = np.abs(np.asarray(seq) - ref[prefix + "last_hidden_state"])[mask].max()
  pooled_diff = np.abs(np.asarray(pooled) - ref[prefix + "pooler_output"]).max()
  assert seq_diff <= 1e-4, seq_diff
  assert pooled_diff <= 1e-4, pooled_diff


def test_reference_was_made_from_the_installed_weights(minilm_path):
  import hashlib

  meta = json.loads(REFERENCE.with_suffix(".json").read_text())
  digest = hashlib.sha256((minilm_path / "model.safetensors").read_bytes()).hexdigest()
  assert digest == meta["model"]["model_safetensors_sha256"]


def test_bf16_compute_stays_close_to_f32(minilm):
  config, params = minilm
  ref = np.load(REFERENCE, allow_pickle=False)
  bf16 = BertConfig(**{**config.__dict__, "dtype": "bfloat16"})
  _, pooled = BertEncoder(bf16).apply({"params": params}, ref["input_ids"], ref["attention_mask"])
  assert pooled.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(pooled, np.float32), ref["pooler_output"], atol=0.05)


def test_padding_does_not_change_real_positions():
  config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
  ids = jnp.array([[5, 6, 7, 0, 0]])
  params = BertEncoder(config).init(jax.random.key(0), ids, ids > 0)["params"]
  short, _ = BertEncoder(config).apply({"params": params}, ids[:, :3], ids[:, :3] > 0)
  long, _ = BertEncoder(config).apply({"params": params}, ids, ids > 0)
  np.testing.assert_allclose(short, long[:, :3], atol=1e-5)


def test_mlm_head_ties_output_to_word_embeddings():
  config = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
  table = jax.random.normal(jax.random.key(1), (50, 16))
  hidden = jax.random.normal(jax.random.key(2), (3, 16))
  head = MlmHead(config)
  params = head.init(jax.random.key(0), hidden, table)
  logits = head.apply(params, hidden, table)
  assert logits.shape == (3, 50)
  logits2 = head.apply(params, hidden, table.at[7].set(0.0))
  changed = np.flatnonzero(np.abs(np.asarray(logits - logits2)).max(axis=0) > 0)
  assert changed.tolist() == [7]


def _copy_checkpoint(src, dst, edit):
  dst.mkdir()
  (dst / "config.json").write_bytes((src / "config.json").read_bytes())
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"))


def test_missing_extra_and_misshaped_tensors_are_named(minilm_path, tmp_path):
  def edit(t):
    del t["encoder.layer.3.output.dense.bias"]
    t["encoder.layer.1.intermediate.dense.weight"] = t["encoder.layer.1.intermediate.dense.weight"][:10]
    t["encoder.layer.9.output.dense.bias"] = np.zeros(3, np.float32)

  _copy_checkpoint(minilm_path, tmp_path / "bad", edit)
  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_bert(tmp_path / "bad")
  message = str(e.value)
  assert "missing tensor 'encoder.layer.3.output.dense.bias'" in message
  assert "'encoder.layer.1.intermediate.dense.weight' has shape (10, 384)" in message
  assert "unexpected tensor 'encoder.layer.9.output.dense.bias'" in message


def test_missing_or_corrupt_weight_files_are_reported(minilm_path, tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_hf_bert(tmp_path)
  (tmp_path / "config.json").write_bytes((minilm_path / "config.json").read_bytes())
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match="unreadable safetensors"):
    load_hf_bert(tmp_path)
