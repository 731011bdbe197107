"""MIPS backends, atomic index publication, the hot-swapping poller and the refresh job's faults."""

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import DEMO
from conftest import TINY_BERT as TINY

from realm_jax import partitioning, storage
from realm_jax.data.blocks import BlockStore, build_block_store
from realm_jax.data.corpus import Document
from realm_jax.data.ict import IctDataConfig, ict_iterator
from realm_jax.errors import InputError
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.ict import IctSpec
from realm_jax.refresh.refresher import RefreshConfig, Refresher, embed_all_blocks
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.mips import ExactSearcher, ScannConfig, ScannSearcher, exact_top_k_numpy
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, make_trainer


@pytest.mark.parametrize("data, model", [(8, 1), (4, 2), (1, 1)])
def test_exact_sharded_search_equals_brute_force(data, model):
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(1001, 32)).astype(np.float32)  # not a multiple of the device count
  queries = rng.normal(size=(6, 32)).astype(np.float32)
  mesh = partitioning.make_mesh(data, model, jax.devices()[: data * model])
  ids, scores = ExactSearcher(embeddings, mesh).search(queries, 10)
  want_ids, want_scores = exact_top_k_numpy(embeddings, queries, 10)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


@pytest.fixture(scope="module")
def minilm_embeddings(demo_store, minilm_path):
  """Real MiniLM retriever-tower embeddings of the demo blocks and of NQ dev questions."""
  from realm_jax.checkpoints.hf_bert import load_hf_bert
  from realm_jax.data.features import pack
  from realm_jax.models.retriever import RetrieverTower

  config, encoder = load_hf_bert(minilm_path)
  tower = RetrieverTower(config)
  x = np.zeros((1, 8), np.int32)
  params = jax.device_get(nn.meta.unbox(tower.init(jax.random.key(0), x, x, x, True)["params"]))
  params["encoder"] = encoder
  refresh = RefreshConfig(RetrieverConfig(config, block_len=64), batch_size=128)
  blocks = embed_all_blocks(params, refresh, demo_store, partitioning.make_mesh()).embeddings
  from realm_jax.data.tokenization import WordPieceTokenizer

  tok = WordPieceTokenizer(minilm_path / "vocab.txt")
  questions = [json.loads(line)["question"] for line in (DEMO / "questions/nq_open_dev.jsonl").open()]
  feats = [pack([np.array([tok.cls_id]), tok.encode(q)[0][:30], np.array([tok.sep_id])], 32) for q in questions]
  batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
  queries = np.asarray(jax.jit(lambda p, b: tower.apply({"params": p}, b["input_ids"], b["input_mask"],
                                                        b["segment_ids"], True))(params, batch))
  return blocks, queries


@pytest.mark.slow
def test_scann_recall_against_exact_search_on_real_embeddings(minilm_embeddings):
  blocks, queries = minilm_embeddings
  scann = ScannSearcher.build(blocks, ScannConfig(num_leaves=64, num_leaves_to_search=32, reorder=200))
  exact_ids, _ = ExactSearcher(blocks, partitioning.make_mesh()).search(queries, 10)
  scann_ids, _ = scann.search(queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(scann_ids, exact_ids, strict=True)])
  print(f"ScaNN recall@10 vs exact on {len(blocks)} MiniLM block embeddings: {recall:.3f}")
  assert recall >= 0.9


@dataclasses.dataclass(frozen=True)
class _AssetWriter:
  """A backend that publishes the files `write(embeddings, directory)` writes as its assets."""

  write: Callable
  name: str = "scann"
  writes_assets: bool = True

  def write_assets(self, embeddings, directory):
    self.write(embeddings, directory)


def _publish(index_dir, store, step, seed=0):
  rows = np.random.default_rng(seed).normal(size=(store.num_blocks, 8)).astype(np.float32)
  index_lib.publish_index(index_dir, step, rows, store)
  return rows


def _rewrite_as_parts(index_dir, step, bounds, format=2, names=None):
  """Index `step`'s rows re-written as the parts processes with `bounds` (row ranges) would write, and its commit."""
  path = index_lib.commit_path(index_dir, step)
  commit = json.loads(path.read_text())
  data = index_dir / commit["data"]
  (part,) = commit["files"]
  rows = np.load(data / part)
  (data / part).unlink()
  commit["files"], commit["format"] = {}, format
  for i, (start, stop) in enumerate(bounds):
    name = (names or [index_lib.part_name(i, len(bounds)) for i in range(len(bounds))])[i]
    np.save(data / name, rows[start:stop], allow_pickle=False)
    raw = (data / name).read_bytes()
    commit["files"][name] = {"size": len(raw), "sha256": storage.sha256(raw), "rows": [start, stop]}
  path.write_text(json.dumps(commit))
  return rows


