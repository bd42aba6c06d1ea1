#!/usr/bin/env bash
# Regenerates this folder's README.md from its run and the H100 runs of ../gpu-standard-mnist/ (run from the
# repository root: bash results/cpu-precision-100epoch/make_readme.sh). Every number comes from the runs' files.
set -euo pipefail
dir=results/cpu-precision-100epoch
gpu=results/gpu-standard-mnist
PY=${PYTHON:-.venv/bin/python}
$PY benchmarks/results_readme.py "$dir" \
  --title "LocoProp-M with bf16 local products on the CPU for 100 epochs (tuned settings), eager and compiled, against the same settings in FP32 and bf16 on an H100" \
  --command "OMP_NUM_THREADS=2 locoprop train --config results/tuning/best-locoprop-m.yaml --epochs 100 --warmup-epochs 5 --limit-train 60000 --limit-test 10000 --precision bf16 --device cpu --data-dir ../shared/data/mnist --no-progress --out results/cpu-precision-100epoch/locoprop-m-bf16" \
  --command "OMP_NUM_THREADS=2 locoprop train --config results/tuning/best-locoprop-m.yaml --epochs 100 --warmup-epochs 5 --limit-train 60000 --limit-test 10000 --precision bf16 --compile-elementwise --device cpu --data-dir ../shared/data/mnist --no-progress --out results/cpu-precision-100epoch/locoprop-m-bf16-compiled" \
  --command "bash results/cpu-precision-100epoch/make_readme.sh   # this README" \
  --note "**What it shows.** The CPU's bf16 local products (the fast solver's CPU path: bf16 products in the update form, tanh as 2σ(2a) - 1 in the iterations, f(â) read from the kept output) over the 100 epochs of the tuned LocoProp-M settings (\`results/tuning/best-locoprop-m.yaml\`, the settings of \`../gpu-standard-mnist/\`: η = 8.06e-6, γ = 500, T = 10, batch 1000, 5 warm-up epochs, seed 0), run with the library of commit 3b21ef8 (imported when the run started) on this project's 2-core AMD EPYC with AVX512-BF16, against that folder's H100 runs of the same settings in FP32 (\`locoprop-m\`) and bf16 (\`locoprop-m-bf16\`). The issue asks reduced-precision products to reach FP32's loss within 0.5%; the CPU run is compared with the H100's FP32 run, so its difference holds both the precision's and the device's (CPU and GPU FP32 differ in rounding too). \`../notebook-defaults-cpu/\` has the same comparison on the CPU alone, FP32 against bf16, with the notebook's defaults." \
  --note "**The compiled chain** (\`locoprop-m-bf16-compiled\`, session 33): the same settings with \`--compile-elementwise\`, whose bf16 local iterations on the CPU run as two compiled programs an iteration that read the bf16 products as they are (\`docs/performance.md\`, session 33), run with the library of commit 0b0041c on the same kind of 2-core AMD EPYC with AVX512-BF16, alone on it (its first epoch holds the compilations): the configuration in which the CPU step meets issue 5's 5x (\`../interleaved-time/\`)." \
  --note "**Wall time.** The eager CPU run shared the 2-core machine with other work of session 28 (a memory benchmark, the test suite) for parts of its epochs: its wall time is not meant (\`../perf/\` and \`../interleaved-time/\` time the step)." \
  > /dev/null
$PY benchmarks/against_fp32.py "$dir" --fp32 "H100 FP32 (../gpu-standard-mnist/locoprop-m)=$gpu/locoprop-m" \
  --compare "CPU bf16 (locoprop-m-bf16)=$dir/locoprop-m-bf16" "CPU bf16 compiled (locoprop-m-bf16-compiled)=$dir/locoprop-m-bf16-compiled" \
    "H100 bf16 (../gpu-standard-mnist/locoprop-m-bf16)=$gpu/locoprop-m-bf16" \
  --wall "CPU bf16 (locoprop-m-bf16)=$dir/locoprop-m-bf16" "CPU bf16 compiled (locoprop-m-bf16-compiled)=$dir/locoprop-m-bf16-compiled" \
  --not-alone "CPU bf16 (locoprop-m-bf16)" \
  --device "an H100" >> "$dir/README.md"
