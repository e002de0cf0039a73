"""The benchmark harness: rows carry the schema's fields, losses agree, failures become rows."""

import math

from dpo_kernels.bench import run_method
from dpo_kernels.bench.report import markdown

TINY = dict(workload="dpo_step", pairs=2, seq_len=16, hidden=32, vocab=300, dtype="float32",
            device="cpu", warmup=1, repeats=2)


def test_rows_and_losses_agree():
    rows = [run_method(dict(TINY, method=m), timeout=300) for m in ("dpo_kernels", "naive")]
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2
        assert math.isfinite(r["peak_mem_mb"]) and math.isfinite(r["first_step_mem_mb"])
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-5
    table = markdown({"device": "cpu", "rows": [dict(r, tokens=64) for r in rows]})
    assert "| dpo_kernels |" in table and "| naive |" in table


def test_failures_are_rows_not_gaps():
    unknown = run_method(dict(TINY, method="nope"))
    assert unknown["error"].startswith("not run: unknown method")
    slow = run_method(dict(TINY, method="naive", repeats=10**7), timeout=20)
    assert slow["error"] == "timeout after 20 s"
    broken = run_method(dict(TINY, method="naive", dtype="no_such_dtype"))
    assert "AttributeError" in broken["error"]