def test_an_index_written_in_parts_reads_as_one_array_and_bad_part_tables_are_refused(demo_store, tmp_path):
  n = demo_store.num_blocks
  _publish(tmp_path, demo_store, 10)
  thirds = [partitioning.process_block_range(n, p, 3) for p in range(3)]
  rows = _rewrite_as_parts(tmp_path, 10, thirds)
  commit, read = index_lib.load_index(tmp_path, 10, demo_store)
  np.testing.assert_array_equal(read, rows)
  assert isinstance(read, np.memmap) and sorted(commit["files"]) == [index_lib.part_name(p, 3) for p in range(3)]
  for step, bounds, names, why in [
      (20, [(0, 100), (101, n)], None, r"\['rows'\] is \[101, \d+\]; the parts must cover rows 0:\d+ in order, "
       "the next one starting at 100"),
      (30, [(0, 100), (100, n - 1)], None, rf"the embedding parts cover rows 0:{n - 1}, not the {n} blocks"),
      (40, [(0, 100), (100, n)], [index_lib.part_name(0, 3), index_lib.part_name(1, 3)],
       "not a format-1 index's embeddings.npy nor format 2's complete set of parts")]:
    _publish(tmp_path, demo_store, step)
    _rewrite_as_parts(tmp_path, step, bounds, names=names)
    with pytest.raises(index_lib.PublishedIndexError, match=why):
      index_lib.load_index(tmp_path, step, demo_store)
  # Format 1 (one embeddings.npy, written by earlier versions) still reads.
  _publish(tmp_path, demo_store, 50)
  rows = _rewrite_as_parts(tmp_path, 50, [(0, n)], format=1, names=[index_lib.EMBEDDINGS])
  np.testing.assert_array_equal(index_lib.load_index(tmp_path, 50, demo_store)[1], rows)


def test_publication_is_atomic_and_keeps_the_newest_three(demo_store, tmp_path):
  for step in (10, 20, 30, 40):
    _publish(tmp_path, demo_store, step, seed=step)
  assert index_lib.committed_steps(tmp_path) == [20, 30, 40]
  commit, rows = index_lib.load_index(tmp_path, 40, demo_store)
  assert commit["train_step"] == 40 and commit["num_blocks"] == demo_store.num_blocks
  np.testing.assert_array_equal(rows, np.random.default_rng(40).normal(size=rows.shape).astype(np.float32))
  # keep-N removed step 10's commit and its data; every remaining data folder is named by a commit
  named = {json.loads(p.read_text())["data"] for p in (tmp_path / "commits").iterdir()}
  assert {f"data/{p.name}" for p in (tmp_path / "data").iterdir()} == named
  with pytest.raises(index_lib.PublishedIndexError, match="already committed"):
    _publish(tmp_path, demo_store, 40)


def test_refresher_killed_mid_publish_leaves_readers_on_the_previous_index(demo_store, tmp_path):
  _publish(tmp_path, demo_store, 10)

  def die(_, __):
    raise KeyboardInterrupt("killed while writing ScaNN assets")

  with pytest.raises(KeyboardInterrupt):
    index_lib.publish_index(tmp_path, 20, np.zeros((demo_store.num_blocks, 8), np.float32), demo_store,
                            backend=_AssetWriter(die))
  half = [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("20-refresher-")]
  assert len(half) == 1 and index_lib.committed_steps(tmp_path) == [10]
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]))
  poller.load_newest()
  assert poller.maybe_swap(12) == {"index_step": 10.0, "index_staleness": 2.0, "index_read_failures": 0.0}
  (tmp_path / "data" / "30-bootstrap-abc").mkdir()  # another job's uncommitted data (it may be publishing)
  (tmp_path / "data" / "5-bootstrap-abc").mkdir()  # older than every commit: left by a killed keep-N removal
  assert sorted(index_lib.remove_uncommitted(tmp_path)) == sorted(["5-bootstrap-abc", *half])
  assert not (tmp_path / "data" / half[0]).exists() and (tmp_path / "data" / "30-bootstrap-abc").exists()
  assert index_lib.load_index(tmp_path, 10, demo_store)[0]["train_step"] == 10  # the committed one is kept


