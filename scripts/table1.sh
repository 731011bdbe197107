#!/usr/bin/env bash
# Table 1 at small scale (issue #26), end to end and resumable (every stage resumes from its checkpoints; finished
# stages are reused): block store -> REALM pre-training with the live refresher -> fine-tuning of both rows (ORQA:
# from MiniLM; REALM: from the pre-training run), the same recipe for both -> evaluation of both on NQ-open dev,
# WebQuestions test and CuratedTrec test (BM25 and MiniLM zero-shot beside the ORQA row) -> the table with 95%
# bootstrap intervals and paired differences: <workdir>/table1.md.
#   bash scripts/table1.sh          # the 31k small corpus, workdir/table1: hours on a 2-core CPU (~8-9 h)
#   bash scripts/table1.sh demo     # the embedded demo slice, workdir/table1_demo: the main job's two stages
#                                   # (gin/runs/realm_pretrain_demo.gin, gin/runs/openqa_demo.gin), ~1 h
# REALM_RUN=<REALM workdir> reuses a finished pre-training run instead (e.g. workdir/table2/baseline, which is
# the demo pre-training stage: gin/experiments/table2_demo.gin).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
case "${1:-full}" in
  full) W=workdir/table1; SRC=../shared/data/realm_small_corpus; STORE_DIR=$W/blocks
        PRETRAIN_GIN=gin/runs/realm_pretrain_small_corpus.gin
        ROW_GINS=(orqa=gin/experiments/table1_orqa_small_corpus.gin realm=gin/experiments/table1_realm_small_corpus.gin) ;;
  demo) W=workdir/table1_demo; SRC=data/demo; STORE_DIR=workdir/demo/blocks
        PRETRAIN_GIN=gin/runs/realm_pretrain_demo.gin
        ROW_GINS=(orqa=gin/runs/openqa_demo.gin realm=gin/runs/openqa_demo.gin) ;;
  *) echo "usage: $0 [full|demo]" >&2; exit 2 ;;
esac
PY=.venv/bin/python
MODEL="--gin_file=gin/models/minilm.gin"
STORE="--gin_bindings=BLOCK_STORE = '$STORE_DIR'"
REALM=${REALM_RUN:-$W/realm}
mkdir -p $W
[ -f $STORE_DIR/manifest.json ] || $PY launch/build_blocks.py --passages=$SRC/passages.jsonl \
  --entities=$SRC/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$STORE_DIR
if [ -z "${REALM_RUN:-}" ]; then
  echo "== REALM pre-training $(date -u +%FT%TZ)"
  $PY launch/refresh_index.py --gin_file=gin/runs/refresh.gin --block_store=$STORE_DIR --poll_seconds=5 \
    --workdir=$REALM --alsologtostderr=false >> $W/refresh.log 2>&1 &
  REFRESHER=$!
  $PY launch/pretrain.py $MODEL --gin_file=$PRETRAIN_GIN "$STORE" --workdir=$REALM --alsologtostderr=false
  wait $REFRESHER
fi
for item in "${ROW_GINS[@]}"; do
  row=${item%%=*}; gin=${item#*=}
  INIT=(); [ $row = orqa ] || INIT=("--gin_bindings=FINETUNE_INIT = 'realm:$REALM'")
  echo "== fine-tuning, row $row $(date -u +%FT%TZ)"
  $PY launch/finetune.py $MODEL --gin_file=$gin "$STORE" "${INIT[@]}" --workdir=$W/${row}_openqa \
    --alsologtostderr=false
  echo "== evaluation, row $row $(date -u +%FT%TZ)"
  BASELINES=(); [ $row = orqa ] || BASELINES=("--gin_bindings=openqa_eval.EvaluationConfig.baselines = ()")
  [ -f $W/${row}_openqa/eval/results.json ] || $PY launch/evaluate.py $MODEL --gin_file=$gin "$STORE" \
    "${BASELINES[@]}" --workdir=$W/${row}_openqa --alsologtostderr=false
done
$PY tools/compare_openqa.py --run=orqa=$W/orqa_openqa/eval --run=realm=$W/realm_openqa/eval --baseline=orqa \
  | tee $W/table1.md
