"""Exact sharded search as a running top-k over row chunks, approx_max_k, and how the trainer picks one from gin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from realm_jax import partitioning
from realm_jax.errors import InputError
from realm_jax.retrieval import backends
from realm_jax.retrieval.mips import ExactSearcher, SearchConfig, exact_top_k_numpy, release_mapped_rows, shard_layout

UNCHUNKED = SearchConfig(chunk_rows=1 << 20)  # one chunk per device: the whole shard's scores at once


def _mesh(data: int, model: int):
  return partitioning.make_mesh(data, model, jax.devices()[: data * model])


def _integer_rows(rng, n: int, dim: int, values: int) -> np.ndarray:
  """Rows of small integers: inner products are exact in float32 and many are equal."""
  return rng.integers(-values, values + 1, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("num_blocks, k, chunk_rows, data, model", [
    (1001, 10, 16, 8, 1),  # 126 rows a device: 8 chunks of 16, N neither a multiple of the chunk nor of 8 devices
    (1001, 40, 16, 4, 2),  # k > chunk
    (1001, 7, 24, 1, 1),  # one device, 42 chunks of 24 rows
    (37, 5, 8, 8, 1),  # 5 rows a device: the last three devices hold padding only
    (300, 38, 8, 8, 1),  # 40 rows a device, 5 chunks
    (300, 40, 8, 8, 1),  # k = the rows a device holds
    (300, 100, 8, 8, 1),  # k > the rows a device holds
])
def test_chunked_exact_search_equals_brute_force(num_blocks, k, chunk_rows, data, model):
  rng = np.random.default_rng(num_blocks + k)
  embeddings = rng.normal(size=(num_blocks, 32)).astype(np.float32)
  queries = rng.normal(size=(6, 32)).astype(np.float32)
  searcher = ExactSearcher(embeddings, _mesh(data, model), SearchConfig(chunk_rows=chunk_rows))
  ids, scores = searcher.search(queries, k)
  want_ids, want_scores = exact_top_k_numpy(embeddings, queries, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


@pytest.mark.parametrize("num_blocks, k, chunk_rows", [(203, 203, 8), (203, 30, 8), (1000, 125, 32), (64, 9, 8)])
def test_equal_scores_keep_the_lowest_block_id_as_the_unchunked_search_does(num_blocks, k, chunk_rows):
  rng = np.random.default_rng(k)
  embeddings = _integer_rows(rng, num_blocks, 4, 1)  # 81 distinct rows at most: every score is shared
  queries = _integer_rows(rng, 5, 4, 1)
  mesh = partitioning.make_mesh()
  ids, scores = ExactSearcher(embeddings, mesh, SearchConfig(chunk_rows=chunk_rows)).search(queries, k)
  want_ids, want_scores = exact_top_k_numpy(embeddings, queries, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)
  unchunked_ids, unchunked_scores = ExactSearcher(embeddings, mesh, UNCHUNKED).search(queries, k)
  np.testing.assert_array_equal(ids, unchunked_ids)
  np.testing.assert_array_equal(scores, unchunked_scores)
  assert (np.diff(scores, axis=1) <= 0).all()
  assert all((np.diff(row_ids[row_scores == s]) > 0).all() for row_ids, row_scores in zip(ids, scores, strict=True)
             for s in np.unique(row_scores))


def test_identical_rows_come_back_in_id_order():
  embeddings = np.ones((90, 8), np.float32)
  ids, scores = ExactSearcher(embeddings, partitioning.make_mesh(), SearchConfig(chunk_rows=8)).search(
      np.ones((2, 8), np.float32), 20)
  np.testing.assert_array_equal(ids, np.tile(np.arange(20), (2, 1)))
  np.testing.assert_array_equal(scores, np.full((2, 20), 8.0))
  np.testing.assert_array_equal(exact_top_k_numpy(embeddings, np.ones((2, 8), np.float32), 20)[0], ids)


def test_approximate_search_returns_valid_distinct_ids_with_recall_near_exact():
  rng = np.random.default_rng(3)
  embeddings = rng.normal(size=(3001, 32)).astype(np.float32)
  queries = rng.normal(size=(16, 32)).astype(np.float32)
  searcher = ExactSearcher(embeddings, partitioning.make_mesh(), SearchConfig(backend="approx_max_k",
                                                                              recall_target=0.9))
  ids, scores = searcher.search(queries, 10)
  assert ids.shape == (16, 10) and ((ids >= 0) & (ids < 3001)).all()
  assert all(len(set(row)) == 10 for row in ids)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ embeddings.T, ids, 1), rtol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()
  want, _ = exact_top_k_numpy(embeddings, queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want, strict=True)])
  assert recall >= 0.9  # on CPU approx_max_k falls back to an exact top-k: recall 1


@pytest.mark.parametrize("config", [SearchConfig(chunk_rows=16), SearchConfig(backend="approx_max_k")],
                         ids=["chunked", "approximate"])
def test_swapping_embeddings_reuses_the_compiled_search(config):
  rng = np.random.default_rng(1)
  old = rng.normal(size=(500, 16)).astype(np.float32)
  first = ExactSearcher(old, partitioning.make_mesh(), config)
  queries = rng.normal(size=(3, 16)).astype(np.float32)
  first.search(queries, 5)
  new = rng.normal(size=(500, 16)).astype(np.float32)
  searcher = first.with_index(new)
  ids, _ = searcher.search(queries, 5)
  np.testing.assert_array_equal(ids, exact_top_k_numpy(new, queries, 5)[0])
  assert searcher._search_fn(5)._cache_size() == 1 and searcher._search_fn(5) is first._search_fn(5)
  np.testing.assert_array_equal(first.search(queries, 5)[0], exact_top_k_numpy(old, queries, 5)[0])  # unchanged
  with pytest.raises(ValueError, match="cannot hot-swap"):
    searcher.with_index(new[:10])


def test_each_device_is_padded_to_whole_chunks_of_at_most_chunk_rows():
  assert shard_layout(13_353_718, 64, 65536) == (208_672, 52_168)  # 4 chunks; 20 rows of padding per device
  assert shard_layout(1001, 8, 16) == (128, 16)
  assert shard_layout(1001, 8, 1 << 20) == (128, 128)
  for n, devices, chunk_rows in [(1, 8, 8), (13_353_718, 8, 32768), (999, 3, 40)]:
    rows, chunk = shard_layout(n, devices, chunk_rows)
    assert rows * devices >= n and rows % chunk == 0 and chunk % 8 == 0 and chunk <= chunk_rows
    assert rows - chunk < -(-n // devices)  # no whole chunk of padding


@pytest.mark.parametrize("bad, message", [
    ({"chunk_rows": 12}, "chunk_rows: 12 is not a positive multiple of 8"),
    ({"chunk_rows": 0}, "chunk_rows: 0 is not"),
    ({"recall_target": 0.0}, r"recall_target: 0.0 is not in \(0, 1\]"),
])
def test_bad_search_configs_are_refused(bad, message):
  with pytest.raises(InputError, match=message):
    SearchConfig(**bad)


def test_the_trainer_searches_a_bfloat16_index_with_approx_max_k_from_gin(demo_store, tmp_path, monkeypatch):
  import gin

  from realm_jax.data.realm import most_blocks_per_uid
  from realm_jax.train import pretrain

  built = []

  class Recorded(ExactSearcher):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      built.append(self)

  monkeypatch.setattr(backends, "ExactSearcher", Recorded)
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings(["gin/models/tiny.gin", "gin/runs/realm_pretrain.gin"], [
        f"BLOCK_STORE = '{demo_store.path}'", "NUM_STEPS = 2", "BATCH_SIZE = 8", "BLOCK_LEN = 32",
        "bert.BertConfig.hidden_size = 64", "bert.BertConfig.num_layers = 1", "bert.BertConfig.intermediate_size = 128",
        "realm_data.RealmDataConfig.query_len = 16", "realm_data.RealmDataConfig.joint_len = 48",
        "realm_data.RealmDataConfig.num_candidates = 3", "trainer.TrainerConfig.log_every = 1",
        "trainer.TrainerConfig.checkpoint_every = 2", "mips.SearchConfig.backend = 'approx_max_k'",
        "mips.SearchConfig.recall_target = 0.9", "mips.SearchConfig.storage_dtype = 'bfloat16'",
    ])
    history = gin.get_configurable(pretrain.run_pretrain)(workdir=str(tmp_path), mesh=partitioning.make_mesh())
  finally:
    gin.clear_config()
  assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
  assert len(built) == 1 and built[0].config == SearchConfig(backend="approx_max_k", recall_target=0.9,
                                                             storage_dtype="bfloat16")
  assert built[0].embeddings.dtype == jnp.bfloat16
  # The trainer's searches went through it: 2 retrieved slots (and the null block) + the copies of a query's text.
  assert list(built[0]._compiled) == [2 + most_blocks_per_uid(demo_store.arrays["uids"])]


def test_a_bfloat16_index_finds_nearly_the_float32_neighbours_and_swaps_without_recompiling():
  mesh = partitioning.make_mesh()
  rng = np.random.default_rng(3)
  embeddings = rng.standard_normal((5000, 32)).astype(np.float32)
  queries = rng.standard_normal((16, 32)).astype(np.float32)
  searcher = ExactSearcher(embeddings, mesh, SearchConfig(storage_dtype="bfloat16", chunk_rows=256))
  assert searcher.embeddings.dtype == jnp.bfloat16
  assert searcher.embeddings.nbytes == 2 * searcher.rows_per_shard * mesh.size * 32
  ids, _ = searcher.search(queries, 10)
  exact, _ = exact_top_k_numpy(embeddings, queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
  assert recall >= 0.9, recall
  compiled = searcher._search_fn(10)
  swapped = searcher.with_index(embeddings[::-1].copy())
  assert swapped._search_fn(10) is compiled and swapped.embeddings.dtype == jnp.bfloat16


def _resident_file_bytes() -> int:
  """This process's resident file-backed pages (RssFile of /proc/self/status), in bytes."""
  for line in open("/proc/self/status"):
    if line.startswith("RssFile:"):
      return int(line.split()[1]) * 1024
  raise AssertionError("no RssFile in /proc/self/status")


