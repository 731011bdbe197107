"""Index backends: one protocol, looked up by name; publish, load, search and hot swap for every entry; where the
rules table's "docs" entry places the index rows."""

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_BERT
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning, storage
from realm_jax.data.realm import RealmDataConfig
from realm_jax.errors import InputError
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.realm import RealmSpec
from realm_jax.refresh.refresher import RefreshJob, run_refresh
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.backends import BACKENDS, get_backend
from realm_jax.retrieval.mips import (
  ExactSearcher,
  ScannConfig,
  ScannSearcher,
  SearchConfig,
  exact_top_k_numpy,
  index_axes,
)
from realm_jax.train.live_index import LiveIndexConfig
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.pretrain import run_pretrain
from realm_jax.train.trainer import TrainerConfig

SMALL_SCANN = ScannConfig(num_leaves=16, num_leaves_to_search=16, reorder=100)


def _config(name: str) -> SearchConfig:
  return SearchConfig(backend=name, chunk_rows=64, scann=SMALL_SCANN)


def _rows(store, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(store.num_blocks, 16)).astype(np.float32)


def _recall(ids: np.ndarray, want: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(ids, want, strict=True)]))


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_publishes_loads_searches_and_swaps_without_recompiling(name, demo_store, tmp_path):
  backend = get_backend(_config(name))
  assert backend.name == name
  first, second = _rows(demo_store, 1), _rows(demo_store, 2)
  index_lib.publish_index(tmp_path, 10, first, demo_store, backend)
  commit = index_lib.read_commit(tmp_path, 10, demo_store)
  assets = sorted(f for f in commit["files"] if "/" in f)
  assert commit["backend"] == name and bool(assets) == backend.writes_assets
  assert all(f.startswith("scann/") for f in assets)
  live = index_lib.LiveIndex(partitioning.make_mesh(), _config(name))
  poller = live.poller(tmp_path, demo_store)
  assert poller.load_newest()
  poller.maybe_swap(10)
  queries = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  ids, scores = live.searcher.search(queries, 10)
  want, _ = exact_top_k_numpy(first, queries, 10)
  assert ids.shape == scores.shape == (8, 10) and (np.diff(scores, axis=1) <= 1e-5).all()
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ first.T, ids.astype(np.int64), 1), rtol=1e-4,
                             atol=1e-4)
  assert _recall(ids, want) >= (1.0 if name == "exact" else 0.8)
  loaded = live.searcher
  index_lib.publish_index(tmp_path, 20, second, demo_store, backend)
  assert poller.load_newest()
  assert live.searcher is loaded  # prepared off the training thread; swapped in only between steps
  poller.maybe_swap(20)
  assert live.searcher is not loaded and poller.index_step == 20
  ids, _ = live.searcher.search(queries, 10)
  assert _recall(ids, exact_top_k_numpy(second, queries, 10)[0]) >= (1.0 if name == "exact" else 0.8)
  if isinstance(loaded, ExactSearcher):  # the swapped-in searcher runs the first one's compiled search
    assert live.searcher._search_fn(10) is loaded._search_fn(10) and loaded._search_fn(10)._cache_size() == 1


def test_an_unknown_backend_name_is_refused_naming_the_known_ones():
  known = "'exact', 'approx_max_k', 'scann'"
  with pytest.raises(InputError, match=f"^unknown index backend 'faiss'; the backends are {known}$"):
    get_backend(SearchConfig(backend="faiss"))
  with pytest.raises(InputError, match="unknown index backend 'faiss'"):
    index_lib.LiveIndex(partitioning.make_mesh(), SearchConfig(backend="faiss"))


