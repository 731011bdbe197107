r"""The refresh job's host pipeline alone: blocks/s and peak RSS with a trivial stand-in for the block tower.

  .venv/bin/python bench/refresh_pipeline.py --store=/tmp/blocks/demo --store=/tmp/blocks/small --out=BENCHMARKS.md

(build the stores first: python launch/build_blocks.py --passages=... --entities=... --out=/tmp/blocks/demo).
A pass runs exactly as the refresher's (`realm_jax.refresh.refresher.BlockEmbedder`): inputs built by the
background thread (`BlockStore.retriever_inputs`) and placed on the mesh, the superseded check, the jit step,
the output fetch.  Only the step is a stand-in (`stand_in_step`: next to no device time), so the figure is what
the host can feed.  The target is 10x the blocks/s a v3-16 refresher embeds with the BERT-base tower at 50% of
peak (`v3_16_embed_rate`).  `measure_host_pipeline` is importable (bench/scale.py runs it on a synthetic
13.35M-block store).  On the CPU backend the devices' steps and collectives run on the
same cores as the pipeline, so --devices=1 is the closest to the host pipeline alone; each --devices value has
its own BENCHMARKS.md section.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

from absl import app, flags

_STORES = flags.DEFINE_multi_string("store", [], "Block stores to run over (local directories).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Blocks per batch over the whole mesh (gin INDEX_BATCH_SIZE).")
_BLOCK_LEN = flags.DEFINE_integer("block_len", 288, "Block tower input length.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Fake CPU devices of the mesh (a v3 host has 8 cores; on CPU their "
                                "steps run on the host's own cores).")
_OUT = flags.DEFINE_string("out", None, "Markdown file to update (a BENCHMARKS.md section); none: print only.")


def v3_16_embed_rate(utilisation: float = 0.5, block_len: int = 288) -> float:
  """Blocks/s a v3-16 refresher (16 cores) embeds with the BERT-base tower at `utilisation` of peak bf16."""
  from realm_jax.models.bert import BertConfig
  from realm_jax.train.aot import CHIPS, tower_forward_flops

  return 16 * CHIPS["v3"].peak_flops * utilisation / tower_forward_flops(BertConfig(), 128, 1, block_len)


def stand_in_step(mesh, projection_size: int = 128):
  """(params, jit step) with the embedding step's contract (output sharded as the inputs) and next to no device
  work: per block, the masked sum of its token ids and its body length, projected to `projection_size`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from realm_jax import partitioning

  params = {"proj": np.random.default_rng(0).normal(size=(2, projection_size)).astype(np.float32)}

  def embed(p, b):
    features = jnp.stack([(b["input_ids"] * b["input_mask"]).sum(1), b["segment_ids"].sum(1)], axis=1)
    return features.astype(jnp.float32) @ p["proj"]

  return params, jax.jit(embed, out_shardings=partitioning.data_sharding(mesh, 2))


