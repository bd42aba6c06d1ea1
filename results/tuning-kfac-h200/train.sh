#!/usr/bin/env bash
# K-FAC@1 for Fig. 4 (standard), 100 epochs (5 warm-up) on this 2-core CPU, one thread (a Shampoo run
# used the other core), with the best setting of the 10-epoch H200 study in this folder (best-kfac.yaml).
# Resumes from its checkpoint when run again.  Run from the repository root:
#     nohup bash results/tuning-kfac-h200/train.sh >> results/tuning-kfac-h200/train.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
HERE=results/tuning-kfac-h200
RUN=results/fig4-at1-cpu/kfac-h200-tuned
echo "$(date -u +%FT%TZ) start: OMP_NUM_THREADS=1 locoprop train --config $HERE/best-kfac.yaml --epochs 100 --warmup-epochs 5 --device cpu --data-dir ../shared/data/mnist --no-progress --resume --out $RUN"
OMP_NUM_THREADS=1 .venv/bin/locoprop train --config "$HERE/best-kfac.yaml" --epochs 100 --warmup-epochs 5 \
    --device cpu --data-dir ../shared/data/mnist --no-progress --resume --out "$RUN"
echo "$(date -u +%FT%TZ) done train"
