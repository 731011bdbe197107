#!/usr/bin/env bash
# Table 2 at small scale (issue #26), resumable: one sweep of REALM pre-training variants on the demo slice
# (gin/experiments/table2_demo.gin: baseline at two seeds, random-token masking, random-span masking, no null
# document, a 30x staler index, no warm start of the retriever's projection; and retrieval off, the null block
# only: what retrieval adds), then the zero-shot NQ-open dev answer-recall@5 of each pre-trained retriever (the
# null-only run trains none), then the table: workdir/table2/{table2.md,recall_at_5.png,report.md,heldout_loss.png}.
# Rerunning it resumes each variant from its checkpoints.  ~1h50 on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
R=${ROOT:-workdir/table2}
PY=.venv/bin/python
STORE=workdir/demo/blocks
[ -f $STORE/manifest.json ] || $PY launch/build_blocks.py --passages=data/demo/passages.jsonl \
  --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=$STORE
VARIANTS=(baseline baseline_seed2 random_tokens random_spans no_null_document stale_index_30x random_projection)
TABLE=("${VARIANTS[@]}" no_retrieval)
$PY launch/sweep.py --gin_file=gin/models/minilm.gin --run_gin=gin/experiments/table2_demo.gin \
  --gin_bindings="BLOCK_STORE = '$STORE'" --gin_bindings="BLOCK_LEN = 128" \
  --variant=baseline= --variant="baseline_seed2=trainer.TrainerConfig.seed = 2" \
  --variant=random_tokens=gin/ablations/random_token_masking.gin \
  --variant=random_spans=gin/ablations/random_span_masking.gin \
  --variant=no_null_document=gin/ablations/no_null_document.gin \
  --variant=stale_index_30x=refresher:gin/ablations/slow_refresh.gin \
  --variant="random_projection=PROJECTION_INIT = 'normal'" --variant=no_retrieval=gin/ablations/no_retrieval.gin \
  --baseline=baseline --workdir_root=$R
for v in "${VARIANTS[@]}"; do
  [ -f $R/recall/$v/eval_retrieval/results.json ] && continue
  $PY launch/evaluate.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin \
    --gin_bindings="BLOCK_STORE = '$STORE'" --gin_bindings="openqa_eval.EvaluationConfig.baselines = ()" \
    "--gin_bindings=openqa_eval.EvaluationConfig.datasets = {'nq_open_dev': 'nq_open_dev.jsonl'}" \
    --retrieval_only --pretrained_run=$R/$v --workdir=$R/recall/$v --alsologtostderr=false
done
$PY tools/ablation_table.py --root=$R --baseline=baseline --variants="$(IFS=,; echo "${TABLE[*]}")"
