"""benchmarks/step_time.py on CUDA: the memory columns that only a GPU has (warm-up and steady peaks, pools)."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_step_time_splits_the_peak_and_names_the_graph_pools(tmp_path):
    """A short run of Adam (eager) and LocoProp-M (``graphed``: the step in one CUDA graph) on the standard
    model: each record has its warm-up and steady peaks, what it holds after, and the allocator's memory by
    pool, where the captured LocoProp step shows a graph's private pool and Adam's eager step none."""
    spec = importlib.util.spec_from_file_location("step_time", REPO / "benchmarks" / "step_time.py")
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    out = tmp_path / "perf.json"
    st.main(["--models", "standard", "--batch-sizes", "100", "--optimizers", "adam", "locoprop-m", "--local-steps",
             "2", "--precisions", "fp32", "--modes", "eager", "graphed", "--steps", "2", "--warmup", "3",
             "--out", str(out)])
    records = {r["optimizer"]: r for r in json.loads(out.read_text())["records"] if "step_ms_median" in r}
    assert set(records) == {"adam", "locoprop-m"}
    for r in records.values():
        assert 0 < r["peak_mem_mb_steady"] <= r["peak_mem_mb"] and 0 < r["peak_mem_mb_warmup"] <= r["peak_mem_mb"]
        assert 0 < r["mem_mb_held_after"] <= r["peak_mem_mb"]
        assert r["memory_by_pool"] and all(p["allocated_mb"] <= p["reserved_mb"] for p in r["memory_by_pool"])
    assert any(p["pool"].startswith("graph pool") for p in records["locoprop-m"]["memory_by_pool"])
    assert not any(p["pool"].startswith("graph pool") and p["allocated_mb"] > 0
                   for p in records["adam"]["memory_by_pool"])
