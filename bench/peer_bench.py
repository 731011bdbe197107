r"""realm-jax vs Hugging Face transformers REALM (PyTorch, CPU): reader step and candidate scoring.

  bash tools/reference/setup_ref_venv.sh   # .venv-ref: torch 2.13 CPU + transformers 4.57.1
  .venv/bin/python bench/peer_bench.py --out=BENCHMARKS.md

Same model sizes (tiny; MiniLM-sized), same batch, same candidates, dropout off on both sides:
- reader step: forward + backward of the knowledge-augmented encoder's marginal MLM loss given the
  candidate scores (HF `RealmKnowledgeAugEncoder`; realm-jax `BertEncoder` + `MlmHead` + `marginal_loss`),
- scoring: query and candidate embeddings and their inner products (HF `RealmScorer`; realm-jax `DualEncoder`).
The HF side runs in `.venv-ref` as a subprocess (`--side=hf`) and prints JSON.  Medians of `--repeats`.
Model FLOP utilisation = FLOPs per step (XLA cost analysis; a formula beside it) / time / measured
f32 matmul FLOP/s of this machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from absl import app, flags
from benchlib import matmul_flops, median_time, write_section

_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to update.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per figure (median reported).")
_SIDE = flags.DEFINE_enum("side", "driver", ["driver", "hf"], "driver: run both and write; hf: HF side only.")
_SIZE = flags.DEFINE_string("size", None, "hf side: one of SIZES.")
_REF_PYTHON = flags.DEFINE_string("ref_python", ".venv-ref/bin/python", "Python of the torch + transformers venv.")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## realm-jax vs Hugging Face REALM (bench/peer_bench.py)"
SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (128, 2, 2, 512),
    "minilm": (384, 6, 12, 1536),
}
VOCAB = 30522
BATCH, CANDIDATES, QUERY_LEN, BLOCK_LEN, JOINT_LEN, MASKS = 4, 4, 48, 128, 176, 10


def inputs(seed: int = 0) -> dict:
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = lambda *shape: rng.integers(1000, VOCAB, size=shape).astype(np.int64)  # noqa: E731
  positions = np.stack([np.sort(rng.choice(np.arange(1, QUERY_LEN - 1), MASKS, replace=False)) for _ in range(BATCH)])
  return {
      "query_ids": ids(BATCH, QUERY_LEN), "block_ids": ids(BATCH, CANDIDATES, BLOCK_LEN),
      "joint_ids": ids(BATCH, CANDIDATES, JOINT_LEN), "scores": rng.normal(size=(BATCH, CANDIDATES)),
      "mask_positions": positions, "mask_ids": ids(BATCH, MASKS),
  }


# ---- Hugging Face side (runs in .venv-ref) ------------------------------------------------------------------------

def hf_side(size: str, repeats: int) -> dict:
  import torch
  from transformers.models.deprecated.realm import RealmConfig, RealmKnowledgeAugEncoder, RealmScorer

  torch.set_num_threads(os.cpu_count())
  hidden, layers, heads, inter = SIZES[size]
  config = RealmConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=inter, hidden_act="gelu", num_candidates=CANDIDATES, retriever_proj_size=128,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  x = inputs()
  joint = torch.tensor(x["joint_ids"])
  labels = torch.full((BATCH, JOINT_LEN), -100, dtype=torch.long)
  for b in range(BATCH):
    labels[b, torch.tensor(x["mask_positions"][b])] = torch.tensor(x["mask_ids"][b])
  encoder = RealmKnowledgeAugEncoder(config).eval()
  scores = torch.tensor(x["scores"], dtype=torch.float32)

  def reader_step():
    encoder.zero_grad(set_to_none=True)
    loss = encoder(input_ids=joint, attention_mask=torch.ones_like(joint), token_type_ids=torch.zeros_like(joint),
                   relevance_score=scores, labels=labels, mlm_mask=(labels != -100).long()).loss
    loss.backward()

  scorer = RealmScorer(config).eval()
  query, blocks = torch.tensor(x["query_ids"]), torch.tensor(x["block_ids"])

  def score():
    with torch.no_grad():
      scorer(input_ids=query, attention_mask=torch.ones_like(query), candidate_input_ids=blocks,
             candidate_attention_mask=torch.ones_like(blocks)).relevance_score.numpy()

  return {"reader_step": median_time(reader_step, repeats, warmup=2), "scoring": median_time(score, repeats, warmup=2),
          "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---- realm-jax side ------------------------------------------------------------------------------------------------

def jax_side(size: str, repeats: int) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from realm_jax.models.bert import BertConfig, BertEncoder, MlmHead
  from realm_jax.models.retriever import DualEncoder
  from realm_jax.objectives.realm import marginal_loss

  hidden, layers, heads, inter = SIZES[size]
  config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      intermediate_size=inter, hidden_dropout=0.0, attention_dropout=0.0)
  x = {k: jnp.asarray(v, jnp.float32 if k == "scores" else jnp.int32) for k, v in inputs().items()}
  joint = x["joint_ids"].reshape(BATCH * CANDIDATES, JOINT_LEN)

  class Reader(nn.Module):
    @nn.compact
    def __call__(self, ids, positions):
      encoder = BertEncoder(config, name="encoder")
      states, _ = encoder(ids, jnp.ones_like(ids), jnp.zeros_like(ids), True)
      at_masks = jnp.take_along_axis(states, positions[..., None], axis=1)
      table = encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
      return jax.nn.log_softmax(MlmHead(config, name="mlm_head")(at_masks, nn.meta.unbox(table)), axis=-1)

  reader = Reader()
  positions = jnp.repeat(x["mask_positions"], CANDIDATES, axis=0)
  params = nn.meta.unbox(reader.init(jax.random.key(0), joint, positions)["params"])

  def loss(p):
    log_probs = reader.apply({"params": p}, joint, positions).reshape(BATCH, CANDIDATES, MASKS, VOCAB)
    return marginal_loss(x["scores"], log_probs, x["mask_ids"], jnp.ones((BATCH, MASKS)))[0]

  reader_step = jax.jit(jax.grad(loss))
  reader_flops = reader_step.lower(params).compile().cost_analysis()["flops"]

  dual = DualEncoder(config, 128)
  ones = lambda a: jnp.ones_like(a)  # noqa: E731
  q = {"input_ids": x["query_ids"], "input_mask": ones(x["query_ids"]), "segment_ids": 0 * x["query_ids"]}
  flat_blocks = x["block_ids"].reshape(-1, BLOCK_LEN)
  bl = {"input_ids": flat_blocks, "input_mask": ones(flat_blocks), "segment_ids": 0 * flat_blocks}
  dual_params = nn.meta.unbox(dual.init(jax.random.key(1), q, bl)["params"])

  @jax.jit
  def score(p):
    query_emb, block_emb = dual.apply({"params": p}, q, bl)
    return jnp.einsum("bd,bkd->bk", query_emb, block_emb.reshape(BATCH, CANDIDATES, -1))

  scoring_flops = score.lower(dual_params).compile().cost_analysis()["flops"]
  return {
      "reader_step": median_time(lambda: jax.block_until_ready(reader_step(params)), repeats, warmup=2),
      "scoring": median_time(lambda: score(dual_params).block_until_ready(), repeats, warmup=2),
      "flops_xla": {"reader_step": reader_flops, "scoring": scoring_flops},
      "flops_formula": {"reader_step": reader_step_flops(config), "scoring": scoring_flops_formula(config)},
  }


def encoder_forward_flops(hidden: int, layers: int, inter: int, length: int) -> float:
  return layers * (2 * length * (4 * hidden * hidden + 2 * hidden * inter) + 4 * length * length * hidden)


def reader_step_flops(config) -> float:
  """Forward + backward = 3 x forward: encoder over every joint sequence, MLM head at the masks only."""
  h, v = config.hidden_size, config.vocab_size
  encoder = encoder_forward_flops(h, config.num_layers, config.intermediate_size, JOINT_LEN)
  head = MASKS * (2 * h * h + 2 * h * v)
  return 3 * BATCH * CANDIDATES * (encoder + head)


def scoring_flops_formula(config) -> float:
  h, layers, inter = config.hidden_size, config.num_layers, config.intermediate_size
  return (BATCH * encoder_forward_flops(h, layers, inter, QUERY_LEN)
          + BATCH * CANDIDATES * encoder_forward_flops(h, layers, inter, BLOCK_LEN))


def section(rows: list[dict], peak: float, hf_meta: dict, command: str) -> str:
  lines = [
      SECTION, "",
      f"Command: `{command}` (median of {_REPEATS.value} runs; JAX {__import__('jax').__version__}, "
      f"torch {hf_meta['torch']} with {hf_meta['threads']} threads, transformers 4.57.1; "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores).",
      f"Batch {BATCH} queries x {CANDIDATES} candidates; query {QUERY_LEN}, block {BLOCK_LEN}, joint {JOINT_LEN}; "
      f"{MASKS} masks; f32; dropout off.  Measured f32 matmul peak of this machine: {peak / 1e9:.0f} GFLOP/s.",
      "", "| size | measure | realm-jax ms/example | HF REALM ms/example | HF / realm-jax | realm-jax GFLOP "
      "(XLA / formula) | realm-jax MFU |", "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['size']} | {r['measure']} | {1e3 * r['jax'] / BATCH:.2f} | {1e3 * r['hf'] / BATCH:.2f} | "
        f"{r['hf'] / r['jax']:.2f}x | {r['flops_xla'] / 1e9:.1f} / {r['flops_formula'] / 1e9:.1f} | "
        f"{100 * r['flops_xla'] / r['jax'] / peak:.0f}% |")
  lines += ["", "HF's knowledge-augmented encoder computes MLM logits at every position of every candidate "
            "(B x K x L x V) before picking the masked ones; realm-jax gathers the masked positions first "
            "(B x K x M x V), as the released TF code does.  The FLOP columns count realm-jax's own step.  "
            "Scoring is a plain encoder forward on both sides, so it is bounded by each library's f32 matmul "
            "kernels: PyTorch's oneDNN against XLA:CPU's, compared on identical shapes by bench/cpu_kernels.py "
            "(next section).", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if _SIDE.value == "hf":
    print(json.dumps(hf_side(_SIZE.value, _REPEATS.value)))
    return
  ref = REPO / _REF_PYTHON.value
  if not ref.exists():
    raise SystemExit(f"{ref}: no reference venv; create it with tools/reference/setup_ref_venv.sh")
  rows, hf_meta = [], {}
  peak = matmul_flops(_REPEATS.value)
  for size in SIZES:
    ours = jax_side(size, _REPEATS.value)
    result = subprocess.run([str(ref), str(Path(__file__).resolve()), "--side=hf", f"--size={size}",
                             f"--repeats={_REPEATS.value}"], capture_output=True, text=True, cwd=REPO, check=True)
    hf_meta = json.loads(result.stdout.strip().splitlines()[-1])
    for measure in ("reader_step", "scoring"):
      rows.append({"size": size, "measure": measure.replace("_", " "), "jax": ours[measure], "hf": hf_meta[measure],
                   "flops_xla": ours["flops_xla"][measure], "flops_formula": ours["flops_formula"][measure]})
      print(json.dumps(rows[-1]))
  command = "python bench/peer_bench.py " + " ".join(a for a in sys.argv[1:])
  write_section(REPO / _OUT.value, SECTION, section(rows, peak, hf_meta, command.strip()))


if __name__ == "__main__":
  app.run(main)
