#!/usr/bin/env bash
# The small CPU tuning studies of results/tuning/ (see README.md, which make_readme.py writes from the
# study database and the report files). Run from the repository root:
#     nohup bash results/tuning/run.sh >> results/tuning/run.log 2>&1 &
# or only some studies, with more trials (added to those the study holds):
#     TRIALS=24 bash results/tuning/run.sh sgd momentum nesterov adagrad
# Two studies at a time (the machine has 2 cores), one torch thread each. Shampoo recomputes its
# inverse roots every 5 steps (@5) instead of every step, which costs ~5 s per step on this CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
DB=results/tuning/standard-mnist-tanh-cpu.db
TRIALS=${TRIALS:-8}
COMMON="--dataset mnist --model standard --activation tanh --batch-size 1000 --epochs 3 --limit-train 10000 --limit-test 2000 --trials $TRIALS --startup-trials 4 --sampler tpe --sampler-seed 0 --device cpu --storage $DB"
study() {
    opt=$1; shift
    echo "$(date -u +%FT%TZ) start $opt: locoprop tune $COMMON --optimizer $opt $*"
    .venv/bin/locoprop tune $COMMON --optimizer "$opt" "$@" > "results/tuning/log-$opt.txt" 2>&1
    .venv/bin/locoprop tune --storage "$DB" --study "mnist-standard-tanh-$opt" --report "results/tuning/best-$opt.yaml" --top 5 \
        >> "results/tuning/log-$opt.txt" 2>&1
    echo "$(date -u +%FT%TZ) done $opt"
}
export -f study; export COMMON DB
STUDIES=("locoprop-m" "shampoo --set inverse_every=5" "locoprop-s" "kfac" "rmsprop" "adam" "sgd" "momentum"
         "nesterov" "adagrad")
if [ $# -gt 0 ]; then STUDIES=("$@"); fi
printf '%s\n' "${STUDIES[@]}" | xargs -P 2 -I{} bash -c 'study {}'
.venv/bin/python results/tuning/make_readme.py
