#!/usr/bin/env bash
# Figure 4 (standard) with the @50 runs of this folder (CPU, settings from results/tuning-5epoch/) beside the
# H100 runs of results/gpu-standard-mnist/ (the loss against epochs does not depend on the device), and this
# folder's README. Run from the repository root: bash results/fig4-at50-cpu/make_readme.sh
set -euo pipefail
R=results/fig4-at50-cpu
G=results/gpu-standard-mnist
L=${LOCOPROP:-.venv/bin/locoprop}
PY=${PYTHON:-.venv/bin/python}
$L plot $G/rmsprop $G/locoprop-m $R/shampoo-at50 $R/kfac-at50 $G/shampoo-at50 $G/kfac-at50 \
    --out $R/fig4-standard-at50.png --views epoch \
    --title "Fig. 4 (standard): @50 runs tuned at 5 epochs (CPU) beside the H100 runs tuned at 3 epochs"
$PY benchmarks/results_readme.py $R \
  --title "Figure 4 (standard), @50 runs: Shampoo@50 and K-FAC@50 with settings tuned at 5 epochs on all images (CPU)" \
  --command "nohup bash results/tuning-5epoch/run.sh >> results/tuning-5epoch/run.log 2>&1 &   # Shampoo: study, then this run" \
  --command "TRIALS=12 TRAIN=1 bash results/tuning-5epoch/run.sh kfac -klclip --set kl_clip=0.001   # K-FAC with KL clipping: study, then this run" \
  --command "bash results/fig4-at50-cpu/make_readme.sh   # the figure and this README" \
  --note "**What these are.** The 100-epoch runs (5 warm-up epochs, batch 1000, all 60,000 images) of the best settings of the 5-epoch studies in \`results/tuning-5epoch/\` (its README has the studies, their trials and why they were run), trained on this 2-core CPU, one thread each, beside other work of the session (the wall times are not comparable with the H100 runs). \`config.json\` in each folder holds exactly what was trained; each run's output is \`results/tuning-5epoch/train-NAME.txt\`." \
  --note "**The figure** [fig4-standard-at50.png](fig4-standard-at50.png) draws them with the H100 runs of \`results/gpu-standard-mnist/\` (RMSProp, LocoProp-M, and the earlier Shampoo@50 and K-FAC@50 runs with the 3-epoch settings), loss against epochs."
