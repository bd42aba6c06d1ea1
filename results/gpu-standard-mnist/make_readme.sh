#!/usr/bin/env bash
# Regenerates this folder's figures, time-to-loss tables and README.md from the run folders (run from the
# repository root: bash results/gpu-standard-mnist/make_readme.sh). The runs themselves came from the two
# device sessions named in README.md.
set -euo pipefail
R=results/gpu-standard-mnist
P=results/perf/NVIDIA-H100-80GB-HBM3-2026-11-27.json
L=${LOCOPROP:-.venv/bin/locoprop}
PY=${PYTHON:-.venv/bin/python}
$L plot $R/sgd $R/momentum $R/nesterov $R/adagrad $R/adam $R/rmsprop --out $R/fig3a-first-order.png \
    --title "Fig. 3(a) on an H100: first-order methods, MNIST standard AE, tanh, 100 epochs (tuned: 3-epoch CPU studies)"
$L plot $R/locoprop-s $R/locoprop-m-T5 $R/locoprop-m $R/locoprop-m-T50 --out $R/fig3b-locoprop.png \
    --title "Fig. 3(b) on an H100: LocoProp-S vs -M, T = 5/10/50 (T50 stopped at epoch 28; complete on an H200: ../gpu-h200-standard-mnist/)"
$L plot $R/rmsprop $R/locoprop-m $R/shampoo $R/shampoo-at50 $R/kfac $R/kfac-at50 --out $R/fig4-standard.png \
    --title "Fig. 4 (standard) on an H100 (Shampoo stopped at 1 and 56 epochs; K-FAC left early: loss > 1000)"
$L plot $R/locoprop-m $R/locoprop-m-tf32 $R/locoprop-m-bf16 --out $R/precision-locoprop-m.png \
    --title "LocoProp-M local products in FP32, TF32, bf16 (H100, 100 epochs; FP32 alone on the GPU, the others shared it)"
$PY benchmarks/time_to_loss.py $R --reference rmsprop --runs locoprop-m locoprop-m-tf32 locoprop-m-bf16 locoprop-s \
    locoprop-m-T5 locoprop-m-T50 shampoo shampoo-at50 kfac kfac-at50 adam --alone rmsprop locoprop-m --perf $P \
    --out $R/time-to-rmsprop-loss > /dev/null
$PY benchmarks/time_to_loss.py $R --reference locoprop-m --runs rmsprop adam locoprop-m-T5 shampoo-at50 \
    --alone rmsprop locoprop-m --perf $P --out $R/time-to-locoprop-m-loss > /dev/null
$PY benchmarks/results_readme.py $R \
  --title "Figures 3(a), 3(b) and 4 (standard) on an NVIDIA H100: MNIST standard tanh autoencoder, 100 epochs, tuned settings" \
  --command "# device session 1 (2026-11-27 08:33 UTC; see ../gpu-h100-2026-11-27/):" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --budget-s 500" \
  --command "# device session 2 (08:46 UTC):" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --budget-s 295 --tests-s 50 --perf-s 60 --perf-args '--models standard wide --batch-sizes 1000 --optimizers adam rmsprop locoprop-m --local-steps 10 --precisions fp32 tf32 bf16 --steps 20 --warmup 5' --alone --runs locoprop-m locoprop-m-tf32 locoprop-m-bf16 locoprop-s locoprop-m-T5 sgd momentum nesterov adagrad" \
  --command "# here: figures, time-to-loss tables and this README" \
  --command "bash results/gpu-standard-mnist/make_readme.sh" \
  --note "**Where each run comes from.** Every run's settings are its figure's configuration (\`configs/figures/fig3a.yaml\`, \`fig3b.yaml\`, \`fig4-standard.yaml\`: 100 epochs, 5 warm-up epochs then linear decay, batch 1000, all 60,000 images) with the tuned values of \`results/tuning/best-OPTIMIZER.yaml\` (\`locoprop reproduce\`'s rules, applied by \`benchmarks/gpu_session.py\`); \`settings.json\` in each folder is exactly what was trained, \`train.log\` its output. Those studies are small (3 epochs on 10,000 images, 8 to 32 trials; \`results/tuning/README.md\`), so these are the paper's figures with the paper's protocol except for the tuning budget. rmsprop, adam, shampoo, shampoo-at50, kfac, kfac-at50, locoprop-m and locoprop-m-T50 come from device session 1; the others from session 2. sgd, momentum, nesterov and adagrad were run in session 1 with the 8-trial settings, then their studies were extended to 32 trials and the runs repeated in session 2 with the new best settings; the earlier runs are kept in \`earlier-8-trial-settings/\`. LocoProp-M (T = 10, FP32) ran in both sessions and its 101 loss records are identical to the last digit; the folder here is session 1's, which had the GPU to itself. Between the sessions TF-RMSProp's update changed its rounding only (\`lr * (g / denom)\` as three multi-tensor operations instead of \`addcdiv\`, so that the reference loop and the fast solver compute the same numbers); session 1's rmsprop ran before that change." \
  --note "**Wall-clock times.** rmsprop and locoprop-m ran alone on the GPU (uncontended); every other run shared the GPU with up to 13 others (its wall time is not comparable). Runs marked 'stopped after epoch N' were stopped at the session's time limit (resumable, not diverged). kfac and kfac-at50 left early by the notebook's rule (train loss above 1000 at epoch 5 and 4): the 3-epoch-tuned K-FAC settings (lr 3.4e-4, beta1 0.9988) do not survive 100 epochs with warm-up. Shampoo's settings were tuned at @5; shampoo-at50 plateaus near 170-200." \
  --note "**Time to loss**: [time-to-rmsprop-loss.md](time-to-rmsprop-loss.md) (no other run reaches RMSProp's final 53.803) and [time-to-locoprop-m-loss.md](time-to-locoprop-m-loss.md) (RMSProp reaches LocoProp-M's final loss at epoch 78 in 13.0 s, LocoProp-M at epoch 98 in 33.5 s)."
