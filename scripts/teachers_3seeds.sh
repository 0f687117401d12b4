#!/usr/bin/env bash
# Three training seeds of the four Flow-GRPO teachers on one base, each scored on its own task paired with the
# base on the same prompts and noise (RESULTS.md, "Teachers on the web-style world"). About 1.5 hours on two
# CPU cores at the defaults; every teacher run resumes from its checkpoints (--resume_from_checkpoint latest).
#   BASE=checkpoints/base OUT=runs/teachers ITERS=100 IMAGES=2 bash scripts/teachers_3seeds.sh
set -euo pipefail
BASE=${BASE:-checkpoints/base}
OUT=${OUT:-runs/teachers}
ITERS=${ITERS:-100}
IMAGES=${IMAGES:-2}
SEEDS=${SEEDS:-"0 1 2"}
RESULTS=${RESULTS:-results/teachers}
for S in $SEEDS; do
  python train.py --stage teachers --base "$BASE" --teacher_dir "$OUT/seed$S" --seed "$S" --grpo_iters "$ITERS" \
    --checkpoint_every 25 --resume_from_checkpoint latest --eval_at_end false
done
mkdir -p "$RESULTS"
for T in geneval ocr pickscore deqa; do
  ADAPTERS=()
  for S in $SEEDS; do ADAPTERS+=(--adapter "${T}_seed$S=$OUT/seed$S/$T"); done
  # deqa's own reward is every task's image quality: 40 prompts per task; the others: every test prompt
  if [ "$T" = deqa ]; then TASKS=(--tasks geneval ocr pickscore --prompts_per_task 40)
  else TASKS=(--tasks "$T" --prompts_per_task 0); fi
  python eval.py --model "$BASE" "${ADAPTERS[@]}" "${TASKS[@]}" --images_per_prompt "$IMAGES" --paired \
    --out "$RESULTS/$T.json"
done
