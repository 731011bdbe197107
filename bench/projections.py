r"""Scale on paper: REALM's schedule projected onto TPU v3/v4/v5p slices and H100s from FLOP counts.

  .venv/bin/python bench/projections.py --out=BENCHMARKS.md

Model FLOPs per step come from the same formulas as `launch/aot_compile.py` (realm_jax.train.aot), for the
paper's shapes (gin/models/bert_base.gin + gin/aot/paper.gin): REALM step at batch 512 x 8 candidates,
refresh-job embedding of 13,353,718 blocks of 288 word pieces.  Time = FLOPs / (devices x peak bf16 x
utilisation), at the assumed utilisations `--utilisation`; `--remat_overhead` scales the train step for
the rematerialised forward pass (XLA FLOPs / model FLOPs of the compiled v3 step, BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import app, flags
from benchlib import write_section

_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to update.")
_UTILISATION = flags.DEFINE_multi_float("utilisation", [0.5, 0.3], "Assumed model FLOP utilisations.")
_REMAT_OVERHEAD = flags.DEFINE_float("remat_overhead", 2.192 / 1.539, "XLA / model FLOPs of the compiled REALM "
                                     "step with every layer rematerialised (v3:4x8 compile, BENCHMARKS.md).")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 13_353_718, "Blocks of one full re-embed (REALM's Wikipedia).")
_WINDOW = flags.DEFINE_integer("window", 500, "Train steps between refreshes in the paper.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200_000, "Train steps of the paper's run.")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Scale on paper: the paper's schedule on TPU slices and H100s (bench/projections.py)"


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  trainer_devices: int
  refresher_devices: int
  peak_flops: float  # bf16 dense, per device
  source: str


def slices() -> list[Slice]:
  from realm_jax.train.aot import CHIPS

  return [
      Slice("TPU v3 (paper: 64 cores train, 16 embed)", 64, 16, CHIPS["v3"].peak_flops, CHIPS["v3"].source),
      Slice("TPU v4 (v4-64: 32 chips; v4-16: 8 chips)", 32, 8, CHIPS["v4"].peak_flops, CHIPS["v4"].source),
      Slice("TPU v5p (v5p-64: 32 chips; v5p-16: 8 chips)", 32, 8, CHIPS["v5p"].peak_flops, CHIPS["v5p"].source),
      Slice("H100 SXM (8 x 8-GPU hosts train, 2 embed)", 64, 16, 989.4e12,
            "NVIDIA H100 datasheet: 989.4 TFLOP/s dense bf16 (SXM)"),
      Slice("H100 SXM (one 8-GPU host train, 2 GPUs embed)", 8, 2, 989.4e12,
            "NVIDIA H100 datasheet: 989.4 TFLOP/s dense bf16 (SXM)"),
  ]


def paper_flops() -> tuple[float, float, int]:
  """(REALM train step model FLOPs, embedding FLOPs per block, batch size) at the paper's shapes."""
  import gin
  import jax

  from realm_jax import partitioning
  from realm_jax.train import aot

  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings(["gin/models/bert_base.gin", "gin/aot/paper.gin"], [])
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  train = aot.realm_step(mesh)
  embed = aot.embedding_step(mesh)
  return train.model_flops, embed.model_flops / embed.items, train.items


def section(train_flops: float, block_flops: float, batch: int) -> str:
  remat, blocks, window = _REMAT_OVERHEAD.value, _NUM_BLOCKS.value, _WINDOW.value
  lines = [
      SECTION, "",
      "Command: `python bench/projections.py` (formulas only; nothing here ran on an accelerator).",
      f"Model FLOPs (realm_jax.train.aot formulas, BERT-base reader and retriever): REALM step at batch {batch} "
      f"x 8 candidates = {train_flops:.3e}; one 288-token block embedded = {block_flops:.3e}, a full re-embed "
      f"of {blocks:,} blocks = {blocks * block_flops:.3e}. The train step is charged x{remat:.2f} for the "
      "rematerialised forward pass (XLA / model FLOPs of the compiled v3:4x8 step); embedding has no backward "
      "pass. Peaks are bf16 dense per device; utilisation (MFU) is an assumption, not a measurement: this "
      "repository's measured MFU is on CPU only (bench/peer_bench.py, bench/index_bench.py).", "",
      "| Slice | Util. | Train step | 500-step window | Full re-embed | Re-embed in train steps | 200k steps |",
      "|---|---|---|---|---|---|---|",
  ]
  for s in slices():
    for u in _UTILISATION.value:
      step = train_flops * remat / (s.trainer_devices * s.peak_flops * u)
      embed = blocks * block_flops / (s.refresher_devices * s.peak_flops * u)
      lines.append(f"| {s.name} | {u:.0%} | {step:.3f} s | {window * step / 60:.1f} min | {embed / 60:.1f} min | "
                   f"{embed / step:,.0f} | {_NUM_STEPS.value * step / 3600:.1f} h |")
  first = slices()[0]
  steps_per_refresh = (blocks * block_flops / first.refresher_devices) / (train_flops * remat / first.trainer_devices)
  lines += ["", "Sources of the peaks: " + "; ".join(sorted({s.source for s in slices()})) + ".", "",
            f"Every row splits trainer:refresher devices 4:1 at equal utilisation, so one full re-embed always spans "
            f"~{steps_per_refresh:,.0f} train steps: a refresh every {window} steps (the paper's rate) needs "
            f"~{steps_per_refresh / window:.1f}x the refresher's compute (more devices, or a cheaper embedding), "
            "whatever the generation.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  train_flops, block_flops, batch = paper_flops()
  text = section(train_flops, block_flops, batch)
  write_section(REPO / _OUT.value, SECTION, text)
  print(text)


if __name__ == "__main__":
  app.run(main)
