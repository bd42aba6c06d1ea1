#!/usr/bin/env bash
# Issue 4's closing comparison: the paper's ordering of final train losses (standard MNIST tanh autoencoder,
# 100 epochs, batch 1000), decided by benchmarks/paper_ordering.py from the run folders below; writes
# ordering.md and ordering.json here. Run from the repository root: bash results/paper-ordering/run.sh
#  - Fig. 3(a) and LocoProp-S, LocoProp-M (T = 5, 10): one H100 session, settings of results/tuning/
#    (results/gpu-standard-mnist/); T = 50: H200, same settings (results/gpu-h200-standard-mnist/).
#  - Fig. 4: K-FAC@1 and Shampoo@1 on the CPU (results/fig4-at1-cpu/), @50 (results/fig4-at50-cpu/).
set -euo pipefail
G=results/gpu-standard-mnist
H=results/gpu-h200-standard-mnist
F=results/fig4-at1-cpu
A=results/fig4-at50-cpu
${PYTHON:-.venv/bin/python} benchmarks/paper_ordering.py \
    first-order:sgd=$G/sgd first-order:momentum=$G/momentum first-order:nesterov=$G/nesterov \
    first-order:adagrad=$G/adagrad first-order:adam=$G/adam first-order:rmsprop=$G/rmsprop \
    locoprop-s=$G/locoprop-s locoprop-m-T5=$G/locoprop-m-T5 locoprop-m=$G/locoprop-m locoprop-m-T50=$H/locoprop-m-T50 \
    "second-order:K-FAC@1=$F/kfac" "second-order:K-FAC@1 (H200 study)=$F/kfac-h200-tuned" \
    "second-order:Shampoo@1=$F/shampoo" "second-order:K-FAC@50=$A/kfac-at50" "second-order:Shampoo@50=$A/shampoo-at50" \
    --close 0.10 --out results/paper-ordering/ordering > /dev/null
echo "$(date -u +%FT%TZ) wrote results/paper-ordering/ordering.md and ordering.json on $(hostname) ($(uname -m))" \
    > results/paper-ordering/made.txt