def test_index_for_another_corpus_is_refused(demo_store, tmp_path, wordpiece):
  build_block_store([Document("x", "T", "Some text.")], tmp_path / "other", wordpiece, "f00")
  other = BlockStore(tmp_path / "other")
  _publish(tmp_path / "index", other, 5)
  with pytest.raises(index_lib.PublishedIndexError, match="field 'num_blocks' is 1 but block store"):
    index_lib.load_index(tmp_path / "index", 5, demo_store)


def test_corrupt_embedding_file_is_refused_and_the_reader_uses_the_newest_good_index(demo_store, tmp_path):
  _publish(tmp_path, demo_store, 10)
  _publish(tmp_path, demo_store, 20)
  path = tmp_path / json.loads((tmp_path / "commits" / "20.json").read_text())["data"] / index_lib.part_name(0, 1)
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(index_lib.PublishedIndexError, match="embeddings-00000-of-00001.npy: sha256 does not match"):
    index_lib.load_index(tmp_path, 20, demo_store)
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]),
                                 poll_seconds=0.05).start()
  time.sleep(0.5)
  poller.close()
  poller.maybe_swap(25)
  assert installed == [10]  # 20 is corrupt: the newest good index is used
  assert poller.rejected == {20} and poller.read_failures == 0  # wrong content is a rejection, not an I/O failure
  _publish(tmp_path, demo_store, 30)  # the next good index is still read: nothing is skipped for good
  assert poller.load_newest()
  poller.maybe_swap(31)
  assert installed == [10, 30]


def test_an_index_with_non_finite_embeddings_is_refused_at_publish_and_at_read(demo_store, tmp_path, monkeypatch):
  monkeypatch.setattr(index_lib, "_CHUNK", 3 * 8 * 4)  # 3 rows a chunk: the count spans chunk boundaries
  rows = _publish(tmp_path, demo_store, 10)
  bad = rows.copy()
  bad[[3, 4, 7], 1] = np.nan
  bad[11, 0], bad[-1, 7] = np.inf, -np.inf
  with pytest.raises(InputError, match=rf"index step 20: 5 of {len(bad)} embedding rows are not finite"):
    index_lib.publish_index(tmp_path, 20, bad, demo_store)
  assert index_lib.committed_steps(tmp_path) == [10] and len(list((tmp_path / "data").iterdir())) == 1
  # Committed with a matching sha256 through the real publish path, its publish-time check bypassed:
  with monkeypatch.context() as patch:
    patch.setattr(index_lib, "_non_finite_rows", lambda embeddings: 0)
    index_lib.publish_index(tmp_path, 20, bad, demo_store)
  with pytest.raises(index_lib.PublishedIndexError,
                     match=rf"commits/20\.json: 5 of {len(bad)} rows of .*/data/20-refresher-[0-9a-f]+ are not finite"):
    index_lib.load_index(tmp_path, 20, demo_store)
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]))
  assert not poller.load_newest() and poller.load_newest()  # 20 is rejected, then 10 is read
  poller.maybe_swap(21)
  assert installed == [10] and poller.rejected == {20} and poller.read_failures == 0


