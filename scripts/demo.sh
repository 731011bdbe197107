#!/usr/bin/env bash
# The main job, end to end: block store -> REALM pre-training from all-MiniLM-L6-v2 with the live index
# refresher beside it -> Open-QA fine-tuning -> evaluation (EM, answer-recall@k, BM25 and MiniLM
# baselines) -> results table.  Creates/reuses .venv.
#   bash scripts/demo.sh          # embedded demo slice (data/demo), outputs in workdir/demo
#   bash scripts/demo.sh full     # the full small corpus (../shared/data/realm_small_corpus), workdir/small_corpus
# PRETRAIN=0 fine-tunes straight from MiniLM (no REALM pre-training).  Delete the workdir to start over;
# finished stages are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=cpu
case "${1:-demo}" in
  demo) W=workdir/demo; SRC=data/demo; RUN=demo ;;
  full) W=workdir/small_corpus; SRC=../shared/data/realm_small_corpus; RUN=small_corpus ;;
  *) echo "usage: $0 [demo|full]" >&2; exit 2 ;;
esac
PY=.venv/bin/python
MODEL="--gin_file=gin/models/minilm.gin"
STORE="--gin_bindings=BLOCK_STORE = '$W/blocks'"
start=$(date +%s)

echo "== 1/4 block store from $SRC"
if [ -f "$W/blocks/manifest.json" ]; then
  echo "reusing $W/blocks (launch/build_blocks.py --overwrite rebuilds it)"
else
  $PY launch/build_blocks.py --passages=$SRC/passages.jsonl \
    --entities=$SRC/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$W/blocks
fi

INIT=()
if [ "${PRETRAIN:-1}" != 0 ]; then
  echo "== 2/4 REALM pre-training from all-MiniLM-L6-v2, with the live index refresher beside it"
  # What to embed with (tower, block length, ...) comes from the trainer's $W/realm/retriever.json.
  $PY launch/refresh_index.py --gin_file=gin/runs/refresh.gin --block_store=$W/blocks \
    --poll_seconds=5 --workdir=$W/realm --alsologtostderr=false > $W/refresh.log 2>&1 &
  REFRESHER=$!
  $PY launch/pretrain.py $MODEL --gin_file=gin/runs/realm_pretrain_$RUN.gin "$STORE" \
    --workdir=$W/realm --alsologtostderr=false
  wait $REFRESHER
  tail -n 1 $W/refresh.log
  INIT=(--gin_bindings="FINETUNE_INIT = 'realm:$W/realm'")
else
  echo "== 2/4 skipped (PRETRAIN=0): fine-tuning starts from all-MiniLM-L6-v2"
fi

echo "== 3/4 Open-QA fine-tuning (frozen index, query tower + span reader)"
$PY launch/finetune.py $MODEL --gin_file=gin/runs/openqa_$RUN.gin "$STORE" "${INIT[@]}" \
  --workdir=$W/openqa --alsologtostderr=false

echo "== 4/4 evaluation (NB: all-MiniLM-L6-v2 was trained on NQ and SQuAD question-passage pairs)"
$PY launch/evaluate.py $MODEL --gin_file=gin/runs/openqa_$RUN.gin "$STORE" --workdir=$W/openqa \
  --alsologtostderr=false
echo "main job done in $(( ($(date +%s) - start) / 60 )) min; ask it: $PY launch/ask.py $MODEL" \
  "--gin_file=gin/runs/openqa_$RUN.gin --workdir=$W/openqa --question='...'"
