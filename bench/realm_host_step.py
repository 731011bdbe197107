r"""Per-step host work of REALM pre-training: the per-example loops before, the vectorised numpy functions now.

  .venv/bin/python bench/realm_host_step.py --repeats=5 --synthetic_blocks=2000000

Times `select_candidates`, `candidate_inputs` and `span_in_candidates` (`realm_jax.data.realm`) at the paper's
lengths (query 96, block 288, joint 384) for 64 x 8 and 512 x 8 (queries x candidates), on the demo block store
(built under workdir/bench/demo/blocks if absent) and on an in-memory synthetic store of `--synthetic_blocks`
full-length random blocks (`0`: none), against the per-example reference loops of tests/reference_realm_data.py.
Prints one markdown row per store and shape: milliseconds per call (medians of `--repeats`), old -> new, and
the speed-up of the three together; the outputs are checked identical first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from benchlib import median_time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import reference_realm_data as reference  # noqa: E402

from realm_jax.data import realm  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per figure (median reported).")
_SYNTHETIC = flags.DEFINE_integer("synthetic_blocks", 2_000_000, "Blocks of the synthetic store (0: none).")
SHAPES = [(64, 8), (512, 8)]
CONFIG = realm.RealmDataConfig()  # the paper's lengths


class SyntheticStore:
  """CSR arrays of random blocks as long as the packer makes them: titles of 1-19 pieces, the body the rest of 288."""

  def __init__(self, num_blocks: int, rng: np.random.Generator):
    title_len = rng.integers(1, 20, num_blocks)
    body_len = CONFIG.block_len - 3 - title_len
    offsets = lambda lengths: np.concatenate([[0], np.cumsum(lengths)])  # noqa: E731
    self.num_blocks = num_blocks
    self.manifest = {"special_ids": {"cls": 101, "sep": 102}}
    self.arrays = {
        "title_ids": rng.integers(1000, 30000, int(title_len.sum()), dtype=np.int32),
        "title_offsets": offsets(title_len),
        "body_ids": rng.integers(1000, 30000, int(body_len.sum()), dtype=np.int32),
        "body_offsets": offsets(body_len),
        "uids": rng.integers(0, 256, (num_blocks, 20), dtype=np.uint8),
    }

  def _slice(self, name: str, i: int) -> np.ndarray:
    o = self.arrays[f"{name}_offsets"]
    return self.arrays[f"{name}_ids"][o[i] : o[i + 1]]

  def title_ids(self, i: int) -> np.ndarray:
    return self._slice("title", i)

  def body_ids(self, i: int) -> np.ndarray:
    return self._slice("body", i)


def host_step(module, store, inputs: dict[str, np.ndarray], k: int):
  """What `RealmRun.complete` does on the host after the search, with `module`'s three functions."""
  candidates, weights = module.select_candidates(inputs["retrieved"], inputs["source"], store.arrays["uids"], k)
  blocks, joint = module.candidate_inputs(store, candidates, inputs["query_input_ids"], CONFIG)
  return candidates, weights, blocks, joint, module.span_in_candidates(joint, inputs["mlm_ids"], inputs["mlm_weights"])


def random_inputs(store, batch: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Retrieved ids (the source block among them, as a live index returns it), queries of 10-94 pieces, scored
  spans of 1-10 pieces (half of them copied from a retrieved body)."""
  source = rng.integers(0, store.num_blocks, batch)
  retrieved = rng.integers(0, store.num_blocks, (batch, k))
  retrieved[:, 0] = source
  queries = np.zeros((batch, CONFIG.query_len), np.int32)
  mlm_ids = rng.integers(1000, 30000, (batch, CONFIG.max_masks)).astype(np.int32)
  mlm_weights = np.zeros((batch, CONFIG.max_masks), np.float32)
  for b in range(batch):
    length, span = int(rng.integers(10, CONFIG.query_len - 1)), int(rng.integers(1, CONFIG.max_masks + 1))
    queries[b, : length + 2] = [101, *rng.integers(1000, 30000, length), 102]
    if b % 2:
      mlm_ids[b, :span] = store.body_ids(int(retrieved[b, 1]))[:span]
    mlm_weights[b, :span] = 1.0
  return {"retrieved": retrieved, "source": source, "query_input_ids": queries, "mlm_ids": mlm_ids,
          "mlm_weights": mlm_weights}


def demo_store():
  from realm_jax.data.blocks import BlockStore, build_block_store
  from realm_jax.data.corpus import read_documents
  from realm_jax.data.tokenization import WordPieceTokenizer, minilm_dir

  store_dir = REPO / "workdir/bench/demo/blocks"
  if not (store_dir / "manifest.json").exists():
    demo = REPO / "data/demo"
    build_block_store(read_documents(demo / "passages.jsonl", demo / "entities_spacy_en_core_web_sm_3.8.0.jsonl"),
                      store_dir, WordPieceTokenizer(minilm_dir() / "vocab.txt"), "demo")
  return BlockStore(store_dir)


def timings(store, batch: int, k: int, rng: np.random.Generator, repeats: int) -> dict[tuple[str, str], float]:
  """{(function, "old" or "new"): ms per call} at `batch` queries x `k` candidates, once the outputs agree."""
  inputs = random_inputs(store, batch, k, rng)
  old, new = host_step(reference, store, inputs, k), host_step(realm, store, inputs, k)
  for a, b in zip(old[:2] + old[4:], new[:2] + new[4:], strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(old[2:4], new[2:4], strict=True):
    for feature in realm.FEATURES:
      np.testing.assert_array_equal(a[feature], b[feature])
  candidates, _, _, joint, _ = new
  calls = {
      "select": lambda m: m.select_candidates(inputs["retrieved"], inputs["source"], store.arrays["uids"], k),
      "inputs": lambda m: m.candidate_inputs(store, candidates, inputs["query_input_ids"], CONFIG),
      "span": lambda m: m.span_in_candidates(joint, inputs["mlm_ids"], inputs["mlm_weights"]),
      "all": lambda m: host_step(m, store, inputs, k),
  }
  return {(key, side): 1e3 * median_time(lambda f=f, m=m: f(m), repeats)
          for key, f in calls.items() for side, m in (("old", reference), ("new", realm))}


def main(argv):
  del argv
  repeats = _REPEATS.value
  rng = np.random.default_rng(0)
  stores = [("demo", demo_store())]
  if _SYNTHETIC.value:
    start = time.perf_counter()
    stores.append((f"synthetic {_SYNTHETIC.value:,}", SyntheticStore(_SYNTHETIC.value, rng)))
    print(f"synthetic store built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  print(f"{os.cpu_count()} cores; ms per call, medians of {repeats}; old (per-example loops) -> new (vectorised)\n")
  print("| store | queries x candidates | select_candidates | candidate_inputs | span_in_candidates | all three | "
        "speed-up |")
  print("|---|---|---|---|---|---|---|")
  for name, store in stores:
    for batch, k in SHAPES:
      ms = timings(store, batch, k, rng, repeats)
      cells = " | ".join(f"{ms[key, 'old']:.1f} -> {ms[key, 'new']:.1f}" for key in ("select", "inputs", "span", "all"))
      print(f"| {name} | {batch} x {k} | {cells} | {ms['all', 'old'] / ms['all', 'new']:.0f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
