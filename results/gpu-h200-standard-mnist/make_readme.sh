#!/usr/bin/env bash
# Regenerates this folder's figure, time-to-loss tables and README.md from the run folders (run from the
# repository root: bash results/gpu-h200-standard-mnist/make_readme.sh). rmsprop and locoprop-m came from the
# device session in ../gpu-h200-2026-11-27/, locoprop-m-T50 from the one in ../gpu-h200-session6/.
set -euo pipefail
R=results/gpu-h200-standard-mnist
P=results/perf/NVIDIA-H200-2026-11-27.json
L=${LOCOPROP:-.venv/bin/locoprop}
PY=${PYTHON:-.venv/bin/python}
$L plot $R/rmsprop $R/locoprop-m --out $R/rmsprop-vs-locoprop-m.png \
    --title "RMSProp and LocoProp-M (T = 10) alone on an H200: MNIST standard AE, tanh, 100 epochs, best settings of the 100-epoch GPU studies"
H1=results/gpu-standard-mnist
$L plot $H1/locoprop-s $H1/locoprop-m-T5 $R/locoprop-m $R/locoprop-m-T50 --out $R/fig3b-locoprop.png \
    --title "Fig. 3(b): LocoProp-S vs -M, T = 5/10/50, MNIST standard AE, tanh, 100 epochs (S, T5: H100; T10, T50: H200)"
$PY benchmarks/time_to_loss.py $R --reference rmsprop --runs locoprop-m --alone rmsprop locoprop-m --perf $P \
    --out $R/time-to-rmsprop-loss > /dev/null
$PY benchmarks/time_to_loss.py $R --reference locoprop-m --runs rmsprop --alone rmsprop locoprop-m --perf $P \
    --out $R/time-to-locoprop-m-loss > /dev/null
$PY benchmarks/results_readme.py $R \
  --title "RMSProp and LocoProp-M (T = 10) each alone on an NVIDIA H200, and Fig. 3(b)'s T = 50: MNIST standard tanh autoencoder, 100 epochs" \
  --command "# device session of 2026-11-27 12:03 UTC (../gpu-h200-2026-11-27/session.log):" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --budget-s 568 --tests-s 100 --perf-s 170 --perf-args '--models standard wide deep --batch-sizes 1000 --optimizers adam rmsprop locoprop-m --local-steps 1 5 10 --precisions fp32 tf32 bf16 --steps 20 --warmup 5' --tune locoprop-m:16:100:3 rmsprop:16:100:3 --tune-s 140 --startup-trials 5 --runs rmsprop locoprop-m --alone-s 70" \
  --command "# device session 6 (2026-11-27 16:02 UTC, ../gpu-h200-session6/device-call1-session.log): locoprop-m-T50, beside a K-FAC study (../tuning-kfac-h200/)" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --work runs/gpu-work1 --budget-s 490 --tests-s 120 --perf-s 80 --perf-args '--models standard --batch-sizes 1000 --optimizers rmsprop adam shampoo kfac locoprop-m --local-steps 10 --precisions fp32 tf32 --steps 10 --warmup 3' --tune kfac:64:10:4 --tune-s 230 --with-tune locoprop-m-T50 --runs locoprop-m-T50 --alone" \
  --command "# here: figures, time-to-loss tables and this README" \
  --command "bash results/gpu-h200-standard-mnist/make_readme.sh" \
  --note "**Settings.** Each run is Fig. 4's configuration (\`configs/figures/fig4-standard.yaml\`: 100 epochs, 5 warm-up epochs then linear decay, batch 1000, all 60,000 images) with the best settings of the GPU studies that ran just before in the same session (\`../tuning-h200-100epoch/\`; RMSProp's report was written when the runs started, LocoProp-M's study had no complete trial by then, so its run took \`results/tuning/best-locoprop-m.yaml\`: the same setting that the study later ranked first). \`settings.json\` is exactly what was trained, \`train.log\` its output." \
  --note "**Wall-clock times.** Both ran alone on the GPU, one after the other. The harness runs BackProp baselines eagerly (RMSProp's step is 2.47 ms eager and 0.89 ms as a captured graph in the step-time benchmark of the same session) and LocoProp on CUDA with \`graphed_step\` (5.11 ms). Wall time is training time only (the harness times the batches, not the evaluations)." \
  --note "**Fig. 3(b)** ([fig3b-locoprop.png](fig3b-locoprop.png)): locoprop-m-T50 is Fig. 3(b)'s T = 50 run with the same settings as locoprop-m (T = 10; \`settings.json\` differs only in \`local_steps\`); it trained beside four K-FAC tuning workers on the same GPU, so its wall time is contended. LocoProp-S and T = 5 are the H100 runs of ../gpu-standard-mnist/ (same settings; the H100 and H200 T = 10 runs end at the same loss to the last digit). T = 50 ends lowest in train loss but highest in test loss." \
  --note "**Time to loss**: [time-to-rmsprop-loss.md](time-to-rmsprop-loss.md) (LocoProp-M does not reach RMSProp's final loss in 100 epochs) and [time-to-locoprop-m-loss.md](time-to-locoprop-m-loss.md) (the converse)."
