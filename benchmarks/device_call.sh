#!/usr/bin/env bash
# The next device session's first call (docs/performance.md, "The next device session, prepared"), as one
# script, so that the call is `bash benchmarks/device_call.sh` with carry [".whl", ".carrydata"] and
# timeout_s 580 (its parts' timeouts add up to 560 s).  Since session 31 a TF32 row runs its whole step
# with TF32 allowed (the TF32 goal); -localtf32 is the former row (TF32 in the local products
# alone).  Session 32 adds the grouped part: solve_order="grouped", two Triton launches per local iteration
# for all layers, and the tiles part, its tile sizes and launch options (the host part is shorter and the
# memory, CPU, perf and profile parts' timeouts smaller to make room).
# Everything it measures is written under $OUT; each part
# has its own timeout, so one part that hangs leaves the others' files.
#
#   PART=tests|perf|change|grouped|tiles|overlap|host|memory|cpu|profile  runs one part only (a rerun of what failed).
set -uo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt" 2>&1

part() { [ -z "${PART:-}" ] || [ "$PART" = "$1" ]; }
started=$(date +%s)
stamp() { echo "$1: done after $(( $(date +%s) - started )) s (rc $2)" | tee -a "$OUT/parts.txt"; }

if part tests; then  # the CUDA tests, and the fast solver's CPU tests on the device's Python (about 175 tests:
  # session 18 ran 150 in 110 s on 8 workers); -v: each test's result as it ends, kept should the timeout hit
  timeout 170 python3 -m pytest -v --tb=short -p no:cacheprovider -n 12 tests/cuda tests/test_fused.py \
    > "$OUT/tests.txt" 2>&1
  stamp tests $?
fi
if part perf; then  # step times at T = 1, 5, 10, with and without the finite check, FP32 and TF32
  timeout 85 python3 benchmarks/step_time.py --models standard wide --batch-sizes 1000 \
    --optimizers rmsprop locoprop-m --local-steps 1 5 10 --precisions fp32 tf32 \
    --modes eager graph graphed graphed-nocheck --steps 20 --warmup 3 --deadline-s 76 \
    --out "$OUT/perf.json" > "$OUT/perf.txt" 2>&1
  stamp perf $?
fi
if part change; then  # the update form (TF32, bf16) with and without its changes written by the Triton kernels
  # (session 30: 678 against 390 launches a solve of the standard model, results/kernel-counts/), and TF32 in
  # the local products alone (session 18's 4.72x of the TF32 floor was measured so)
  timeout 45 python3 benchmarks/step_time.py --models standard wide --batch-sizes 1000 --optimizers locoprop-m \
    --local-steps 10 --precisions tf32 bf16 --modes graphed graphed-nochange graphed-localtf32 --steps 20 \
    --warmup 3 --deadline-s 40 --out "$OUT/perf-change.json" > "$OUT/perf-change.txt" 2>&1
  stamp change $?
fi
if part grouped; then  # iteration k of every layer in two Triton launches (session 32: 2T launches a solve
  # where the layer-major order issues 390 on the standard model), FP32, TF32 and bf16, against the default
  timeout 45 python3 benchmarks/step_time.py --models standard wide --batch-sizes 1000 --optimizers locoprop-m \
    --local-steps 10 --precisions fp32 tf32 bf16 --modes graphed graphed-grouped graphed-grouped-tf32x3 --steps 20 \
    --warmup 3 --deadline-s 40 --out "$OUT/perf-grouped.json" > "$OUT/perf-grouped.txt" 2>&1
  stamp grouped $?
fi
if part tiles; then  # the grouped kernels' tiles and launch options, chosen without a GPU, on the TF32 step
  timeout 25 python3 benchmarks/grouped_tiles.py --models standard --precisions tf32 --configs \
    64x64x32,64x64x32,8,3 64x64x32,64x64x32,4,3 64x64x32,64x64x32,8,2 128x64x32,32x64x64,8,3 \
    64x128x32,32x64x32,8,3 --warmup 3 --steps 20 --out "$OUT/grouped-tiles.json" > "$OUT/grouped-tiles.txt" 2>&1
  stamp tiles $?
fi
if part overlap; then  # each layer solved beside the rest of the backward pass, on its stream, in the one graph
  # (session 30: solve_in_backward="overlap"), against the default (every layer after the pass)
  timeout 40 python3 benchmarks/step_time.py --models standard wide --batch-sizes 1000 --optimizers locoprop-m \
    --local-steps 10 --precisions fp32 --modes graphed graphed-nocheck graphed-overlap graphed-overlap-nocheck \
    --steps 20 --warmup 3 --deadline-s 36 --out "$OUT/perf-overlap.json" > "$OUT/perf-overlap.txt" 2>&1
  stamp overlap $?
fi
if part host; then  # the captured step's host work on the device's CPU
  timeout 10 python3 benchmarks/host_overhead.py --calls 1000 --models standard deep --label "device host" \
    --out "$OUT/host-overhead.json" > "$OUT/host-overhead.txt" 2>&1
  stamp host $?
fi
if part memory; then  # the shared gradient buffers, fewer streams (session 20), the kept outputs (session 21),
  # each layer solved eagerly during the backward pass (solve_in_backward=True on CUDA, session 24), with
  # check_finite="layer" (one layer's rollback copy at a time, session 28), and the grouped order (session 32:
  # one stream, so one cuBLAS workspace, and no gradient buffers)
  timeout 60 python3 benchmarks/step_time.py --models standard wide --batch-sizes 1000 \
    --optimizers adam locoprop-m --local-steps 10 --precisions fp32 \
    --modes eager graphed graphed-host graphed-host-s0 graphed-host-s0-recompute graphed-s2 graphed-s4 \
    fused-inbackward fused-inbackward-host fused-nocheck-inbackward fused-inbackward-layercheck graphed-grouped \
    --steps 5 --warmup 2 --deadline-s 55 \
    --out "$OUT/perf-memory.json" > "$OUT/perf-memory.txt" 2>&1
  stamp memory $?
fi
if part cpu; then  # the issue's CPU goal on the device's Xeon (AVX512-bf16, AMX), two threads; bf16 only (FP32's
  # products alone give 7.7x), so that the compiled bf16 chain (session 33) has time to compile within the part
  timeout 30 python3 benchmarks/step_time.py --device cpu --threads 2 --models standard --batch-sizes 1000 \
    --optimizers rmsprop locoprop-m --local-steps 10 --precisions bf16 \
    --modes eager fused fused-compiled --steps 5 --warmup 2 --deadline-s 24 \
    --out "$OUT/perf-cpu-amx.json" > "$OUT/perf-cpu-amx.txt" 2>&1
  stamp cpu $?
fi
if part profile; then  # where the standard step's time goes: kernels by kind, and the timeline
  timeout 25 python3 benchmarks/step_profile.py --model standard --modes graphed graphed-nocheck graphed-overlap \
    --warmup 3 --steps 3 --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1
  stamp profile $?
  # and the TF32 step (8.57x of the TF32 floor in session 18), the default and grouped: where its time goes
  timeout 25 python3 benchmarks/step_profile.py --model standard --modes graphed graphed-grouped --precision tf32 \
    --warmup 3 \
    --steps 3 --out "$OUT/profile-tf32.json" > "$OUT/profile-tf32.txt" 2>&1
  stamp profile-tf32 $?
fi