def test_placing_a_memory_mapped_index_releases_each_slice_it_has_read(tmp_path):
  rows = np.random.default_rng(0).standard_normal((65536, 128), np.float32)  # 32 MiB
  np.save(tmp_path / "rows.npy", rows)
  mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")
  before = _resident_file_bytes()
  np.asarray(mapped[:32768]).sum()  # read half: its pages become this process's resident memory
  assert _resident_file_bytes() - before > 12 << 20
  release_mapped_rows(mapped, 0, 32768)
  assert _resident_file_bytes() - before < 2 << 20
  searcher = ExactSearcher(mapped, partitioning.make_mesh(8, 1))
  assert _resident_file_bytes() - before < 6 << 20  # at most about one device's slice (4 MiB) stays mapped
  np.testing.assert_array_equal(np.asarray(searcher.embeddings)[: len(rows)], rows)


@pytest.mark.parametrize("run_gin, job", [
    ("gin/runs/refresh.gin", "refresher.RefreshJob"),
    ("gin/runs/realm_pretrain.gin", "live_index.LiveIndexConfig"),
    ("gin/runs/openqa.gin", "openqa.OpenQaSpec"),
])
def test_gin_search_scann_orqa_gives_every_job_orqas_scann_settings(run_gin, job):
  import gin

  from realm_jax.retrieval.mips import ORQA_SCANN

  gin.clear_config()
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings(["gin/models/tiny.gin", run_gin, "gin/search/scann_orqa.gin"], [
        "BLOCK_STORE = 'unused'", "TRAIN_QUESTIONS = 'unused'"])
    configured = gin.get_configurable(job)()
  finally:
    gin.clear_config()
  assert configured.search == SearchConfig(backend="scann", scann=ORQA_SCANN)
  # ORQA's orqa/utils/scann_utils.py: tree(1000, 100, 100000) + score_ah(2), ScaNN's default (isotropic) AH, no
  # reordering.
  assert (ORQA_SCANN.num_leaves, ORQA_SCANN.num_leaves_to_search, ORQA_SCANN.training_sample_size,
          ORQA_SCANN.dimensions_per_block, ORQA_SCANN.anisotropic_quantization_threshold,
          ORQA_SCANN.reorder) == (1000, 100, 100_000, 2, None, 0)


