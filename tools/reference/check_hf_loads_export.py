"""Checks that Hugging Face REALM loads what realm-jax exports and reproduces the reference outputs.

Export the reference checkpoints with realm-jax first (no passthrough tensors, as after training here):

  python launch/convert.py --to=jax --hf_dir=tests/data/realm_reference/reader --params=/tmp/x/reader.st
  python launch/convert.py --to=hf --params=/tmp/x/reader.st --hf_dir=/tmp/x/reader     (same for scorer, encoder)
  .venv-ref/bin/python tools/reference/check_hf_loads_export.py /tmp/x

Passthrough-free exports lack only the MLM heads HF's RealmEmbedder/RealmReader never use (HF initialises them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
from transformers.models.deprecated.realm import RealmKnowledgeAugEncoder, RealmReader, RealmScorer

REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "data" / "realm_reference" / "outputs.npz"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("export_dir", type=Path, help="holds scorer/, encoder/ and reader/ exported by realm-jax")
  root = parser.parse_args().export_dir
  ref = np.load(REFERENCE, allow_pickle=False)
  ids = lambda k: torch.from_numpy(ref[k].astype(np.int64))  # noqa: E731
  sizes = {"num_candidates": ref["relevance_score"].shape[1], "reader_beam_size": len(ref["reader_relevance_score"]),
           "searcher_beam_size": len(ref["reader_relevance_score"])}
  results = {}
  for cls, kind in ((RealmScorer, "scorer"), (RealmKnowledgeAugEncoder, "encoder"), (RealmReader, "reader")):
    model, info = cls.from_pretrained(str(root / kind), output_loading_info=True, **sizes)
    missing = [k for k in info["missing_keys"] if ".cls.predictions." not in f".{k}" or kind == "encoder"]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
      raise SystemExit(f"{kind}: HF could not load every tensor: {info}")
    model.eval()
    with torch.no_grad():
      if kind == "scorer":
        out = model(input_ids=ids("query_input_ids"), attention_mask=ids("query_input_mask"),
                    token_type_ids=ids("query_segment_ids"), candidate_input_ids=ids("block_input_ids"),
                    candidate_attention_mask=ids("block_input_mask"), candidate_token_type_ids=ids("block_segment_ids"))
        results[kind] = (out.relevance_score.numpy(), ref["relevance_score"])
      elif kind == "encoder":
        out = model(input_ids=ids("joint_input_ids"), attention_mask=ids("joint_input_mask"),
                    token_type_ids=ids("joint_segment_ids"), relevance_score=torch.from_numpy(ref["relevance_score"]),
                    labels=ids("mlm_labels"), mlm_mask=ids("mlm_mask"))
        results[kind] = (out.loss.numpy(), ref["mlm_loss"])
      else:
        out = model(input_ids=ids("reader_input_ids"), attention_mask=ids("reader_input_mask"),
                    token_type_ids=ids("reader_segment_ids"),
                    relevance_score=torch.from_numpy(ref["reader_relevance_score"]),
                    block_mask=ids("reader_block_mask").bool(), start_positions=ids("reader_gold_starts"),
                    end_positions=ids("reader_gold_ends"), has_answers=torch.from_numpy(ref["reader_has_answers"]))
        results[kind] = (out.loss.numpy(), ref["reader_loss"])
  for kind, (got, want) in results.items():
    print(f"{kind}: max |HF(export) - reference| = {np.abs(got - want).max():.3g}")
    if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
      raise SystemExit(f"{kind}: HF on the exported checkpoint does not reproduce the reference")


if __name__ == "__main__":
  main()
