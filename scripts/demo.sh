#!/usr/bin/env bash
# The main job on the embedded demo slice (data/demo), end to end, from a fresh clone.
# Creates/reuses .venv. Outputs go to workdir/demo (delete it to start over). Extra args: none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=cpu
W=workdir/demo
PY=.venv/bin/python

echo "== 1/2 block store from data/demo"
$PY launch/build_blocks.py --passages=data/demo/passages.jsonl \
  --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$W/blocks

echo "== 2/2 ICT warm start of the retriever from all-MiniLM-L6-v2"
$PY launch/ict.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/ict_demo.gin \
  --gin_bindings="BLOCK_STORE = '$W/blocks'" --workdir=$W/ict --alsologtostderr=false
