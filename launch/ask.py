r"""Ask a fine-tuned Open-QA model: the answer, its score and the blocks it was read from.  The checkpoint is the
best by dev exact match when fine-tuning recorded one (<workdir>/dev_eval/), else the newest (logged with why).

  python launch/ask.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin \
    --workdir=workdir/demo/openqa --question="when was the last time anyone was on the moon"
"""

from __future__ import annotations

import json

import gin
from absl import app, flags

from launch import cli, common
from realm_jax import partitioning
from realm_jax.eval.predict import load_predictor
from realm_jax.objectives.openqa import OpenQaSpec

_QUESTIONS = flags.DEFINE_multi_string("question", [], "A question (repeatable).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per question instead of text.")


def main(argv):
  del argv
  if not _QUESTIONS.value:
    raise app.UsageError("give at least one --question")
  common.parse_gin()
  mesh = partitioning.make_mesh(common.MESH_DATA.value, common.MESH_MODEL.value)
  spec = gin.get_configurable(OpenQaSpec)()
  predictor = load_predictor(common.WORKDIR.value, spec, mesh)
  for p in predictor.answer(_QUESTIONS.value):
    if _JSON.value:
      print(json.dumps({"question": p.question, "answer": p.answer, "score": p.score,
                        "probability": p.probability, "block_id": p.block_id,
                        "blocks": [b.__dict__ for b in p.blocks]}, ensure_ascii=False))
      continue
    print(f"Q: {p.question}\nA: {p.answer}   (score {p.score:.2f}, p {p.probability:.3f}, block {p.block_id})")
    for rank, b in enumerate(p.blocks, 1):
      mark = "*" if b.block_id == p.block_id else " "
      print(f" {mark}{rank}. [{b.block_id}] {b.title}  (retrieval score {b.score:.2f})\n      {b.snippet}")
    print()


if __name__ == "__main__":
  cli.run(main)
