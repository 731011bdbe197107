"""Index backends: how a published index is searched, one protocol, looked up by name in `BACKENDS`.

A backend writes its assets beside an index's embedding parts when the index is published (process 0, after
every part is written, under `<data folder>/<name>/`: ScaNN's serialized searcher; "exact" and "approx_max_k"
write none), and loads a searcher from a verified index and a local copy of those assets.  The commit records the
name of the backend that wrote it; a backend that writes no assets searches any commit, one that does needs a
commit of its own (`index.LiveIndex` refuses others).  A loaded searcher's `with_index` is the searcher over the
next index of the same shape without recompiling (the trainer's hot swap).  Every job selects its backend with
`mips.SearchConfig.backend` (gin).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from realm_jax import partitioning
from realm_jax.errors import InputError
from realm_jax.retrieval.mips import ExactSearcher, ScannSearcher, SearchConfig


class Searcher(Protocol):
  """Top-k maximum inner product search over one index of `num_blocks` rows."""

  num_blocks: int

  def search(self, queries: np.ndarray | jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, k] int32, scores [B, k] float32) of the best `k` blocks per query, best first."""
    ...

  def with_index(self, embeddings: np.ndarray, assets: Path | None) -> Searcher:
    """The searcher over another index of the same shape (and its local assets), reusing what is compiled."""
    ...


class IndexBackend(Protocol):
  """Writes an index's search assets at publish time and loads its searcher."""

  name: str  # recorded in the commit; the folder of its assets
  writes_assets: bool

  def write_assets(self, embeddings: np.ndarray, directory: Path) -> None:
    """Writes the assets of index `embeddings` (all rows) into the local folder `directory`."""
    ...

  def load(self, embeddings: np.ndarray, assets: Path | None, mesh: Mesh,
           rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> Searcher:
    """The searcher of index `embeddings`, from a local copy of its assets (None for a backend that writes none)."""
    ...


@dataclasses.dataclass(frozen=True)
class DeviceBackend:
  """Brute force on the mesh (`mips.ExactSearcher`): each shard's top-k exact ("exact") or by `lax.approx_max_k`
  ("approx_max_k"), the rows placed by the rules table's "docs" entry.  No assets: it searches any commit."""

  config: SearchConfig
  writes_assets: ClassVar[bool] = False

  @property
  def name(self) -> str:
    return self.config.backend

  def write_assets(self, embeddings: np.ndarray, directory: Path) -> None:
    """None: the embedding parts are the whole index."""

  def load(self, embeddings: np.ndarray, assets: Path | None, mesh: Mesh,
           rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> ExactSearcher:
    return ExactSearcher(embeddings, mesh, self.config, rules)


@dataclasses.dataclass(frozen=True)
class ScannBackend:
  """ScaNN on host (`mips.ScannSearcher`), built with `config.scann` by the publisher; searches only commits that
  carry ScaNN assets."""

  config: SearchConfig
  name: ClassVar[str] = "scann"
  writes_assets: ClassVar[bool] = True

  def write_assets(self, embeddings: np.ndarray, directory: Path) -> None:
    ScannSearcher.build(embeddings, self.config.scann).serialize(directory)

  def load(self, embeddings: np.ndarray, assets: Path | None, mesh: Mesh,
           rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES) -> ScannSearcher:
    if assets is None:
      raise InputError("backend 'scann' needs the index's ScaNN assets")
    return ScannSearcher.load(assets, len(embeddings))


BACKENDS: dict[str, Callable[[SearchConfig], IndexBackend]] = {
    "exact": DeviceBackend,
    "approx_max_k": DeviceBackend,
    "scann": ScannBackend,
}


def get_backend(config: SearchConfig) -> IndexBackend:
  """The backend `config.backend` names, configured by `config`."""
  if config.backend not in BACKENDS:
    raise InputError(f"unknown index backend {config.backend!r}; the backends are "
                     f"{', '.join(repr(name) for name in BACKENDS)}")
  return BACKENDS[config.backend](config)


EXACT: IndexBackend = get_backend(SearchConfig())