def measure_host_pipeline(store, batch_size: int = 256, block_len: int = 288, length_bucket: int = 32,
                          prefetch: int = 2, mesh=None, projection_size: int = 128, keep_rows: bool = False) -> dict:
  """One refresher pass over `store` with the stand-in step (compiled beforehand, as a refresher's are after its
  first pass): {blocks, batches, devices, seconds, blocks_per_s, peak_rss_mib (the process's, so far)}; the
  rows this process embedded (`EmbeddedRows`) under "rows" if `keep_rows`.  With several processes, blocks/s
  counts the whole index (every process's rows)."""
  import jax
  import numpy as np

  from realm_jax import partitioning
  from realm_jax.data.features import embedding_batches
  from realm_jax.models.bert import BertConfig
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.refresh.refresher import BlockEmbedder, RefreshConfig

  mesh = mesh or partitioning.make_mesh()
  config = RefreshConfig(RetrieverConfig(BertConfig(), projection_size, block_len=block_len), batch_size=batch_size,
                         length_bucket=length_bucket, prefetch=prefetch)
  params, step = stand_in_step(mesh, projection_size)
  embedder = BlockEmbedder(config, mesh, step)
  batches = embedding_batches(store.retriever_lengths(block_len), batch_size, block_len, length_bucket,
                              jax.process_index(), jax.process_count())
  params = jax.device_put(params, partitioning.replicated(mesh))  # as the pass places them: the same compiled step
  with jax.set_mesh(mesh):
    for length in sorted({n for n, _ in batches}):
      ones = {k: np.ones((embedder.local_batch, length), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
      step(params, partitioning.shard_batch(ones, mesh)).block_until_ready()
  start = time.perf_counter()
  rows = embedder(params, store, desc="host pipeline", abandon=lambda: False)
  seconds = time.perf_counter() - start
  return {"blocks": store.num_blocks, "batches": len(batches), "devices": mesh.size, "seconds": seconds,
          "blocks_per_s": store.num_blocks / seconds,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **({"rows": rows} if keep_rows
                                                                                        else {})}


def measure_input_building(store, batch_size: int = 256, block_len: int = 288, length_bucket: int = 32) -> float:
  """Blocks/s of `BlockStore.retriever_inputs` alone (one thread, no device), over the same batches."""
  from realm_jax.data.features import embedding_batches

  batches = embedding_batches(store.retriever_lengths(block_len), batch_size, block_len, length_bucket)
  start = time.perf_counter()
  for length, ids in batches:
    store.retriever_inputs(ids, length)
  return store.num_blocks / (time.perf_counter() - start)


def main(argv):
  del argv
  os.environ["JAX_NUM_CPU_DEVICES"] = str(_DEVICES.value)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from realm_jax.data.blocks import BlockStore

  section = "## Refresh host pipeline (bench/refresh_pipeline.py)"
  run = f"### {_DEVICES.value} CPU device{'s' if _DEVICES.value > 1 else ''}"
  target = 10 * v3_16_embed_rate()
  command = " ".join(["bench/refresh_pipeline.py", *sys.argv[1:]])
  lines = [f"Command: `.venv/bin/python {command}` ({time.strftime('%Y-%m-%d')}).",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
           f"{os.getloadavg()[0]:.1f}), jax {jax.__version__}, CPU backend, {jax.device_count()} device(s); "
           f"batch {_BATCH.value}, stand-in step.", "",
           f"Target: 10 x the blocks/s a v3-16 refresher embeds (BERT-base tower, {_BLOCK_LEN.value}-token blocks, "
           f"50% of 16 x 61.5 TFLOP/s) = 10 x {target / 10:,.0f} = **{target:,.0f} blocks/s** "
           f"({target / 2:,.0f} per host: each of its 2 hosts builds half of every batch).", "",
           "| store | blocks | inputs | inputs alone, 1 thread | host pipeline | vs target | peak RSS |",
           "|---|---|---|---|---|---|---|"]
  for path in _STORES.value:
    store = BlockStore(path)
    for bucket, inputs in ((32, "length groups (default)"), (0, f"all padded to {_BLOCK_LEN.value}")):
      alone = measure_input_building(store, _BATCH.value, _BLOCK_LEN.value, bucket)
      result = measure_host_pipeline(store, _BATCH.value, _BLOCK_LEN.value, bucket)
      print(path, inputs, f"inputs alone {alone:,.0f} blocks/s", result, flush=True)
      lines.append(f"| {path} | {store.num_blocks:,} | {inputs} | {alone:,.0f} blocks/s | "
                   f"**{result['blocks_per_s']:,.0f} blocks/s** | {result['blocks_per_s'] / target:.2f}x | "
                   f"{result['peak_rss_mib']:,.0f} MiB |")
  text = "\n".join(lines)
  print(text)
  if _OUT.value:
    from benchlib import write_section

    write_section(Path(_OUT.value), section, f"{run}\n\n{text}\n", subsection=run)


if __name__ == "__main__":
  app.run(main)