def test_scann_refuses_a_commit_without_scann_assets_and_the_device_backends_search_any(demo_store, tmp_path):
  rows = _rows(demo_store, 3)
  index_lib.publish_index(tmp_path / "exact", 10, rows, demo_store)
  index_lib.publish_index(tmp_path / "scann", 10, rows, demo_store, get_backend(_config("scann")))
  mesh = partitioning.make_mesh()
  scann = index_lib.LiveIndex(mesh, _config("scann"))
  why = (r"exact/commits/10\.json: published with backend 'exact', without scann assets; searching with backend "
         r"'scann' needs indexes published with it \(mips.SearchConfig.backend, the refresh job's too\)")
  with pytest.raises(InputError, match=why):
    scann.poller(tmp_path / "exact", demo_store).load_newest()
  # In the poller's thread it is an error that stops the run (not a rejected index to wait past), with the reason.
  poller = scann.poller(tmp_path / "exact", demo_store, poll_seconds=0.05, max_failures=1).start()
  with pytest.raises(index_lib.IndexReadError, match=why):
    poller.wait_for_first(timeout=30)
  poller.close()
  queries = rows[:4] + 0.01
  for name in ("exact", "approx_max_k"):
    live = index_lib.LiveIndex(mesh, _config(name))
    poller = live.poller(tmp_path / "scann", demo_store)
    assert poller.load_newest()
    poller.maybe_swap(10)
    np.testing.assert_array_equal(live.searcher.search(queries, 5)[0], exact_top_k_numpy(rows, queries, 5)[0])


def _rules(docs):
  return tuple((name, docs if name == "docs" else axes) for name, axes in partitioning.LOGICAL_AXIS_RULES)


