r"""Converts REALM checkpoints between Hugging Face format and realm-jax, both ways.

HF -> realm-jax (one safetensors file of realm-jax parameters, with the HF config and unused HF tensors):
  python launch/convert.py --to=jax --hf_dir=$CKPT/realm-cc-news-pretrained-scorer --params=$W/scorer.safetensors

realm-jax -> HF, from such a file or from a run's checkpoint (`--subtree` picks the model inside the trainer's
params: 'retriever' or 'reader,mlm_head' of a REALM pre-training run, '' for ICT or Open-QA; the checkpoint is
`--step`, else an Open-QA run's best by dev exact match when fine-tuning recorded one, else the newest, printed with
why):
  python launch/convert.py --to=hf --params=$W/scorer.safetensors --hf_dir=$OUT/scorer
  python launch/convert.py --to=hf --workdir=$W/realm --subtree=retriever --kind=scorer \
    --like=$CKPT/realm-cc-news-pretrained-scorer --hf_dir=$OUT/scorer

`--like` names the HF directory whose config.json (and unused tensors) the export carries over.  Outputs must be
new (an empty --hf_dir is fine); `--overwrite` replaces only an earlier output of this tool.
"""

from __future__ import annotations

import jax
from absl import app, flags

from launch import cli
from realm_jax.checkpoints import best, hf_realm
from realm_jax.checkpoints.train_dir import TRAIN_DIR, restore_params_subtree

TO = flags.DEFINE_enum("to", None, ["jax", "hf"], "Direction: 'jax' (HF -> realm-jax) or 'hf' (realm-jax -> HF).",
                       required=True)
HF_DIR = flags.DEFINE_string("hf_dir", None, "HF REALM directory (config.json + model.safetensors).", required=True)
PARAMS = flags.DEFINE_string("params", None, "realm-jax parameter file (written by --to=jax).")
KIND = flags.DEFINE_enum("kind", None, sorted(hf_realm.HF_CLASSES), "Checkpoint kind (default: from config.json).")
WORKDIR = flags.DEFINE_string("workdir", None, "--to=hf: export a checkpoint of this run instead.")
STEP = flags.DEFINE_integer("step", None, "--workdir: checkpoint step (default: the best by dev exact match that "
                            "Open-QA fine-tuning recorded, else the newest).")
SUBTREE = flags.DEFINE_list("subtree", [], "--workdir: keys of the model inside the trainer's params.")
LIKE = flags.DEFINE_string("like", None, "--workdir: HF directory giving config.json and unused HF tensors.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier output (a realm-jax parameter file, or an HF "
                              "directory holding only config.json and model.safetensors); anything else is refused.")


def export_step(workdir: str, step: int | None) -> tuple[int, str]:
  """(step, why) of the checkpoint to export: `step` when given, else `best.choose_checkpoint`'s (an Open-QA run's
  best by dev exact match when recorded, else the newest)."""
  if step is not None:
    return step, "given by --step"
  return best.choose_checkpoint(workdir)


def from_workdir() -> hf_realm.HfRealmCheckpoint:
  """The params of a training run, shaped by the `--like` checkpoint's architecture."""
  if not LIKE.value or not KIND.value:
    raise app.UsageError("--workdir needs --like (HF directory of the same architecture) and --kind")
  like = hf_realm.load_hf_realm(LIKE.value, KIND.value)
  train_dir = f"{WORKDIR.value}/{TRAIN_DIR}"
  step, why = export_step(WORKDIR.value, STEP.value)
  share = KIND.value != "scorer" or "block_tower" not in like.params
  shapes = hf_realm.expected_shapes(KIND.value, like.architecture, share)
  abstract = {}
  for path, shape in shapes.items():
    node = abstract
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, jax.numpy.float32)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if len(SUBTREE.value) > 1:  # several siblings, e.g. the reader and MLM head of a REALM run
    params = {key: restore_params_subtree(train_dir, step, (key,), abstract[key], sharding) for key in SUBTREE.value}
  else:
    params = restore_params_subtree(train_dir, step, tuple(SUBTREE.value), abstract, sharding)
  print(f"{train_dir}: step {step}: {why}")
  return hf_realm.HfRealmCheckpoint(KIND.value, like.architecture, jax.device_get(params), like.passthrough,
                                    like.hf_config)


def main(argv):
  del argv
  if TO.value == "jax":
    if not PARAMS.value:
      raise app.UsageError("--to=jax needs --params (the file to write)")
    hf_realm.check_params_destination(PARAMS.value, OVERWRITE.value)  # before loading anything
    checkpoint = hf_realm.load_hf_realm(HF_DIR.value, KIND.value, with_block_emb=True)
    out = hf_realm.save_params_file(PARAMS.value, checkpoint, OVERWRITE.value)
    print(f"{HF_DIR.value} ({checkpoint.kind}) -> {out}")
    return
  hf_realm.check_hf_destination(HF_DIR.value, OVERWRITE.value)
  if WORKDIR.value:
    checkpoint = from_workdir()
  elif PARAMS.value:
    checkpoint = hf_realm.load_params_file(PARAMS.value)
  else:
    raise app.UsageError("--to=hf needs --params or --workdir")
  out = hf_realm.save_hf_realm(HF_DIR.value, checkpoint.kind, checkpoint.architecture, checkpoint.params,
                               checkpoint.passthrough, checkpoint.hf_config, OVERWRITE.value)
  print(f"{checkpoint.kind} -> {out}")


if __name__ == "__main__":
  cli.run(main)
