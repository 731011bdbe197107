#!/usr/bin/env bash
# Table 1 at small scale (issue #26) on the 31k small corpus, end to end and resumable (every stage resumes from
# its checkpoints; finished stages are reused): block store -> REALM pre-training with the live refresher ->
# fine-tuning of both rows (ORQA: from MiniLM; REALM: from the pre-training run) -> evaluation of both on NQ-open
# dev, WebQuestions test and CuratedTrec test (BM25 and MiniLM zero-shot beside the ORQA row) -> the table with
# 95% bootstrap intervals and paired differences: workdir/table1/table1.md.  Hours on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
W=workdir/table1
SRC=../shared/data/realm_small_corpus
PY=.venv/bin/python
MODEL="--gin_file=gin/models/minilm.gin"
STORE="--gin_bindings=BLOCK_STORE = '$W/blocks'"
mkdir -p $W
[ -f $W/blocks/manifest.json ] || $PY launch/build_blocks.py --passages=$SRC/passages.jsonl \
  --entities=$SRC/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$W/blocks
echo "== REALM pre-training $(date -u +%FT%TZ)"
$PY launch/refresh_index.py --gin_file=gin/runs/refresh.gin --block_store=$W/blocks --poll_seconds=5 \
  --workdir=$W/realm --alsologtostderr=false >> $W/refresh.log 2>&1 &
REFRESHER=$!
$PY launch/pretrain.py $MODEL --gin_file=gin/runs/realm_pretrain_small_corpus.gin "$STORE" --workdir=$W/realm \
  --alsologtostderr=false
wait $REFRESHER
for row in orqa realm; do
  echo "== fine-tuning, row $row $(date -u +%FT%TZ)"
  $PY launch/finetune.py $MODEL --gin_file=gin/experiments/table1_${row}_small_corpus.gin "$STORE" \
    --workdir=$W/${row}_openqa --alsologtostderr=false
done
for row in orqa realm; do
  echo "== evaluation, row $row $(date -u +%FT%TZ)"
  BASELINES=(); [ $row = orqa ] || BASELINES=("--gin_bindings=openqa_eval.EvaluationConfig.baselines = ()")
  [ -f $W/${row}_openqa/eval/results.json ] || $PY launch/evaluate.py $MODEL \
    --gin_file=gin/experiments/table1_${row}_small_corpus.gin "$STORE" "${BASELINES[@]}" \
    --workdir=$W/${row}_openqa --alsologtostderr=false
done
$PY tools/compare_openqa.py --run=orqa=$W/orqa_openqa/eval --run=realm=$W/realm_openqa/eval --baseline=orqa \
  | tee $W/table1.md
