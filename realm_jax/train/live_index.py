"""How a trainer follows the indexes the refresh job publishes in `<workdir>/index` (REALM, ICT's optional watch)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from realm_jax import storage
from realm_jax.data.blocks import BlockStore
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.mips import SearchConfig


@dataclasses.dataclass(frozen=True)
class LiveIndexConfig:
  """The live index of a run (gin: `live_index.LiveIndexConfig`).

  `search`: how it is searched (backend and its settings).  A background poller loads each new commit every
  `poll_seconds`; `max_failures` consecutive failed reads (after retries) stop the run naming the index.
  `max_staleness` (None: unbounded, as the paper) makes a step wait for the refresh job, for at most
  `wait_seconds`, when the installed index is more than that many steps old.  `bootstrap` (REALM): a fresh run
  embeds and publishes index 0 itself with its starting retriever; `batch_size` is the embedding batch of the
  indexes a run embeds itself (gin: INDEX_BATCH_SIZE, the refresh job's too).
  """

  search: SearchConfig = SearchConfig()
  poll_seconds: float = 5.0
  wait_seconds: float | None = 3600.0
  max_failures: int = 5
  max_staleness: int | None = None
  bootstrap: bool = True
  batch_size: int = 256


@contextlib.contextmanager
def following(live: index_lib.LiveIndex, workdir: storage.PathLike, store: BlockStore,
              config: LiveIndexConfig) -> Iterator[index_lib.IndexPoller]:
  """A started poller installing `<workdir>/index`'s new commits into `live`, closed on exit."""
  poller = live.poller(storage.as_path(workdir) / index_lib.INDEX_DIR, store, config.poll_seconds, config.max_staleness,
                       config.wait_seconds, config.max_failures).start()
  try:
    yield poller
  finally:
    poller.close()
