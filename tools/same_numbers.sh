#!/usr/bin/env bash
# Do two revisions compute the same numbers?  Runs ICT, REALM pre-training (bootstrap index, no refresher: no
# timing in it), fine-tuning from MiniLM and from the REALM run, and evaluation on the demo slice at small sizes
# with the same seeds, through the launchers and their gin macros only, in a worktree of each revision; prints
# each job's final line and the results table, then the diff (none: the same).  ~30 min per revision on 2 cores.
#   bash tools/same_numbers.sh 6b15d2f [HEAD]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD; PY=$REPO/.venv/bin/python; OUT=$(mktemp -d)
run() {  # $1: revision; prints the jobs' results
  local tree="$OUT/tree-$1" w="$OUT/work-$1"
  git worktree add -q --detach "$tree" "$1"
  ( cd "$tree"; export PYTHONPATH="$tree" JAX_PLATFORMS=cpu
    S="--gin_bindings=BLOCK_STORE = '$w/blocks'"; L=--alsologtostderr=false
    $PY launch/build_blocks.py --passages=data/demo/passages.jsonl \
      --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out="$w/blocks" > "$w.build.log" 2>&1
    $PY launch/ict.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/ict_demo.gin "$S" \
      --gin_bindings="NUM_STEPS = 4" --gin_bindings="BATCH_SIZE = 16" --workdir="$w/ict" $L 2>/dev/null | tail -1
    $PY launch/pretrain.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/realm_pretrain_demo.gin "$S" \
      --gin_bindings="NUM_STEPS = 4" --workdir="$w/realm" $L 2>/dev/null | tail -1
    $PY launch/finetune.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin "$S" \
      --gin_bindings="NUM_STEPS = 6" --gin_bindings="NUM_EPOCHS = None" --workdir="$w/openqa" $L 2>/dev/null | tail -1
    $PY launch/finetune.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin "$S" \
      --gin_bindings="NUM_STEPS = 4" --gin_bindings="NUM_EPOCHS = None" --gin_bindings="FINETUNE_INIT = 'realm:$w/realm'" --workdir="$w/openqa_realm" \
      $L 2>/dev/null | tail -1
    $PY launch/evaluate.py --gin_file=gin/models/minilm.gin --gin_file=gin/runs/openqa_demo.gin "$S" \
      --workdir="$w/openqa" --limit=20 $L 2>/dev/null | grep "^|" ) | tee "$OUT/$1.out"
  git worktree remove --force "$tree"
}
run "$1"; run "${2:-HEAD}"
diff "$OUT/$1.out" "$OUT/${2:-HEAD}.out" && echo "the same numbers ($OUT)"
