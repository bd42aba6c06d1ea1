#!/usr/bin/env bash
# CPU campaign for Shampoo@1 (inverse roots every step, as in Fig. 4) with shampoo_root=eigh: the exact
# ridged inverse 4th roots from a float64 eigendecomposition instead of the library's float32 coupled
# Newton iteration, which costs 2.6 s a step on this CPU (results/shampoo-cost-cpu/) and, at the tiny
# epsilons the earlier study chose, returns roots up to 60% away from the ridged root it aims at (see
# README.md). Trials of 5 epochs on all 60,000 MNIST images (1 warm-up epoch), one worker, the first trial
# being the best setting of results/tuning-5epoch/ (Shampoo@50, Newton); then the best setting trains for
# the figure's 100 epochs (5 warm-up) into results/fig4-at1-cpu/shampoo (resumable: rerun with TRAIN_ONLY=1,
# which adds --resume). Run from the repository root:
#     nohup bash results/tuning-shampoo-at1-cpu/run.sh >> results/tuning-shampoo-at1-cpu/run.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
HERE=results/tuning-shampoo-at1-cpu
DB=$HERE/standard-mnist-tanh-shampoo-at1-cpu.db
STUDY=mnist-standard-tanh-shampoo-at1-eigh
RUN=results/fig4-at1-cpu/shampoo
TRIALS=${TRIALS:-12}
COMMON="--dataset mnist --model standard --activation tanh --optimizer shampoo --batch-size 1000 --epochs 5 --warmup-epochs 1 --startup-trials 4 --sampler tpe --device cpu --storage $DB --study $STUDY --set inverse_every=1 --set shampoo_root=eigh"
if [ -z "${TRAIN_ONLY:-}" ]; then
    FIRST=lr=4.821499261771703e-05,beta1=0.9982187052438247,beta2=0.9528532157449153,eps=1.4367255171576717e-09
    echo "$(date -u +%FT%TZ) start: locoprop tune $COMMON --trials $TRIALS --sampler-seed 0 --enqueue $FIRST"
    .venv/bin/locoprop tune $COMMON --trials "$TRIALS" --sampler-seed 0 --enqueue "$FIRST" > "$HERE/log-shampoo.txt" 2>&1
    .venv/bin/locoprop tune --storage "$DB" --study "$STUDY" --report "$HERE/best-shampoo.yaml" --top 5 >> "$HERE/log-shampoo.txt" 2>&1
    RESUME=""
else
    RESUME="--resume"
fi
echo "$(date -u +%FT%TZ) start train: locoprop train --config $HERE/best-shampoo.yaml --epochs 100 --warmup-epochs 5 --device cpu --no-progress --out $RUN $RESUME"
mkdir -p "$(dirname "$RUN")"
.venv/bin/locoprop train --config "$HERE/best-shampoo.yaml" --epochs 100 --warmup-epochs 5 \
    --device cpu --no-progress --out "$RUN" $RESUME >> "$HERE/train-shampoo-at1.txt" 2>&1 || true
echo "$(date -u +%FT%TZ) done train"
