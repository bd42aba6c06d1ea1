#!/usr/bin/env bash
# Third CPU campaign for K-FAC (see README.md, written by results/tuning/make_readme.py from the study
# database): K-FAC@1 (inverses every step, as in Fig. 4) tuned with trials of 5 epochs on all 60,000 MNIST
# images (1 warm-up epoch), two workers on one SQLite study, the first trial being the probe setting named
# below; then the best setting trains for the figure's 100 epochs (5 warm-up) into results/fig4-at1-cpu/kfac.
# Run from the repository root:
#     nohup bash results/tuning-kfac-at1-cpu/run.sh >> results/tuning-kfac-at1-cpu/run.log 2>&1 &
# Why: the 5-epoch study of results/tuning-5epoch/ (12 trials, 4 of them random) never sampled a learning
# rate near 1e-2 and chose lr 1.35e-6, so its K-FAC barely trains; a 3-epoch probe on this CPU with lr 1e-2,
# beta1 0.9, beta2 0.95, eps 1e-2 (no clipping) reached a train loss of 161.9 after its one epoch at a
# non-zero learning rate, and is enqueued as the first trial.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
HERE=results/tuning-kfac-at1-cpu
DB=$HERE/standard-mnist-tanh-kfac-at1-cpu.db
STUDY=mnist-standard-tanh-kfac-at1
RUN=results/fig4-at1-cpu/kfac
TRIALS=${TRIALS:-9}
COMMON="--dataset mnist --model standard --activation tanh --optimizer kfac --batch-size 1000 --epochs 5 --warmup-epochs 1 --startup-trials 4 --sampler tpe --device cpu --storage $DB --study $STUDY --set inverse_every=1"
echo "$(date -u +%FT%TZ) start: 2 workers x locoprop tune $COMMON --trials $TRIALS (the first with --enqueue lr=0.01,beta1=0.9,beta2=0.95,eps=0.01)"
OMP_NUM_THREADS=1 .venv/bin/locoprop tune $COMMON --trials "$TRIALS" --sampler-seed 0 \
    --enqueue lr=0.01,beta1=0.9,beta2=0.95,eps=0.01 > "$HERE/log-kfac-worker0.txt" 2>&1 &
sleep 5  # the first worker creates the study and enqueues its trial first
OMP_NUM_THREADS=1 .venv/bin/locoprop tune $COMMON --trials "$TRIALS" --sampler-seed 1 > "$HERE/log-kfac-worker1.txt" 2>&1 &
wait
.venv/bin/locoprop tune --storage "$DB" --study "$STUDY" --report "$HERE/best-kfac.yaml" --top 5 > "$HERE/log-kfac-report.txt" 2>&1
echo "$(date -u +%FT%TZ) done tuning; start train: locoprop train --config $HERE/best-kfac.yaml --epochs 100 --warmup-epochs 5 --device cpu --no-progress --out $RUN"
mkdir -p "$(dirname "$RUN")"
OMP_NUM_THREADS=2 .venv/bin/locoprop train --config "$HERE/best-kfac.yaml" --epochs 100 --warmup-epochs 5 \
    --device cpu --no-progress --out "$RUN" > "$HERE/train-kfac-at1.txt" 2>&1 || true
echo "$(date -u +%FT%TZ) done train"
