"""Index backends: one protocol, looked up by name; publish, load, search and hot swap for every entry; where the
rules table's "docs" entry places the index rows."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning
from realm_jax.errors import InputError
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
