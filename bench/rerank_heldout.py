r"""Re-ranking the stale index (`realm.RealmSpec.rerank_depth`): its host cost per batch and its held-out MLM effect.

  python bench/rerank_heldout.py --gin_file=gin/models/minilm.gin \
    --gin_file=gin/experiments/rerank_stale_index_demo.gin --workdir=workdir/rerank/stale --rerank_depth=32

Loads the newest checkpoint of a finished REALM run (`--workdir`, trained with the run gin given) and its newest
index, then, side by side with the same parameters and index: (1) the median time of `RealmRun.complete` (query
embedding, search, candidates; with re-ranking also the block tower on the top L) on the first held-out batch,
without and with re-ranking; (2) the held-out MLM evaluation (`eval.realm_mlm`, the run's fixed held-out queries)
without and with re-ranking, and their paired difference over queries.  Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import gin
import numpy as np
from absl import app, flags

from realm_jax import partitioning
from realm_jax.checkpoints.init import load_realm_run
from realm_jax.data.realm import MaskedQueries
from realm_jax.eval import realm_mlm
from realm_jax.objectives.realm import RealmSpec
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.index import INDEX_DIR
from realm_jax.train.pretrain import RealmRun

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "The run's gin files.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "The run's gin bindings.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished REALM pre-training run.", required=True)
_RERANK_DEPTH = flags.DEFINE_integer("rerank_depth", 32, "Blocks re-ranked per query (RealmSpec.rerank_depth).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per setting (median reported).")

REPO = Path(__file__).resolve().parents[1]


def main(argv):
  del argv
  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings(_GIN_FILES.value, _GIN_BINDINGS.value)
  spec = gin.get_configurable(RealmSpec)()
  mesh = partitioning.make_mesh()
  store = spec.store()
  query_store = spec.query_block_store(store)
  names = ("retriever", "reader", "mlm_head")
  trees, step = load_realm_run(_WORKDIR.value, spec.model(), names)
  index_dir = f"{_WORKDIR.value}/{INDEX_DIR}"
  index_step = index_lib.committed_steps(index_dir)[-1]
  _, searcher = index_lib.load_searcher(index_dir, index_step, store, mesh)
  batches = MaskedQueries(query_store, spec.data).eval_batches(spec.data.batch_size)
  result = {"workdir": _WORKDIR.value, "checkpoint_step": step, "index_step": index_step,
            "held_out_queries": int(sum((b["mlm_weights"].sum(-1) > 0).sum() for b in batches)),
            "batch_size": spec.data.batch_size, "num_candidates": spec.data.num_candidates,
            "rerank_depth": _RERANK_DEPTH.value}
  evaluations = {}
  for name, depth in (("stale", 0), ("rerank", _RERANK_DEPTH.value)):
    run = RealmRun(dataclasses.replace(spec, rerank_depth=depth), store, mesh, query_store=query_store)
    run.live.searcher = searcher
    complete = functools.partial(run.complete, exclude_trivial=True)
    complete(trees, batches[0])  # compiles
    seconds = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      complete(trees, batches[0])
      seconds.append(time.perf_counter() - start)
    result[f"{name}_batch_seconds"] = float(np.median(seconds))
    held_out = realm_mlm.HeldOutMlm(run.model, mesh, batches, complete)
    evaluations[name] = {"step": step, **held_out.per_query(trees)}
    result[f"{name}_heldout_loss"] = float(-evaluations[name]["log_likelihood"].sum()
                                           / evaluations[name]["num_masks"].sum())
    result[f"{name}_span_retrieved"] = float(evaluations[name]["span_retrieved"].mean())
  result["cost_ratio"] = result["rerank_batch_seconds"] / result["stale_batch_seconds"]
  result["paired"] = realm_mlm.paired_difference(evaluations["rerank"], evaluations["stale"])
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