def test_a_scann_tree_gets_at_most_a_leaf_per_40_rows_and_bad_settings_are_refused_naming_the_field():
  from realm_jax.retrieval.mips import ORQA_SCANN, ScannConfig

  assert ORQA_SCANN.for_rows(31_409).describe() == "tree 785/100, AH2, no reorder"
  assert ORQA_SCANN.for_rows(1_000_000) == ORQA_SCANN
  assert ScannConfig(1, 1, reorder=100).describe() == "no tree (1 leaf), AH2 t=0.2, reorder 100"
  small = ScannConfig(reorder=200).for_rows(1000)
  assert (small.num_leaves, small.num_leaves_to_search, small.training_sample_size) == (25, 25, 1000)
  with pytest.raises(InputError, match=r"^ScannConfig.num_leaves_to_search: 200 exceeds num_leaves 100$"):
    ScannConfig(100, 200)
  with pytest.raises(InputError, match=r"^ScannConfig.reorder: -1 is negative"):
    ScannConfig(reorder=-1)
  with pytest.raises(InputError, match=r"^ScannConfig.dimensions_per_block: 0 is not a positive count$"):
    ScannConfig(dimensions_per_block=0)


def test_scann_without_reordering_returns_hashed_scores_and_with_it_exact_ones_with_a_tree_or_one_leaf():
  from realm_jax.retrieval.mips import ScannConfig, ScannSearcher

  rng = np.random.default_rng(5)
  rows = rng.normal(size=(2000, 16)).astype(np.float32)
  queries = rng.normal(size=(8, 16)).astype(np.float32)
  for leaves, reorder, exact in ((10, 0, False), (10, 50, True), (1, 0, False), (1, 50, True)):
    ids, scores = ScannSearcher.build(rows, ScannConfig(leaves, leaves, reorder=reorder)).search(queries, 5)
    inner = np.einsum("bd,bkd->bk", queries, rows[ids])
    assert np.allclose(scores, inner, atol=1e-4) == exact
