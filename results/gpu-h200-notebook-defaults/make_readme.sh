#!/usr/bin/env bash
# Regenerates README.md, the curves and the time-to-loss tables from the runs here (device session 12, one NVIDIA
# H200, 2026-11-28; run from the repository root: bash results/gpu-h200-notebook-defaults/make_readme.sh).
# Every number comes from the runs' files and the step-time file of the same session.
set -euo pipefail
dir=results/gpu-h200-notebook-defaults
cpu=results/notebook-defaults-cpu
perf=results/perf/NVIDIA-H200-2026-11-28-session12.json
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=src
$PY -m locoprop plot "$dir/rmsprop" "$dir/notebook-m" "$dir/notebook-m-compiled" "$dir/notebook-m-tf32" \
  "$dir/notebook-m-bf16" "$dir/kfac" "$dir/shampoo" --views epoch wall_time --out "$dir/curves.png" \
  --labels "tuned RMSProp" "LocoProp-M, notebook defaults, FP32" "the same, compile_elementwise" \
    "the same, TF32 local products" "the same, bf16 local products" "K-FAC (40 s)" "Shampoo (40 s)" \
  --title "One H200: RMSProp and LocoProp-M (notebook defaults), K-FAC and Shampoo cut at 40 s" > /dev/null
runs=(--runs notebook-m notebook-m-compiled notebook-m-tf32 notebook-m-bf16 shampoo kfac
      --alone rmsprop notebook-m notebook-m-compiled shampoo kfac --perf "$perf")
$PY benchmarks/time_to_loss.py "$dir" --reference rmsprop "${runs[@]}" --out "$dir/time-to-rmsprop-loss" > /dev/null
$PY benchmarks/time_to_loss.py "$dir" --reference rmsprop --target-epoch 99 "${runs[@]}" \
  --out "$dir/time-to-rmsprop-epoch99-loss" > /dev/null
$PY benchmarks/results_readme.py "$dir" \
  --title "LocoProp-M with the notebook's defaults on one H200: time to RMSProp's loss, and TF32 and bf16 for 100 epochs" \
  --command "# device call 1 (results/gpu-h200-session12/ has its log): every run here but notebook-m-compiled" \
  --command "python3 benchmarks/gpu_session.py --out \$OUT --data-dir .carrydata/mnist --budget-s 540 --beside-tests notebook-m-tf32 notebook-m-bf16 --beside-tests-s 170 --tests \"-n 8 tests/cuda tests/test_fused.py\" --tests-s 150 --perf-s 120 --perf-args \"...\" --precision-error-s 25 --profile-s 30 --profile-args \"...\" --configs notebook-m=configs/notebook-defaults-locoprop-m.yaml --runs rmsprop notebook-m shampoo kfac --alone rmsprop notebook-m shampoo kfac --alone-s 60 --alone-limits notebook-m=75 shampoo=40 kfac=40" \
  --command "# device call 3, alone on the same H200 (a fresh machine of the same kind):" \
  --command "python3 -m locoprop train --config configs/notebook-defaults-locoprop-m.yaml --device cuda --data-dir .carrydata/mnist --compile-elementwise --out /tmp/nbc --no-progress" \
  --command "bash results/gpu-h200-notebook-defaults/make_readme.sh   # curves.png, time-to-*.md/json, this README" \
  --note "**Runs.** rmsprop is the best RMSProp setting of the 100-epoch H200 study (\`../tuning-h200-100epoch/best-rmsprop.yaml\`); notebook-m the authors' notebook defaults for LocoProp-M (\`configs/notebook-defaults-locoprop-m.yaml\`), FP32, the harness's default path on CUDA (the whole step as one CUDA graph); notebook-m-compiled the same with \`compile_elementwise\`; notebook-m-tf32 and notebook-m-bf16 the same with TF32 or bf16 local products (in the update form). shampoo and kfac are the harness's Shampoo and K-FAC with the settings \`locoprop reproduce\` takes for Fig. 4 (\`../tuning-shampoo-at1-cpu/\`, \`../tuning-kfac-at1-cpu/\`), stopped after 40 s: the same settings ran all 100 epochs on the CPU (\`../fig4-at1-cpu/\`, its README) and ended far above RMSProp's loss there, so on this protocol they do not reach it at all." \
  --note "**Alone or not.** rmsprop, notebook-m, shampoo and kfac ran one after another with the GPU to themselves (call 1), notebook-m-compiled alone in call 3. notebook-m-tf32 and notebook-m-bf16 ran together beside the CUDA tests (\`pytest -n 8\`): their losses are meant, their wall times are not (the time-to-loss tables give their uncontended estimate from the step-time benchmark where it has their row: TF32 yes, bf16 not timed this session)." \
  --note "**Time to RMSProp's loss**: [time-to-rmsprop-loss.md](time-to-rmsprop-loss.md) (RMSProp's final train loss, its epoch at learning rate 0 included) and [time-to-rmsprop-epoch99-loss.md](time-to-rmsprop-epoch99-loss.md) (its loss after epoch 99). \`first epoch s\` holds the one-off costs: the CUDA graph's warm-up and capture and, with \`compile_elementwise\`, torch.compile's compilations on a machine with no compile cache." \
  > /dev/null
$PY benchmarks/against_fp32.py "$dir" --fp32 notebook-m \
  --compare notebook-m-compiled notebook-m-tf32 notebook-m-bf16 "CPU FP32 (../notebook-defaults-cpu/locoprop-m-fp32)=$cpu/locoprop-m-fp32" \
  --wall rmsprop notebook-m notebook-m-compiled notebook-m-tf32 notebook-m-bf16 kfac shampoo \
  --not-alone notebook-m-tf32 notebook-m-bf16 >> "$dir/README.md"
