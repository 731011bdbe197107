#!/usr/bin/env bash
# Every CPU benchmark of BENCHMARKS.md, in one command (about an hour on 2 cores):
#   bash bench/run.sh            # REPEATS=5 by default; medians of REPEATS runs
# (1) index refresh and MIPS (matmul peak, re-embedding padded vs length-grouped, ScaNN / exact / FAISS),
# (2) realm-jax vs Hugging Face REALM (reader step, scoring, MFU; HF in its own venv .venv-ref),
# (3) where CPU time goes (attention layout before/after, XLA vs PyTorch matmuls on the same shapes),
# (4) the paper's schedule projected on TPU slices and H100s.  The TPU compiles of issue #9 are separate
# (launch/aot_compile.py; each paper-scale compile takes 10-40 minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS="${REPEATS:-5}"
bash scripts/setup_venv.sh
bash tools/reference/setup_ref_venv.sh
.venv/bin/pip install -q faiss-cpu==1.15.1
export JAX_PLATFORMS=cpu
.venv/bin/python bench/index_bench.py --repeats="$REPEATS" --synthetic_rows=1000000
.venv/bin/python bench/peer_bench.py --repeats="$REPEATS"
.venv/bin/python bench/cpu_kernels.py --repeats="$REPEATS"
.venv/bin/python bench/projections.py
