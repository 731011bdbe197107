r"""Where the CPU step time goes, side by side in one run: attention layouts, and XLA vs PyTorch matmuls.

  .venv/bin/python bench/cpu_kernels.py --repeats=5 --out=BENCHMARKS.md

(1) One MiniLM-sized attention (batch 32 x 128 tokens, 12 heads of 32), forward and gradient, in the
layout realm-jax used before (einsums with the batch dims in the middle, "bqhd,bkhd->bhqk") and in the
heads-major layout it uses now (`realm_jax.models.bert.SelfAttention`); (2) the six dense matmuls of a
MiniLM layer x 6 layers ([4096, 384] activations) under XLA:CPU and under PyTorch (oneDNN, in
`.venv-ref`), the floor under any encoder comparison with Hugging Face on this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from absl import app, flags
from benchlib import median_time, write_section

_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to update.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per figure (median reported).")
_SIDE = flags.DEFINE_enum("side", "driver", ["driver", "torch"], "driver: run all and write; torch: torch only.")
_REF_PYTHON = flags.DEFINE_string("ref_python", ".venv-ref/bin/python", "Python of the torch venv.")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Where CPU time goes: attention layout, XLA vs PyTorch matmuls (bench/cpu_kernels.py)"
BATCH, LENGTH, HEADS, HEAD_DIM, INTERMEDIATE, LAYERS = 32, 128, 12, 32, 1536, 6
HIDDEN = HEADS * HEAD_DIM
DENSE_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
DENSE_FLOPS = LAYERS * sum(2 * BATCH * LENGTH * a * b for a, b in DENSE_SHAPES)


def torch_side(repeats: int) -> dict:
  import torch

  torch.manual_seed(0)
  x = torch.randn(BATCH * LENGTH, HIDDEN)
  weights = [0.02 * torch.randn(*shape) for shape in DENSE_SHAPES]

  def layers():
    y = x
    for _ in range(LAYERS):
      q, k, v = (y @ w for w in weights[:3])
      y = (((q + k + v) @ weights[3]) @ weights[4]) @ weights[5]
    return y

  with torch.no_grad():
    seconds = median_time(layers, repeats, warmup=2)
  return {"dense_s": seconds, "torch": torch.__version__, "threads": torch.get_num_threads()}


def jax_side(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(BATCH, LENGTH, HEADS, HEAD_DIM)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.random((BATCH, LENGTH)) < 0.9)

  def masked_softmax(scores):
    return jax.nn.softmax(jnp.where(mask[:, None, None, :], scores / np.sqrt(HEAD_DIM), -1e30), axis=-1)

  def batch_dims_in_the_middle(q, k, v):
    probs = masked_softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k))
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

  def heads_major(q, k, v):
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    probs = masked_softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k))
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)

  np.testing.assert_allclose(batch_dims_in_the_middle(q, k, v), heads_major(q, k, v), atol=1e-5)
  attention = {}
  for name, fn in (("before", batch_dims_in_the_middle), ("after", heads_major)):
    forward = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    attention[name] = {
        "forward_s": median_time(lambda f=forward: f(q, k, v).block_until_ready(), repeats, warmup=2),
        "grad_s": median_time(lambda g=grad: jax.block_until_ready(g(q, k, v)), repeats, warmup=2),
    }

  x = jnp.asarray(rng.normal(size=(BATCH * LENGTH, HIDDEN)), jnp.float32)
  weights = [jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32) for shape in DENSE_SHAPES]

  @jax.jit
  def layers(x, weights):
    for _ in range(LAYERS):
      q, k, v = (x @ w for w in weights[:3])
      x = (((q + k + v) @ weights[3]) @ weights[4]) @ weights[5]
    return x

  dense = median_time(lambda: layers(x, weights).block_until_ready(), repeats, warmup=2)
  return {"attention": attention, "dense_s": dense}


def section(ours: dict, theirs: dict, command: str) -> str:
  before, after = ours["attention"]["before"], ours["attention"]["after"]
  return "\n".join([
      SECTION, "",
      f"Command: `{command}` (median of {_REPEATS.value} runs; torch {theirs['torch']} with {theirs['threads']} "
      "threads).", "",
      f"Attention of one MiniLM-sized layer (batch {BATCH} x {LENGTH} tokens, {HEADS} heads of {HEAD_DIM}, padding "
      "mask), XLA:CPU:", "",
      "| layout | forward ms | gradient ms |", "|---|---|---|",
      f"| batch dims in the middle (`bqhd,bkhd->bhqk`; realm-jax before) | {1e3 * before['forward_s']:.1f} | "
      f"{1e3 * before['grad_s']:.1f} |",
      f"| heads-major (`bhqd,bhkd->bhqk`; realm-jax now) | {1e3 * after['forward_s']:.1f} | "
      f"{1e3 * after['grad_s']:.1f} |",
      f"| speed-up | {before['forward_s'] / after['forward_s']:.2f}x | {before['grad_s'] / after['grad_s']:.2f}x |",
      "",
      f"The dense matmuls of {LAYERS} MiniLM layers ([{BATCH * LENGTH}, {HIDDEN}] activations, "
      f"{DENSE_FLOPS / 1e9:.0f} GFLOP), f32:", "",
      "| library | ms | GFLOP/s |", "|---|---|---|",
      f"| XLA:CPU (jax.jit) | {1e3 * ours['dense_s']:.0f} | {DENSE_FLOPS / ours['dense_s'] / 1e9:.0f} |",
      f"| PyTorch (oneDNN) | {1e3 * theirs['dense_s']:.0f} | {DENSE_FLOPS / theirs['dense_s'] / 1e9:.0f} |",
      f"| PyTorch / XLA time | {theirs['dense_s'] / ours['dense_s']:.2f}x | |", "",
  ])


def main(argv):
  del argv
  if _SIDE.value == "torch":
    print(json.dumps(torch_side(_REPEATS.value)))
    return
  ref = REPO / _REF_PYTHON.value
  if not ref.exists():
    raise SystemExit(f"{ref}: no reference venv; create it with tools/reference/setup_ref_venv.sh")
  ours = jax_side(_REPEATS.value)
  result = subprocess.run([str(ref), str(Path(__file__).resolve()), "--side=torch", f"--repeats={_REPEATS.value}"],
                          capture_output=True, text=True, cwd=REPO, check=True)
  theirs = json.loads(result.stdout.strip().splitlines()[-1])
  print(json.dumps({"jax": ours, "torch": theirs}))
  command = "python bench/cpu_kernels.py " + " ".join(sys.argv[1:])
  write_section(REPO / _OUT.value, SECTION, section(ours, theirs, command.strip()))


if __name__ == "__main__":
  app.run(main)