def test_a_commit_whose_embeddings_file_is_missing_is_reported_as_missing(demo_store, tmp_path):
  def data(step):
    return tmp_path / json.loads((tmp_path / "commits" / f"{step}.json").read_text())["data"]

  _publish(tmp_path, demo_store, 10)
  (data(10) / index_lib.part_name(0, 1)).unlink()
  missing = (rf"{re.escape(str(data(10)))}/embeddings-00000-of-00001\.npy: missing, but the commit .*/commits/10\.json "
             "exists")
  with pytest.raises(index_lib.PublishedIndexError, match=missing):
    index_lib.load_index(tmp_path, 10, demo_store)
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]),
                                 poll_seconds=0.05, max_staleness=5, wait_seconds=0.3)  # not started: waits read
  # Not "no index was published": the commit exists, and why it could not be loaded is said.
  with pytest.raises(TimeoutError, match=r"commits of step >= 0 exist in .* \(steps \[10\]\) but none could be "
                                         rf"loaded within 0\.3 s: rejected index 10: {missing}"):
    poller.wait_for_first(timeout=0.3)
  assert poller.rejected == {10} and poller.read_failures == 0
  # Any listed file: a ScaNN asset missing rejects the index for every backend's poller, exact ones too.
  index_lib.publish_index(tmp_path, 20, np.zeros((demo_store.num_blocks, 8), np.float32), demo_store,
                          backend=_AssetWriter(lambda _, d: (d / "assets.pb").write_bytes(b"asset")))
  (data(20) / "scann" / "assets.pb").unlink()
  with pytest.raises(index_lib.PublishedIndexError, match=r"scann/assets\.pb: missing, but the commit"):
    index_lib.load_index(tmp_path, 20, demo_store)
  assert not poller.load_newest() and poller.rejected == {10, 20}
  _publish(tmp_path, demo_store, 30)
  poller.wait_for_first(timeout=30)
  assert installed == [30] and poller.rejected == {10, 20}
  _publish(tmp_path, demo_store, 40)
  (data(40) / index_lib.part_name(0, 1)).unlink()
  with pytest.raises(TimeoutError, match=r"step 44: commits of step >= 39 exist .* \(steps \[40\]\) but none could "
                                         r"be loaded within 0\.3 s \(max staleness 5\): .*embeddings-00000-of-00001"
                                         r"\.npy: missing"):
    poller.maybe_swap(44)
  assert installed == [30] and poller.rejected == {10, 20, 40}


def test_trainer_started_before_any_index_waits_then_gets_the_first(demo_store, tmp_path):
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]),
                                 poll_seconds=0.05).start()
  with pytest.raises(TimeoutError, match="no index was published"):
    poller.wait_for_first(timeout=0.3)
  threading.Timer(0.3, lambda: _publish(tmp_path, demo_store, 7)).start()
  poller.wait_for_first(timeout=30)
  poller.close()
  assert installed == [7] and poller.index_step == 7


def test_bounded_staleness_makes_a_step_wait_for_the_refresh_job(demo_store, tmp_path):
  installed = []
  poller = index_lib.IndexPoller(tmp_path, demo_store, lambda m, e: installed.append(m["train_step"]),
                                 poll_seconds=0.05, max_staleness=5, wait_seconds=30).start()
  assert poller.maybe_swap(5) == {}  # no index yet, but step 5 is within 5 steps of step 0
  _publish(tmp_path, demo_store, 0)
  threading.Timer(0.3, lambda: _publish(tmp_path, demo_store, 10)).start()
  start = time.monotonic()
  metrics = poller.maybe_swap(14)  # waited for 10: 14 - 0 > 5
  assert (metrics["index_step"], metrics["index_staleness"]) == (10.0, 4.0)
  assert time.monotonic() - start >= 0.25 and installed[-1] == 10
  poller.wait_seconds = 0.3
  with pytest.raises(TimeoutError, match="step 16: no index of step >= 11 was published .* refresh job running"):
    poller.maybe_swap(16)
  poller.close()


def test_refresher_indexes_checkpoints_and_resumes_after_a_restart(demo_store, tmp_path):
  mesh = partitioning.make_mesh()
  retriever = RetrieverConfig(TINY, 16, block_len=32)
  spec = IctSpec(str(demo_store.path), retriever, IctDataConfig(8, query_len=16, block_len=32))
  trainer = make_trainer(spec.objective(), mesh, str(tmp_path), TrainerConfig(4, checkpoint_every=2, log_every=2),
                         OptimizerConfig(1e-3, warmup_steps=1))
  state, _ = trainer.fit(ict_iterator(demo_store, spec.data))
  config = RefreshConfig(retriever, tower_path=("query_tower",), batch_size=64)
  refresher = Refresher(tmp_path, tmp_path / "index", demo_store, mesh, config)
  # Training is done and checkpoint 4 is newer: a pass over checkpoint 2 started by the loop is dropped.
  assert refresher.refresh(2, abandon_if_superseded=True) is None
  assert index_lib.committed_steps(tmp_path / "index") == []
  assert refresher.run(step=2) == [2]  # an explicit --step is always indexed
  # The trainer deleting its oldest checkpoint while the refresher lists them is retried, not fatal.
  reload, calls = refresher.checkpoints.reload, []

  def racing_reload():
    calls.append(1)
    if len(calls) == 1:
      raise FileNotFoundError(tmp_path / "train" / "2")
    reload()

  refresher.checkpoints.reload = racing_reload
  assert refresher.newest_checkpoint() == 4 and len(calls) == 2
  restarted = Refresher(tmp_path, tmp_path / "index", demo_store, mesh, config)
  assert restarted.run() == [4]  # newest checkpoint; training is done, so it exits
  assert Refresher(tmp_path, tmp_path / "index", demo_store, mesh, config).run() == []
  _, rows = index_lib.load_index(tmp_path / "index", 4, demo_store)
  # The published rows are the trained tower's embeddings of the blocks.
  params = jax.device_get(state.params["query_tower"])
  np.testing.assert_allclose(rows, embed_all_blocks(params, config, demo_store, mesh).embeddings, atol=1e-5)


