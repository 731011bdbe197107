#!/usr/bin/env bash
# Table 1 at small scale (issue #26), end to end and resumable (every stage resumes from its checkpoints; finished
# stages are reused): block store -> REALM pre-training with the live refresher -> fine-tuning of both rows (ORQA:
# from MiniLM; REALM: from the pre-training run), the same recipe for both -> evaluation -> the table with 95%
# bootstrap intervals and paired differences (BM25 and MiniLM zero-shot beside the ORQA row): <workdir>/table1.md.
#   bash scripts/table1.sh          # the 31k small corpus, workdir/table1: as in the paper, each dataset fine-tuned
#                                   # on its own train questions (QED NQ-train / WebQuestions train / CuratedTrec
#                                   # train) and evaluated on its test set; one table per dataset.  ~13 h on 2 cores
#   bash scripts/table1.sh demo     # the embedded demo slice, workdir/table1_demo: the main job's two stages
#                                   # (gin/runs/realm_pretrain_demo.gin, gin/runs/openqa_demo.gin), ~1 h; the slice
#                                   # has NQ train questions only, so one NQ fine-tuning per row is evaluated on all
#                                   # three test sets (WebQuestions and CuratedTrec: transfer from NQ)
# REALM_RUN=<REALM workdir> reuses a finished pre-training run instead (e.g. workdir/table2/baseline, which is
# the demo pre-training stage: gin/experiments/table2_demo.gin).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
case "${1:-full}" in
  full) W=workdir/table1; SRC=../shared/data/realm_small_corpus; STORE_DIR=$W/blocks
        PRETRAIN_GIN=gin/runs/realm_pretrain_small_corpus.gin
        ROW_GINS=(orqa=gin/experiments/table1_orqa_small_corpus.gin realm=gin/experiments/table1_realm_small_corpus.gin)
        TASKS=(nq_open_dev=nq_train_qed webquestions_test=webquestions_train curatedtrec_test=curatedtrec_train) ;;
  demo) W=workdir/table1_demo; SRC=data/demo; STORE_DIR=workdir/demo/blocks
        PRETRAIN_GIN=gin/runs/realm_pretrain_demo.gin
        ROW_GINS=(orqa=gin/runs/openqa_demo.gin realm=gin/runs/openqa_demo.gin)
        TASKS=(all=) ;;  # the gin's NQ train questions, evaluated on the gin's three test sets
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
QUESTIONS=$SRC/questions
: > $W/table1.md
for task in "${TASKS[@]}"; do
  test=${task%%=*}; train=${task#*=}
  TRAIN=(); EVAL=(); SUFFIX=""
  if [ -n "$train" ]; then
    TRAIN=("--gin_bindings=TRAIN_QUESTIONS = '$QUESTIONS/$train.jsonl'")
    EVAL=("--questions=$test=$QUESTIONS/$test.jsonl"); SUFFIX=_$test
  fi
  for item in "${ROW_GINS[@]}"; do
    row=${item%%=*}; gin=${item#*=}; RUN=$W/${row}_openqa$SUFFIX
    INIT=(); [ $row = orqa ] || INIT=("--gin_bindings=FINETUNE_INIT = 'realm:$REALM'")
    echo "== fine-tuning, row $row${train:+, on $train} $(date -u +%FT%TZ)"
    $PY launch/finetune.py $MODEL --gin_file=$gin "$STORE" "${INIT[@]}" "${TRAIN[@]}" --workdir=$RUN \
      --alsologtostderr=false
    echo "== evaluation, row $row${train:+, on $test} $(date -u +%FT%TZ)"
    BASELINES=(); [ $row = orqa ] || BASELINES=("--gin_bindings=openqa_eval.EvaluationConfig.baselines = ()")
    [ -f $RUN/eval/results.json ] || $PY launch/evaluate.py $MODEL --gin_file=$gin "$STORE" "${EVAL[@]}" \
      "${BASELINES[@]}" --workdir=$RUN --alsologtostderr=false
  done
  { [ -z "$train" ] || printf '%s\n\n' "$test: fine-tuned on $train"
    $PY tools/compare_openqa.py --run=orqa=$W/orqa_openqa$SUFFIX/eval --run=realm=$W/realm_openqa$SUFFIX/eval \
      --baseline=orqa
    echo; } | tee -a $W/table1.md
done
