#!/usr/bin/env bash
# Figure 4 (standard) with the @1 runs of this folder (CPU: K-FAC@1 and Shampoo@1, settings from the CPU
# studies of results/tuning-kfac-at1-cpu/ and results/tuning-shampoo-at1-cpu/, and K-FAC@1 with the settings of
# the H200 study of results/tuning-kfac-h200/) beside the H200 runs of results/gpu-h200-standard-mnist/ and the
# @50 runs of results/fig4-at50-cpu/ (the loss against epochs does not depend on the device), and this folder's
# README. Run from the repository root:
#   bash results/fig4-at1-cpu/make_readme.sh
set -euo pipefail
R=results/fig4-at1-cpu
G=results/gpu-h200-standard-mnist
A=results/fig4-at50-cpu
L=${LOCOPROP:-.venv/bin/locoprop}
PY=${PYTHON:-.venv/bin/python}
RUNS=()
for run in $R/kfac $R/kfac-h200-tuned $R/shampoo; do [ -f $run/metrics.jsonl ] && RUNS+=($run); done
$L plot $G/rmsprop $G/locoprop-m "${RUNS[@]}" $A/shampoo-at50 $A/kfac-at50 \
    --out $R/fig4-standard.png --views epoch \
    --title "Fig. 4 (standard): K-FAC@1 and Shampoo@1 (CPU) beside RMSProp, LocoProp-M (H200) and the @50 runs (CPU)"
$PY benchmarks/results_readme.py $R \
  --title "Figure 4 (standard), @1 runs: K-FAC@1 and Shampoo@1 (exact eigh roots) trained on the CPU" \
  --command "nohup bash results/tuning-kfac-at1-cpu/run.sh >> results/tuning-kfac-at1-cpu/run.log 2>&1 &   # K-FAC@1: study, then this run" \
  --command "nohup bash results/tuning-shampoo-at1-cpu/run.sh >> results/tuning-shampoo-at1-cpu/run.log 2>&1 &   # Shampoo@1: study, then this run" \
  --command "TRAIN_ONLY=1 bash results/tuning-shampoo-at1-cpu/run.sh   # Shampoo@1: continue a stopped run (--resume)" \
  --command "nohup bash results/tuning-kfac-h200/train.sh >> results/tuning-kfac-h200/train.log 2>&1 &   # K-FAC@1 with the H200 study's setting (kfac-h200-tuned)" \
  --command "bash results/fig4-at1-cpu/make_readme.sh   # the figure and this README" \
  --note "**What these are.** The 100-epoch runs (5 warm-up epochs, batch 1000, all 60,000 images) of the best settings of the 5-epoch @1 studies in \`results/tuning-kfac-at1-cpu/\` and \`results/tuning-shampoo-at1-cpu/\` (their READMEs have the studies and why they were run), trained on this 2-core CPU beside other work of the session (the wall times are not comparable with the GPU runs). \`config.json\` in each folder holds exactly what was trained; each run's output is \`results/tuning-*-at1-cpu/train-*-at1.txt\`. Shampoo runs with \`shampoo_root=eigh\` (exact ridged inverse roots, \`docs/baselines.md\`), which makes a step 3.9 times cheaper here than the library's Newton iteration (0.68 s against 2.67 s a step, \`results/shampoo-cost-cpu/\`). Shampoo@1's wall time includes a pause (SIGSTOP, about 50 minutes, times in \`results/tuning-shampoo-at1-cpu/run.log\`) while K-FAC@1 finished: three torch threads on two cores had slowed K-FAC from 33 to 86 s an epoch." \
  --note "**kfac-h200-tuned** is K-FAC@1 with the best setting of the 10-epoch study on an H200 (\`results/tuning-kfac-h200/\`: 42 trials, best 131.07 after 10 epochs against 211.35 for the setting of \`kfac\`), trained here on the CPU for 100 epochs with one thread beside Shampoo@1 (output in \`results/tuning-kfac-h200/train.log\`)." \
  --note "**The figure** [fig4-standard.png](fig4-standard.png) draws them with the H200 runs of \`results/gpu-h200-standard-mnist/\` (RMSProp and LocoProp-M with the best settings of the 100-epoch H200 studies, \`results/tuning-h200-100epoch/\`) and the @50 runs of \`results/fig4-at50-cpu/\`, loss against epochs."