def _follow_a_simulated_trainer(store, tmp_path, monkeypatch, slowdown: float, end: int, pass_seconds: float = 10):
  """A refresher of `slowdown` following a trainer that checkpoints every step, one step per (simulated) second,
  until step `end`; each pass takes `pass_seconds`.  Returns [(publish time, index step)]."""
  clock, published = [0.0], []

  def sleep(seconds):
    clock[0] += seconds

  def embed(params, store, desc, abandon):  # a pass: all blocks embedded after `pass_seconds`
    sleep(pass_seconds)
    return index_lib.EmbeddedRows(0, np.zeros((store.num_blocks, 16), np.float32), store.num_blocks)

  publish = index_lib.publish_index

  def recorded(index_dir, step, *args, **kwargs):
    published.append((clock[0], step))
    return publish(index_dir, step, *args, **kwargs)

  monkeypatch.setattr(index_lib, "publish_index", recorded)
  config = RefreshConfig(RetrieverConfig(TINY, 16, block_len=32), abandon_check_seconds=1.0, slowdown=slowdown)
  refresher = Refresher(tmp_path, tmp_path / "index", store, partitioning.make_mesh(), config, clock=lambda: clock[0],
                        sleep=sleep)
  refresher.embedder, refresher.restore_block_tower = embed, lambda step: {}
  refresher.newest_checkpoint = lambda: min(int(clock[0]), end)
  refresher.training_done = lambda: clock[0] >= end
  refresher.run(poll_seconds=1.0)
  return published


@pytest.mark.parametrize("slowdown", [4.0, 30.0])
def test_a_slowed_refresher_holds_each_index_back_so_that_the_trainer_reads_it_that_many_times_staler(
    demo_store, tmp_path, monkeypatch, slowdown):
  stale = {}
  for factor in (1.0, slowdown):
    published = _follow_a_simulated_trainer(demo_store, tmp_path / str(factor), monkeypatch, factor, end=1200)
    times, steps = np.array(published).T
    # The trainer's logged index_staleness at each step (one a second): its step minus the newest index's.
    step = np.arange(int(times[1]), 1200)
    stale[factor] = step - steps[np.searchsorted(times, step, side="right") - 1]
    # Indexes come `factor` x the pass apart; the final checkpoint's is published at once after its pass.
    np.testing.assert_allclose(np.diff(times[:-1]).mean(), 10 * factor, rtol=0.05)
    assert steps[-1] == 1200 and times[-1] - times[-2] <= 10 * factor + 10
  assert stale[1.0].mean() == pytest.approx(15, abs=1)  # 1.5 passes: an index is 1 to 2 passes old
  assert stale[slowdown].mean() / stale[1.0].mean() == pytest.approx(slowdown, rel=0.1)
  assert stale[slowdown].min() >= 10 * slowdown - 1  # never fresher than the slowed pass


def test_a_held_back_index_is_dropped_when_training_finishes_with_a_newer_checkpoint(demo_store, tmp_path,
                                                                                      monkeypatch):
  published = _follow_a_simulated_trainer(demo_store, tmp_path, monkeypatch, 30.0, end=450)
  # Index 0 (a 10 s pass held back 290 s); the pass of step 300, held until 600 s, is dropped when training ends
  # at 450 with a newer checkpoint, whose index is published right after its pass, not held.
  assert published == [(300.0, 0), (460.0, 450)]


def test_the_refresh_jobs_slowdown_reaches_its_config_and_cannot_make_it_faster():
  from realm_jax.checkpoints.train_dir import RetrieverDescription
  from realm_jax.refresh.refresher import RefreshJob

  run = RetrieverDescription(RetrieverConfig(TINY), ("query_tower",), "vocab")
  assert RefreshJob(slowdown=30.0).config(run, "retriever.json").slowdown == 30.0
  with pytest.raises(InputError, match=r"RefreshJob.slowdown = 0.5: a factor >= 1"):
    RefreshJob(slowdown=0.5).config(run, "retriever.json")


