"""The index publish protocol and poller on a real GCS server: killed publishes, transient and persistent faults."""

import dataclasses
import time

import numpy as np
import pytest
from etils import epath
from gcs import FaultProxy, use_endpoint

from realm_jax.retrieval import index as index_lib

MUTATIONS = ("POST", "PUT", "DELETE", "PATCH")


def _rows(store, seed):
  return np.random.default_rng(seed).normal(size=(store.num_blocks, 8)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _TwoScannFiles:
  """A backend whose assets are two small files."""

  name: str = "scann"
  writes_assets: bool = True

  def write_assets(self, embeddings, directory):
    (directory / "a.npy").write_bytes(b"asset a")
    (directory / "b.txt").write_bytes(b"asset b")


@pytest.fixture
def proxy(gcs_server):
  proxy = FaultProxy(gcs_server.url)
  yield proxy
  use_endpoint(gcs_server.url)
  proxy.stop()


def _publish_through(proxy, gcs_server, index_dir, store, step, seed):
  use_endpoint(proxy.url)
  try:
    index_lib.publish_index(index_dir, step, _rows(store, seed), store, _TwoScannFiles(), keep=1)
  finally:
    use_endpoint(gcs_server.url)


def test_publish_killed_after_each_object_never_exposes_a_partial_index(demo_store, gcs_server, gcs_bucket, proxy):
  # How many objects one publish writes or deletes (data files, commit, then keep-N removal of the previous one).
  counter = proxy.fail(r".", mode="503", times=0, methods=MUTATIONS)
  index_lib.publish_index(f"{gcs_bucket}/count", 10, _rows(demo_store, 10), demo_store, keep=1)
  _publish_through(proxy, gcs_server, f"{gcs_bucket}/count", demo_store, 20, 20)
  writes = counter.hits
  proxy.clear()
  assert writes >= 5  # embeddings, 2 ScaNN assets, the commit, removal of index 10
  for killed_after in range(writes):
    index_dir = f"{gcs_bucket}/killed_{killed_after}"
    index_lib.publish_index(index_dir, 10, _rows(demo_store, 10), demo_store, keep=1, writer="bootstrap")
    # From here on, nothing this writer sends reaches the store: it was killed after `killed_after` objects.
    proxy.fail(r".", mode="403", methods=MUTATIONS, after=killed_after)
    with pytest.raises(OSError):
      _publish_through(proxy, gcs_server, index_dir, demo_store, 20, 20)
    proxy.clear()
    installed = []
    poller = index_lib.IndexPoller(index_dir, demo_store, lambda c, rows, out=installed: out.append((c, rows)))
    assert poller.load_newest()  # whatever is committed verifies in full
    poller.maybe_swap(None)
    commit, rows = installed[-1]
    np.testing.assert_array_equal(rows, _rows(demo_store, commit["train_step"]))
    committed = 20 in index_lib.committed_steps(index_dir)
    assert commit["train_step"] == (20 if committed else 10)
    assert committed or killed_after < writes - 1  # the keep-N removal comes after the commit
    # The restarted writer removes its own half-written data; the next publish succeeds and is read.
    index_lib.remove_uncommitted(index_dir)
    index_lib.publish_index(index_dir, 30, _rows(demo_store, 30), demo_store, keep=1)
    assert poller.load_newest() and not poller.rejected
    poller.maybe_swap(None)
    assert installed[-1][0]["train_step"] == 30 and poller.index_step == 30
    assert index_lib.committed_steps(index_dir) == [30]
    index_lib.remove_uncommitted(index_dir)  # also what a keep-N removal killed mid-way left of the other writer's
    data = {p.name for p in epath.Path(f"{index_dir}/data").iterdir()}
    assert data == {index_lib.read_commit(index_dir, 30, demo_store)["data"].split("/")[1]}


def test_poller_retries_transient_faults_and_stops_on_persistent_ones(demo_store, gcs_server, gcs_bucket, proxy):
  flaky, broken = f"{gcs_bucket}/flaky", f"{gcs_bucket}/broken"
  index_lib.publish_index(flaky, 10, _rows(demo_store, 10), demo_store)
  index_lib.publish_index(broken, 20, _rows(demo_store, 20), demo_store)
  # flaky: the embeddings answer 503 seven times, then drop the connection twice (more than gcsfs's own 6 tries);
  # broken: index 20's commit object can never be read.
  proxy.fail(r"/flaky/data/.*embeddings-00000-of-00001\.npy", mode="503", times=7)
  proxy.fail(r"/flaky/data/.*embeddings-00000-of-00001\.npy", mode="drop", times=2)
  proxy.fail(r"/broken/commits/20\.json", mode="503")
  use_endpoint(proxy.url)
  installed = []
  flaky_poller = index_lib.IndexPoller(flaky, demo_store, lambda c, r: installed.append(c["train_step"]),
                                       poll_seconds=0.1, read_attempts=3).start()
  broken_poller = index_lib.IndexPoller(broken, demo_store, lambda c, r: installed.append(c["train_step"]),
                                        poll_seconds=0.1, read_attempts=1, max_failures=1).start()
  flaky_poller.wait_for_first(timeout=240)
  flaky_poller.close()
  assert installed == [10] and flaky_poller.read_failures == 0
  deadline = time.monotonic() + 240
  with pytest.raises(index_lib.IndexReadError, match=rf"{broken}/commits/20\.json: 1 consecutive failed reads"):
    while time.monotonic() < deadline:  # the training loop's between-step call is where the run stops
      broken_poller.maybe_swap(21)
      time.sleep(0.2)
  broken_poller.close()
  assert broken_poller.read_failures == 1 and installed == [10]


def test_a_scann_index_published_to_gcs_is_verified_and_served_by_the_live_index(demo_store, gcs_bucket):
  from realm_jax import partitioning
  from realm_jax.retrieval.backends import get_backend
  from realm_jax.retrieval.mips import ScannConfig, SearchConfig, exact_top_k_numpy

  rows = _rows(demo_store, 3)
  search = SearchConfig(backend="scann", scann=ScannConfig(num_leaves=16, num_leaves_to_search=16, reorder=100))
  index_dir = f"{gcs_bucket}/scann"
  index_lib.publish_index(index_dir, 5, rows, demo_store, backend=get_backend(search))
  commit = index_lib.read_commit(index_dir, 5, demo_store)
  assert any(name.startswith("scann/") for name in commit["files"])
  live = index_lib.LiveIndex(partitioning.make_mesh(), search)
  poller = live.poller(index_dir, demo_store)
  poller.load_newest()
  poller.maybe_swap(5)
  queries = rows[:4] + 0.01
  ids, _ = live.searcher.search(queries, 5)
  assert (ids[:, 0] == exact_top_k_numpy(rows, queries, 1)[0][:, 0]).mean() >= 0.75


def test_a_commit_whose_embeddings_object_is_missing_on_gcs_is_reported_as_missing(demo_store, gcs_bucket):
  index_dir = f"{gcs_bucket}/missing"
  index_lib.publish_index(index_dir, 10, _rows(demo_store, 10), demo_store)
  data = index_lib.read_commit(index_dir, 10, demo_store)["data"]
  (epath.Path(index_dir) / data / index_lib.part_name(0, 1)).unlink()  # the data prefix's only object: folder gone
  missing = (rf"{index_dir}/{data}/embeddings-00000-of-00001\.npy: missing, but the commit "
             rf"{index_dir}/commits/10\.json exists")
  with pytest.raises(index_lib.PublishedIndexError, match=missing):
    index_lib.load_index(index_dir, 10, demo_store)
