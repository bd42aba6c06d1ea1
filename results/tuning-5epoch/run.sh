#!/usr/bin/env bash
# Second CPU tuning campaign (see README.md, written by results/tuning/make_readme.py from the study
# database): Shampoo@50 and K-FAC@50 with trials of 5 epochs on all 60,000 MNIST images (1 warm-up
# epoch), a budget closer to the 100-epoch runs than results/tuning/'s 3 epochs on 10,000 images
# (whose K-FAC settings diverged at 100 epochs). Then each best setting trains for the figure's
# 100 epochs (5 warm-up) into results/fig4-at50-cpu/. Run from the repository root:
#     nohup bash results/tuning-5epoch/run.sh >> results/tuning-5epoch/run.log 2>&1 &
#     TRIALS=8 bash results/tuning-5epoch/run.sh kfac -klclip --set kl_clip=0.001   # one study (TRAIN=1: and its run)
# One torch thread per job, the two chains side by side (the machine has 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
HERE=results/tuning-5epoch
DB=$HERE/standard-mnist-tanh-cpu-5epoch.db
RUNS=results/fig4-at50-cpu
COMMON="--dataset mnist --model standard --activation tanh --batch-size 1000 --epochs 5 --warmup-epochs 1 --startup-trials 4 --sampler tpe --sampler-seed 0 --device cpu --storage $DB --set inverse_every=50"
chain() {  # chain OPTIMIZER TRIALS TRAIN [STUDY-SUFFIX [FIXED SETTINGS...]]
    opt=$1 trials=$2 train=$3 suffix=${4:-}; shift 3; shift || true
    study="mnist-standard-tanh-$opt$suffix"
    echo "$(date -u +%FT%TZ) start $opt: locoprop tune $COMMON --trials $trials --optimizer $opt --study $study $*"
    .venv/bin/locoprop tune $COMMON --trials "$trials" --optimizer "$opt" --study "$study" "$@" > "$HERE/log-$opt.txt" 2>&1
    .venv/bin/locoprop tune --storage "$DB" --study "$study" --report "$HERE/best-$opt.yaml" \
        --top 5 >> "$HERE/log-$opt.txt" 2>&1
    echo "$(date -u +%FT%TZ) done $opt"
    if [ "$train" = 1 ]; then
        echo "$(date -u +%FT%TZ) start train $opt-at50: locoprop train --config $HERE/best-$opt.yaml --epochs 100 --warmup-epochs 5 --device cpu --no-progress --out $RUNS/$opt-at50"
        mkdir -p "$RUNS"
        .venv/bin/locoprop train --config "$HERE/best-$opt.yaml" --epochs 100 --warmup-epochs 5 \
            --device cpu --no-progress --out "$RUNS/$opt-at50" > "$HERE/train-$opt-at50.txt" 2>&1 || true
        echo "$(date -u +%FT%TZ) done train $opt-at50"
    fi
}
export -f chain; export COMMON DB HERE RUNS
if [ $# -gt 0 ]; then
    chain "$1" "${TRIALS:-8}" "${TRAIN:-0}" "${@:2}"
else
    # K-FAC with KL clipping (kfac-pytorch's default bound): without it, all 8 trials of the first
    # K-FAC study here (mnist-standard-tanh-kfac, stopped, log-kfac-noclip.txt) diverged or did not train.
    chain kfac 12 1 -klclip --set kl_clip=0.001 &
    chain shampoo 16 1 &
    wait
fi