def test_retriever_lengths_are_the_unpadded_input_lengths(demo_store):
  lengths = demo_store.retriever_lengths(128)
  assert lengths.shape == (demo_store.num_blocks,)
  for i in range(0, demo_store.num_blocks, 97):
    assert lengths[i] == demo_store.retriever_inputs([i], 128)["input_mask"].sum()


def test_embedding_batches_cover_every_block_once_at_a_length_that_holds_it():
  from realm_jax.data.features import embedding_batches

  lengths = np.random.default_rng(0).integers(5, 289, size=1000)
  batches = embedding_batches(lengths, 64, 288, 32)
  ids = np.concatenate([b for _, b in batches])
  assert sorted(ids.tolist()) == list(range(1000))
  assert all(len(b) <= 64 and (lengths[b] <= length).all() for length, b in batches)
  assert {length for length, _ in batches} <= {32, 64, 96, 128, 160, 192, 224, 256, 288}
  assert [length for length, _ in embedding_batches(lengths, 1000, 288, 0)] == [288]


def test_each_process_batches_only_its_own_block_range_at_the_lengths_every_process_runs():
  from realm_jax.data.features import embedding_batches

  lengths = np.random.default_rng(1).integers(5, 289, size=1003)
  parts = [embedding_batches(lengths, 64, 288, 32, part, 4) for part in range(4)]
  assert len({tuple(length for length, _ in batches) for batches in parts}) == 1  # one global step per batch
  for part, batches in enumerate(parts):
    start, stop = partitioning.process_block_range(1003, part, 4)
    ids = np.concatenate([b for _, b in batches])
    assert sorted(ids.tolist()) == list(range(start, stop))
    assert all(len(b) <= 16 and (lengths[b] <= length).all() for length, b in batches)


def _tower_params(config, projection_size=16, seed=0):
  from realm_jax.models.retriever import RetrieverTower

  x = np.zeros((1, 8), np.int32)
  tower = RetrieverTower(config, projection_size)
  return jax.device_get(nn.meta.unbox(tower.init(jax.random.key(seed), x, x, x, True)["params"]))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_length_bucketed_embeddings_equal_padded_ones(demo_store, pooling):
  config = dataclasses.replace(TINY, pooling=pooling)
  params = _tower_params(config)
  mesh = partitioning.make_mesh()
  retriever = RetrieverConfig(config, 16, block_len=128)
  padded, bucketed = (embed_all_blocks(params, RefreshConfig(retriever, length_bucket=bucket), demo_store,
                                       mesh).embeddings for bucket in (0, 32))
  np.testing.assert_allclose(bucketed, padded, atol=2e-5)


def test_a_pipelined_pass_equals_the_serial_loop_bit_for_bit_and_passes_compile_once(demo_store):
  from realm_jax.data.features import embedding_batches
  from realm_jax.refresh.refresher import BlockEmbedder, embed_step

  config = RefreshConfig(RetrieverConfig(TINY, 16, block_len=128), batch_size=64, abandon_check_seconds=3600.0)
  mesh = partitioning.make_mesh()
  batches = embedding_batches(demo_store.retriever_lengths(128), 64, 128, config.length_bucket)
  serial_step, embedder, asked = embed_step(config, mesh), BlockEmbedder(config, mesh), []
  for seed in (0, 1):  # two passes (two checkpoints) of one embedder
    params = _tower_params(TINY, seed=seed)
    serial = np.zeros((demo_store.num_blocks, 16), np.float32)
    with jax.set_mesh(mesh):  # the refresher's loop before the pipeline: build, place, embed, fetch, in turn
      for length, ids in batches:
        inputs = demo_store.retriever_inputs(np.pad(ids, (0, 64 - len(ids)), mode="edge"), length)
        serial[ids] = np.asarray(serial_step(params, partitioning.shard_batch(inputs, mesh)))[: len(ids)]
    np.testing.assert_array_equal(embedder(params, demo_store, abandon=lambda: asked.append(1) or False).embeddings,
                                  serial)
  assert len(asked) == 2  # once per pass (at its first batch): the pass is far shorter than an hour
  assert embedder.step._cache_size() == len({length for length, _ in batches}) > 1  # per length group, not pass


