"""Benchmark results on disk: ``{"meta": ..., "records": [...]}`` as JSON, with a README made from them beside it.

The benchmarks of ``benchmarks/`` write their figures through :func:`write_records`, so that every file in
``results/`` says the command, machine and date that produced it (in ``meta``) and its README is generated from
the same records (no figure typed by hand).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

__all__ = ["write_records"]


def write_records(out: str | Path, meta: dict, records: list[dict],
                  readme: Callable[[dict, list[dict], str], str] | None = None) -> Path:
    """Write ``{"meta": meta, "records": records}`` to ``out`` atomically (a reader never sees half a file, and
    a run stopped mid-write leaves the previous file), and, with ``readme(meta, records, json_name)``, a
    ``README.md`` beside it.  Returns the JSON file's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    os.replace(tmp, out)
    if readme is not None:
        (out.parent / "README.md").write_text(readme(meta, records, out.name))
    return out
