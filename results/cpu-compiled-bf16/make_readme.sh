#!/usr/bin/env bash
# Regenerates this folder's README.md from its two runs (run from the repository root:
# bash results/cpu-compiled-bf16/make_readme.sh). Every number comes from the runs' files.
set -euo pipefail
dir=results/cpu-compiled-bf16
PY=${PYTHON:-.venv/bin/python}
common="--config results/tuning/best-locoprop-m.yaml --epochs 10 --warmup-epochs 5 --limit-train 60000 --limit-test 10000 --precision bf16 --device cpu --data-dir ../shared/data/mnist --no-progress"
$PY benchmarks/results_readme.py "$dir" \
  --title "LocoProp-M with bf16 local products on the CPU: the compiled chain against the eager chain, 10 epochs" \
  --command "OMP_NUM_THREADS=2 locoprop train $common --out $dir/locoprop-m-bf16-eager" \
  --command "OMP_NUM_THREADS=2 locoprop train $common --compile-elementwise --out $dir/locoprop-m-bf16-compiled" \
  --command "bash $dir/make_readme.sh   # this README" \
  --note "**What it shows.** Session 33's compiled bf16 chain on the CPU (\`--compile-elementwise\` with \`--precision bf16\`: each layer's local iteration two compiled programs that read the bf16 products as they are, \`docs/performance.md\`) against the eager bf16 chain in training: the tuned LocoProp-M settings (\`results/tuning/best-locoprop-m.yaml\`: η = 8.06e-6, γ = 500, T = 10, batch 1000, seed 0) for 10 epochs with 5 warm-up epochs, the two runs one after another, each alone on this project's 2-core AMD EPYC with AVX512-BF16 (two threads), the library of commit 4153ee9 (imported when each run started). The compiled chain rounds its elementwise work as a compiler does (fused multiply-adds), so the two runs part by float32 rounding, which the bf16 rounding of \`δ\` and of the products then carries, and these settings (γ = 500) amplify: the end-of-epoch train loss, one evaluation at one point of an oscillating trajectory, parts more than the epoch's mean minibatch loss (the table below). For scale, the eager bf16 chain and FP32 on an H100 part by more over the same settings' 100 epochs (\`../cpu-precision-100epoch/\`). The compiled run's first epoch holds its compilations (on a machine whose compiler cache held earlier compilations of the same programs: session 33's benchmarks)." \
  > /dev/null
$PY - "$dir" >> "$dir/README.md" <<'PYEOF'
import json, sys
from pathlib import Path

folder = Path(sys.argv[1])
runs = {name: [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        for name in ("locoprop-m-bf16-eager", "locoprop-m-bf16-compiled")}
eager = {r["epoch"]: r for r in runs["locoprop-m-bf16-eager"]}
compiled = {r["epoch"]: r for r in runs["locoprop-m-bf16-compiled"]}
print("## Epoch by epoch\n")
print("After each epoch: the train loss (evaluated on the whole training set after the epoch) and the mean of the "
      "epoch's minibatch losses (`batch_loss`), each with the compiled run's relative difference to the eager "
      "run's, the learning rate, and each epoch's wall time (the difference of `wall_time` between epochs; "
      "epoch 1 holds the compiled run's compilations). The last epoch trains at learning rate 0, where "
      "TF-RMSProp's momentum still moves the weights (the notebook's protocol stops one epoch earlier), so "
      "its loss is not a training result.\n")
print("| epoch | lr | eager train loss | compiled | difference | eager batch loss | compiled | difference | "
      "eager epoch s | compiled epoch s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
rel = lambda a, b: (b - a) / a * 100  # noqa: E731
for e in sorted(set(eager) & set(compiled)):
    if e == 0:
        continue
    a, b = eager[e], compiled[e]
    wa = a["wall_time"] - eager[e - 1]["wall_time"]
    wb = b["wall_time"] - compiled[e - 1]["wall_time"]
    print(f"| {e} | {a['lr']:.3g} | {a['train_loss']:.3f} | {b['train_loss']:.3f} | "
          f"{rel(a['train_loss'], b['train_loss']):+.3f}% | {a['batch_loss']:.3f} | {b['batch_loss']:.3f} | "
          f"{rel(a['batch_loss'], b['batch_loss']):+.3f}% | {wa:.1f} | {wb:.1f} |")
trained = [e for e in sorted(set(eager) & set(compiled)) if e >= 1 and eager[e]["lr"] > 0]
diffs = [rel(eager[e]["train_loss"], compiled[e]["train_loss"]) for e in trained]
batch = [rel(eager[e]["batch_loss"], compiled[e]["batch_loss"]) for e in trained]
print(f"\nOver the epochs that train (learning rate above 0: {trained[0]} to {trained[-1]}) the compiled run's train "
      f"loss lies from {min(diffs):+.3f}% to {max(diffs):+.3f}% of the eager run's, its mean minibatch loss from "
      f"{min(batch):+.3f}% to {max(batch):+.3f}%.")
later = [e for e in sorted(set(eager) & set(compiled)) if e >= 2]
wa = sum(eager[e]["wall_time"] - eager[e - 1]["wall_time"] for e in later)
wb = sum(compiled[e]["wall_time"] - compiled[e - 1]["wall_time"] for e in later)
print(f"\nEpochs {later[0]} to {later[-1]}: {wb:.1f} s compiled against {wa:.1f} s eager "
      f"({(wb - wa) / wa * 100:+.1f}%).")
PYEOF
