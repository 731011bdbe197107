r"""Compiles the train and embedding steps for a TPU topology without TPU hardware; reports memory and FLOPs.

  pip install "jax[tpu]==0.10.2"   # libtpu: the TPU compiler, runs on a CPU host
  python launch/aot_compile.py --gin_file=gin/models/bert_base.gin --gin_file=gin/aot/paper.gin \
    --topology=v3:4x8 --embed_topology=v3:2x4 --steps=realm --steps=ict --steps=embed

Prints per device the argument, temporary and output bytes against the chip's HBM, XLA's FLOPs per
step beside the model FLOPs by formula, and the step time at the chip's peak bf16 FLOP/s and at 50%.
With both `realm` and `embed`, also the time of one full re-embed of `--num_blocks` in train steps.
Exits with an error naming the topology and the shortfall when a step does not fit.
"""

from __future__ import annotations

import sys

from absl import flags

from launch import cli
from realm_jax.train import aot

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files: model gin, then gin/aot/paper.gin.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings.")
_TOPOLOGY = flags.DEFINE_string("topology", "v3:4x8", "TPU topology of the trainer, e.g. v3:4x8, v4:4x4x2, v5p:4x4x2.")
_EMBED_TOPOLOGY = flags.DEFINE_string("embed_topology", None, "Topology of the refresh job (default: --topology).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Size of the 'data' mesh axis (-1: all remaining devices).")
_MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "Size of the 'model' mesh axis.")
_STEPS = flags.DEFINE_multi_enum("steps", ["realm"], sorted(aot.STEPS), "Steps to compile.")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 13_353_718, "Blocks of one full re-embed (REALM's Wikipedia).")
_NUM_TRAIN_STEPS = flags.DEFINE_integer("num_train_steps", 200_000, "Train steps of the run (paper: 200k).")
_REFRESH_EVERY = flags.DEFINE_integer("refresh_every", 500, "The paper's refresh interval in train steps.")



def main(argv):
  del argv
  cli.parse_gin(_GIN_FILES.value, _GIN_BINDINGS.value)
  reports = {}
  for name in _STEPS.value:
    topology = _EMBED_TOPOLOGY.value if name == "embed" and _EMBED_TOPOLOGY.value else _TOPOLOGY.value
    mesh_data, mesh_model = (_MESH_DATA.value, _MESH_MODEL.value) if topology == _TOPOLOGY.value else (-1, 1)
    mesh, chip = aot.topology_mesh(topology, mesh_data, mesh_model)
    try:
      reports[name] = aot.compile_step(aot.STEPS[name](mesh), topology, mesh, chip)
    except aot.DoesNotFitError as e:
      sys.exit(f"error: {e}")
    print(reports[name].text(), flush=True)
  if "realm" in reports and "embed" in reports:
    print(aot.refresh_schedule(reports["realm"], reports["embed"], _NUM_BLOCKS.value, _NUM_TRAIN_STEPS.value,
                               _REFRESH_EVERY.value))


if __name__ == "__main__":
  cli.run(main)
