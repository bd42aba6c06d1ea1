"""Rebuild results/perf/NVIDIA-H200-2026-11-27-session6.json from the records that benchmarks/step_time.py printed
into perf.txt in this session's first device call.  The command was killed at its 80 s limit while it compiled
its last configuration, before it wrote its JSON (step_time.py now rewrites the JSON after every record).  The
records are copied as printed; `write_results` adds the ratios as step_time.py does; the product rates in `meta`
are derived from the records' floors (floor_ms = product GFLOP / rate), since that run printed no rates.
Run from the repository root:  .venv/bin/python results/gpu-h200-session6/rebuild_perf_json.py"""
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("step_time", "benchmarks/step_time.py")
step_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_time)

records = [json.loads(line) for line in (HERE / "perf.txt").read_text().splitlines() if line.startswith('{"device"')]
command = next(line.split("$ ", 1)[1].rsplit("  (limit", 1)[0] for line in (HERE / "device-call1-session.log")
               .read_text().splitlines() if "step_time.py" in line and "$ " in line)
fp32 = [r for r in records if r["precision"] == "fp32"]
rate_fp32 = fp32[0]["product_gflop"] / fp32[0]["floor_ms"]  # GFLOP/ms = TFLOP/s
tf32 = [r for r in records if r["precision"] == "tf32"]
rates = {"fp32": rate_fp32}
for r in tf32:  # floor = backprop GFLOP at the fp32 rate + local GFLOP at the tf32 rate
    same = next(x for x in fp32 if (x["model"], x["batch_size"], x["optimizer"]) == (r["model"], r["batch_size"],
                                                                                       "rmsprop"))
    local = r["product_gflop"] - same["product_gflop"]
    rates["tf32"] = local / (r["floor_ms"] - same["floor_ms"])
meta = {"command": command.replace("/opt/torch/.venv/bin/python3", "python"), "date": "2026-11-27",
        "device": records[0]["device"], "torch": "2.11.0+cu130", "threads": 16, "matmul_tflops": rates,
        "floor": "products of forward+backward (3 per layer) at the fp32 rate plus 2 per layer per local iteration "
                 "at the rate of the local precision",
        "note": "rebuilt by results/gpu-h200-session6/rebuild_perf_json.py from the records printed in perf.txt "
                "(the command was killed at its 80 s limit during its last, compiled, configuration); rates "
                "derived from the records' floors"}
out = Path("results/perf/NVIDIA-H200-2026-11-27-session6.json")
step_time.write_results(out, meta, records)
print(f"{len(records)} records, rates {rates}, written {out}")
