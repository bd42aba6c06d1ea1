#!/usr/bin/env bash
# Regenerates README.md, the curves and the time-to-loss tables from the runs here (session 18, one NVIDIA H200,
# 2026-11-28; run from the repository root: bash results/gpu-h200-session18-notebook-defaults/make_readme.sh).
# Every number comes from the runs' files and the step-time file of the same session.
set -euo pipefail
dir=results/gpu-h200-session18-notebook-defaults
before=results/gpu-h200-notebook-defaults
perf=results/perf/NVIDIA-H200-2026-11-28-session18-T.json
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=src
$PY -m locoprop plot "$dir/rmsprop" "$dir/notebook-m" "$dir/notebook-m-tf32" "$dir/notebook-m-T5" \
  "$dir/notebook-m-compiled" --views epoch wall_time --out "$dir/curves.png" \
  --labels "tuned RMSProp" "LocoProp-M, notebook defaults, FP32" "the same, TF32 local products" "the same, T = 5" \
    "the same, compile_elementwise" \
  --title "One H200 (session 18): RMSProp and LocoProp-M (notebook defaults), each alone" > /dev/null
runs=(--runs notebook-m notebook-m-tf32 notebook-m-T5 notebook-m-compiled
      --alone rmsprop notebook-m notebook-m-tf32 notebook-m-T5 notebook-m-compiled --perf "$perf")
$PY benchmarks/time_to_loss.py "$dir" --reference rmsprop "${runs[@]}" --out "$dir/time-to-rmsprop-loss" > /dev/null
$PY benchmarks/time_to_loss.py "$dir" --reference rmsprop --target-epoch 99 "${runs[@]}" \
  --out "$dir/time-to-rmsprop-epoch99-loss" > /dev/null
$PY benchmarks/results_readme.py "$dir" \
  --title "LocoProp-M with the notebook's defaults on one H200 (session 18): time to RMSProp's loss with the Triton kernels" \
  --command "# device call 1 (results/gpu-h200-session18/ has its log and the command in full)" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --budget-s 500 --tests \"-n 8 tests/cuda tests/test_fused.py\" --tests-s 150 --perf-s 80 --perf-args \"...\" --configs notebook-m=configs/notebook-defaults-locoprop-m.yaml notebook-m-T5=configs/notebook-defaults-locoprop-m.yaml:local_steps=5 notebook-m-compiled=configs/notebook-defaults-locoprop-m.yaml:compile_elementwise=true --runs rmsprop notebook-m notebook-m-tf32 notebook-m-T5 notebook-m-compiled --alone rmsprop notebook-m notebook-m-tf32 notebook-m-T5 notebook-m-compiled --alone-s 55" \
  --command "bash results/gpu-h200-session18-notebook-defaults/make_readme.sh   # curves.png, time-to-*.md/json, this README" \
  --note "**Runs.** rmsprop is the best RMSProp setting of the 100-epoch H200 study (\`../tuning-h200-100epoch/best-rmsprop.yaml\`), run eagerly as the harness runs BackProp baselines; notebook-m the authors' notebook defaults for LocoProp-M (\`configs/notebook-defaults-locoprop-m.yaml\`), FP32, the harness's default path on CUDA (the whole step as one CUDA graph, since session 13 with the Triton kernels for the update and the residual); notebook-m-tf32 the same with TF32 local products (in the update form), notebook-m-T5 with T = 5 local iterations, notebook-m-compiled with \`compile_elementwise\` (torch.compile's kernels instead of the Triton ones). Every run had the GPU to itself, one after another, after the CUDA tests and the step-time benchmark of the same call." \
  --note "**Time to RMSProp's loss**: [time-to-rmsprop-loss.md](time-to-rmsprop-loss.md) (RMSProp's final train loss, its epoch at learning rate 0 included) and [time-to-rmsprop-epoch99-loss.md](time-to-rmsprop-epoch99-loss.md) (its loss after epoch 99). \`x reference wall\` compares with RMSProp as the harness runs it (eager, torch.optim); the last two columns put both on the same footing, each step captured in one CUDA graph, from the step times of call 2 (\`$perf\`: RMSProp's \`graph\` row, LocoProp-M's \`graphed\` rows). \`first epoch s\` holds the one-off costs: the CUDA graph's warm-up and capture and, with \`compile_elementwise\`, torch.compile's compilations on a machine with no compile cache." \
  > /dev/null
$PY benchmarks/against_fp32.py "$dir" --fp32 notebook-m \
  --compare notebook-m-tf32 notebook-m-compiled "notebook-m of session 12 (../gpu-h200-notebook-defaults/, before the Triton kernels)=$before/notebook-m" \
  --wall rmsprop notebook-m notebook-m-tf32 notebook-m-T5 notebook-m-compiled "notebook-m of session 12 (../gpu-h200-notebook-defaults/, before the Triton kernels)=$before/notebook-m" >> "$dir/README.md"
