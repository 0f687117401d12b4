#!/usr/bin/env bash
# Three training seeds of the four Flow-GRPO teachers on one base, each scored on its own task and paired with
# the base on the same prompts and noise (results/RESULTS.md, "Experts on the web-style world"). Defaults are the
# recorded run: 150 iterations for geneval, the default 60 for the others, one image per test prompt. About
# 1.3 hours on two CPU cores; every teacher resumes from its checkpoints (--resume_from_checkpoint latest), and
# a teacher already saved is skipped.
# The committed geneval teacher is seed 0's checkpoint-100 of this run (results/RESULTS.md, "Closing the gap": the three
# seeds' scores peak at 100 iterations); GENEVAL_ITERS=100 trains it directly.
#   BASE=checkpoints/base OUT=runs/teachers RESULTS=results/teachers bash tools/teachers_3seeds.sh   (its results of commit dd4277d: results/HISTORY.md)
set -euo pipefail
BASE=${BASE:-checkpoints/base}
OUT=${OUT:-runs/teachers}
RESULTS=${RESULTS:-results/teachers}
IMAGES=${IMAGES:-1}
SEEDS=${SEEDS:-"0 1 2"}
declare -A ITERS=([geneval]=${GENEVAL_ITERS:-150} [ocr]=60 [pickscore]=60 [deqa]=60)
for S in $SEEDS; do
  for T in geneval ocr pickscore deqa; do
    python train.py --stage teachers --teachers "$T" --base "$BASE" --teacher_dir "$OUT/seed$S" --seed "$S" \
      --grpo_iters "${ITERS[$T]}" --checkpoint_every 20 --resume_from_checkpoint latest --eval_at_end false
  done
done
mkdir -p "$RESULTS"
for T in ocr geneval pickscore deqa; do
  ADAPTERS=()
  for S in $SEEDS; do ADAPTERS+=(--adapter "${T}_seed$S=$OUT/seed$S/$T"); done
  # deqa's own reward is the image quality on every task: 40 prompts per task; the others: every test prompt
  if [ "$T" = deqa ]; then TASKS=(--tasks geneval ocr pickscore --eval_prompts_per_task 40)
  else TASKS=(--tasks "$T" --eval_prompts_per_task 0); fi
  python eval.py --model "$BASE" "${ADAPTERS[@]}" "${TASKS[@]}" --eval_images_per_prompt "$IMAGES" --paired \
    --out "$RESULTS/$T.json"
done
# the seesaw: seed 0's teachers on every task
python eval.py --model "$BASE" --adapter geneval="$OUT/seed0/geneval" --adapter ocr="$OUT/seed0/ocr" \
  --adapter pickscore="$OUT/seed0/pickscore" --adapter deqa="$OUT/seed0/deqa" --eval_prompts_per_task 40 \
  --eval_images_per_prompt "$IMAGES" --paired --out "$RESULTS/seesaw.json"
