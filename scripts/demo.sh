#!/usr/bin/env bash
# The main job on the embedded demo slice (data/demo), end to end, from a fresh clone.
# Creates/reuses .venv. Outputs go to workdir/demo (delete it to start over). Extra args: none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=cpu
W=workdir/demo
PY=.venv/bin/python

echo "== 1/3 block store from data/demo"
$PY launch/build_blocks.py --passages=data/demo/passages.jsonl \
  --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$W/blocks

echo "== 2/3 ICT warm start of the retriever from all-MiniLM-L6-v2"
$PY launch/ict.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/ict_demo.gin \
  --gin_bindings="BLOCK_STORE = '$W/blocks'" --workdir=$W/ict --alsologtostderr=false

echo "== 3/3 REALM pre-training with the live index refresher beside it"
$PY launch/refresh_index.py --gin_file=gin/models/realm_demo.gin --gin_file=gin/runs/refresh.gin \
  --gin_bindings="BLOCK_STORE = '$W/blocks'" --gin_bindings="TOWER_PATH = ('retriever', 'query_tower')" \
  --gin_bindings="BLOCK_LEN = 64" --poll_seconds=5 \
  --workdir=$W/realm --alsologtostderr=false > $W/refresh.log 2>&1 &
REFRESHER=$!
$PY launch/pretrain.py --gin_file=gin/models/realm_demo.gin --gin_file=gin/runs/realm_pretrain_demo.gin \
  --gin_bindings="BLOCK_STORE = '$W/blocks'" --gin_bindings="RETRIEVER_INIT = 'ict:$W/ict'" \
  --workdir=$W/realm --alsologtostderr=false
wait $REFRESHER
tail -n 1 $W/refresh.log