@pytest.mark.parametrize("docs, spec, shards", [
    (("data", "model"), P(("data", "model"), None), 8),  # the default table: every device, as before
    (("data",), P(("data",), None), 4),
    ("model", P(("model",), None), 2),
    (None, P(None, None), 1),
])
def test_the_docs_rule_places_the_index_rows(docs, spec, shards):
  mesh = partitioning.make_mesh(4, 2, jax.devices()[:8])
  rules = _rules(docs)
  rng = np.random.default_rng(4)
  embeddings = rng.normal(size=(1001, 16)).astype(np.float32)
  queries = rng.normal(size=(5, 16)).astype(np.float32)
  searcher = ExactSearcher(embeddings, mesh, SearchConfig(chunk_rows=16), rules)
  assert searcher.embeddings.sharding.spec == spec and searcher.shards == shards
  assert searcher.embeddings.shape == (searcher.rows_per_shard * shards, 16)
  slices = {}
  for shard in searcher.embeddings.addressable_shards:
    start, stop, _ = shard.index[0].indices(searcher.embeddings.shape[0])
    assert stop - start == searcher.rows_per_shard
    slices.setdefault((start, stop), []).append(shard.device)
  assert len(slices) == shards and all(len(devices) == 8 // shards for devices in slices.values())
  for rows, each in [(embeddings, searcher), (embeddings[::-1].copy(), searcher.with_index(embeddings[::-1].copy()))]:
    ids, scores = each.search(queries, 10)
    want_ids, want_scores = exact_top_k_numpy(rows, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  approx = ExactSearcher(embeddings, mesh, SearchConfig(backend="approx_max_k"), rules)
  np.testing.assert_array_equal(approx.search(queries, 10)[0], exact_top_k_numpy(embeddings, queries, 10)[0])
  live = index_lib.LiveIndex(mesh, rules=rules)
  live.install({}, live.prepare({"backend": "exact"}, embeddings, None))
  assert live.searcher.embeddings.sharding.spec == spec


def test_a_rules_table_without_docs_or_naming_missing_mesh_axes_is_refused():
  mesh = partitioning.make_mesh()
  without = tuple(rule for rule in partitioning.LOGICAL_AXIS_RULES if rule[0] != "docs")
  with pytest.raises(InputError, match="have no 'docs' entry"):
    index_axes(mesh, without)
  with pytest.raises(InputError, match=r"rule 'docs' -> \('data', 'expert'\) names mesh axes \['expert'\]"):
    index_axes(mesh, _rules(("data", "expert")))
  assert index_axes(mesh) == ("data", "model") == tuple(mesh.axis_names)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_frozen_index_is_searched_by_the_backend_the_spec_names(name, demo_store, tmp_path):
  rows = _rows(demo_store, 4)
  index_lib.publish_index(tmp_path, 0, rows, demo_store, get_backend(_config(name)))
  embeddings, searcher = index_lib.load_searcher(tmp_path, 0, demo_store, partitioning.make_mesh(), _config(name))
  np.testing.assert_array_equal(embeddings, rows)
  assert isinstance(searcher, ScannSearcher if name == "scann" else ExactSearcher)
  queries = rows[:4] * 10
  assert _recall(searcher.search(queries, 5)[0], exact_top_k_numpy(rows, queries, 5)[0]) >= 0.8


@pytest.mark.slow  # a REALM run beside a ScaNN-publishing refresher: minutes on 2 cores
def test_a_realm_run_hot_swaps_to_and_searches_the_scann_index_its_refresher_publishes(demo_store, tmp_path,
                                                                                     monkeypatch):
  # Coarse on purpose (2 of 50 leaves, no reordering): its top-k differs from the exact one, so an exact search
  # cannot pass for it.
  search = SearchConfig(backend="scann", scann=ScannConfig(50, 2, training_sample_size=4000, reorder=0))
  installs, loads, scann_searches, exact_searches = [], [], [], []
  install, load, scann_search = index_lib.LiveIndex.install, ScannSearcher.load.__func__, ScannSearcher.search
  exact_search = ExactSearcher.search

  def recording_install(self, commit, prepared):
    installs.append((commit, prepared))
    install(self, commit, prepared)

  def recording_load(cls, directory, num_blocks):
    searcher = load(cls, directory, num_blocks)
    loads.append((searcher, {f"scann/{f.name}": storage.sha256(f.read_bytes()) for f in Path(directory).iterdir()}))
    return searcher

  def recording_search(self, queries, k):
    ids, scores = scann_search(self, queries, k)
    scann_searches.append((self, np.array(queries), k, ids))
    return ids, scores

  monkeypatch.setattr(index_lib.LiveIndex, "install", recording_install)
  monkeypatch.setattr(ScannSearcher, "load", classmethod(recording_load))
  monkeypatch.setattr(ScannSearcher, "search", recording_search)
  monkeypatch.setattr(ExactSearcher, "search",
                      lambda self, queries, k: exact_searches.append(k) or exact_search(self, queries, k))
  mesh, refreshed, failed = partitioning.make_mesh(), [], []

  def refresh_job():  # the refresh job beside the trainer, publishing with backend "scann"
    try:
      refreshed.extend(run_refresh(str(tmp_path), str(demo_store.path), mesh, RefreshJob(
          batch_size=512, search=search, keep=10, abandon_check_seconds=0.5), poll_seconds=0.1))
    except Exception as e:  # noqa: BLE001 - reported by the assertion below
      failed.append(e)

  refresher = threading.Thread(target=refresh_job)
  refresher.start()
  data = RealmDataConfig(batch_size=8, query_len=32, block_len=48, joint_len=80, num_candidates=4)
  spec = RealmSpec(str(demo_store.path), RetrieverConfig(TINY_BERT, block_len=48), TINY_BERT, data)
  # max_staleness 3: step 4 waits for an index of step >= 1, which only the refresher publishes.
  history = run_pretrain(str(tmp_path), mesh, spec, TrainerConfig(6, checkpoint_every=2, log_every=1),
                         OptimizerConfig(1e-3, 1),
                         LiveIndexConfig(search=search, poll_seconds=0.1, max_staleness=3, wait_seconds=120))
  refresher.join(timeout=300)
  assert not failed and refreshed, failed
  assert installs[0][0]["writer"] == "bootstrap" and installs[0][0]["train_step"] == 0
  swapped = [(commit, searcher) for commit, searcher in installs if commit["writer"] == "refresher"]
  assert swapped, "the run never swapped in an index of the refresher"
  commit, searcher = swapped[0]
  assert commit["backend"] == "scann" and commit["train_step"] in refreshed and commit["train_step"] > 0
  assert history[-1]["index_step"] >= commit["train_step"] and not exact_searches
  # What the run installed is the searcher loaded from that commit's published ScaNN assets, byte for byte.
  published = {name: entry["sha256"] for name, entry in commit["files"].items() if name.startswith("scann/")}
  assert published and [digests for loaded, digests in loads if loaded is searcher] == [published]
  # The run searched with it, and got what the published index returns for the same queries, not exact top-k.
  used = [(queries, k, ids) for used_by, queries, k, ids in scann_searches if used_by is searcher]
  assert used
  index_dir = tmp_path / "index"
  again = ScannSearcher.load(index_dir / commit["data"] / "scann", demo_store.num_blocks)
  _, rows = index_lib.load_index(index_dir, commit["train_step"], demo_store)
  differs_from_exact = False
  for queries, k, ids in used:
    np.testing.assert_array_equal(ids, scann_search(again, queries, k)[0])
    differs_from_exact |= not np.array_equal(ids, exact_top_k_numpy(np.asarray(rows), queries, k)[0])
  assert differs_from_exact