@pytest.mark.parametrize("power, late", [(1.0, 0.3), (2.0, 30.0)])  # batch seconds ~ its length, or its square
def test_superseded_checks_follow_elapsed_time_not_batches(monkeypatch, power, late):
  from realm_jax.refresh.refresher import AbandonCheck

  collectives, clock, asked = [], [0.0], []
  monkeypatch.setattr(partitioning, "agree", lambda value: collectives.append(value) or value)
  lengths = np.repeat([32, 64, 128, 288], [3000, 2000, 1000, 500])  # embedding_batches: short groups first
  check = AbandonCheck(lambda: asked.append(clock[0]) or clock[0] > 300, lengths, 30.0, clock=lambda: clock[0])
  for i, length in enumerate(lengths):
    if check(i):
      break
    clock[0] += 1e-3 * length**power / 32 ** (power - 1)
  assert 300 < asked[-1] <= 330 + late and check.next_check == -1  # abandoned within a check of being told
  assert len(asked) <= 1 + asked[-1] / 29.5 and np.diff(asked).max() <= 30 + late
  assert len(collectives) <= len(asked) + 3  # ~one collective per check, not one per batch (i + 1 of them)
  assert i + 1 > 50 * len(collectives)


def test_processes_run_the_check_collective_at_the_same_batches_whatever_their_clocks(monkeypatch):
  from realm_jax.refresh.refresher import AbandonCheck

  rank, sent, batch = [0], {}, [0]

  def agree(value):  # process 0's value reaches every process; a collective where process 0 ran none would hang
    if rank[0] == 0:
      sent[batch[0]] = value
    assert batch[0] in sent, f"process {rank[0]} ran a collective at batch {batch[0]}, process 0 did not"
    return sent[batch[0]]

  monkeypatch.setattr(partitioning, "agree", agree)
  monkeypatch.setattr(jax, "process_index", lambda: rank[0])
  lengths, clock = np.repeat([32, 288], [500, 500]), [0.0]
  first = AbandonCheck(lambda: clock[0] > 20, lengths, 1.0, clock=lambda: clock[0])
  other = AbandonCheck(lambda: pytest.fail("only process 0 asks"), lengths, 1.0, clock=lambda: pytest.fail("clock"))
  for batch[0] in range(len(lengths)):
    rank[0] = 0
    stop = first(batch[0])
    rank[0] = 1
    assert other(batch[0]) == stop
    if stop:
      break
    clock[0] += 1e-3 * lengths[batch[0]]
  assert stop and 5 < len(sent) < 40


def test_prefetched_raises_the_producers_error_and_stops_its_thread_when_closed():
  from realm_jax.refresh.refresher import prefetched

  def failing():
    yield from range(3)
    raise ValueError("block 3 is unreadable")

  got = []
  with pytest.raises(ValueError, match="block 3 is unreadable"):
    got.extend(prefetched(failing(), 2))
  assert got == [0, 1, 2]
  made = []

  def endless():
    while True:
      made.append(len(made))
      yield made[-1]

  items = prefetched(endless(), 2)
  assert next(items) == 0
  time.sleep(0.2)
  assert len(made) <= 4  # 1 taken, 2 queued, 1 waiting to be queued
  items.close()
  assert not [t for t in threading.enumerate() if t.name == "refresh-inputs"]


def test_a_trainer_restarted_with_another_retriever_is_refused_naming_both_values(tmp_path):
  from realm_jax.checkpoints.train_dir import RetrieverDescription
  from realm_jax.refresh.refresher import RefreshJob

  run = RetrieverDescription(RetrieverConfig(TINY, 16, block_len=128), ("retriever", "query_tower"), "wp:abc")
  run.write(tmp_path)
  run.write(tmp_path)  # the same retriever: a resumed run
  assert RetrieverDescription.read(tmp_path, wait_seconds=0) == run
  with pytest.raises(ValueError, match=r"started with block_len=128, now block_len=64: use a new workdir"):
    dataclasses.replace(run, retriever=dataclasses.replace(run.retriever, block_len=64)).write(tmp_path)
  config = RefreshJob(batch_size=32, block_len=128).config(run, tmp_path / "retriever.json")
  assert (config.tower_path, config.retriever.block_len, config.batch_size) == (("retriever", "query_tower"), 128, 32)
  with pytest.raises(ValueError, match=r"RefreshJob.tower_path = \('retriever', 'block_tower'\), but the trainer"):
    RefreshJob(tower_path=("retriever", "block_tower")).config(run, tmp_path / "retriever.json")
