# The three-epoch K-FAC@1 probes run before the study (this session, 2026-11-27, on this 2-core CPU, two at a time).
# Only lr1e-2 and lr1e-1 finished (outputs and config.json here); the other four were stopped when the study began.
cd /work/main
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
probe() { name=$1; shift; .venv/bin/locoprop train --optimizer kfac --epochs 3 --warmup-epochs 1 --device cpu --no-progress --data-dir ../shared/data/mnist --out probes/$name "$@" > probes/$name.txt 2>&1; }
( probe lr1e-2 --lr 1e-2 --beta1 0.9 --beta2 0.95 --eps 1e-2; probe lr1 --lr 1 --beta1 0.9 --beta2 0.95 --eps 1e-2; probe lr1e-1clip --lr 1e-1 --beta1 0.9 --beta2 0.95 --eps 1e-2 --kl-clip 1e-3 ) &
( probe lr1e-1 --lr 1e-1 --beta1 0.9 --beta2 0.95 --eps 1e-2; probe lr1e-3 --lr 1e-3 --beta1 0.9 --beta2 0.95 --eps 1e-2; probe lr1clip --lr 1 --beta1 0.9 --beta2 0.95 --eps 1e-2 --kl-clip 1e-3 ) &
wait
