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


def test_cli_bench_writes_schema_rows_and_a_table(tmp_path, capsys):
    import json

    from dpo_kernels.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--tokens", "32", "64", "--hidden", "24", "--vocab", "211",
                 "--seq-len", "16", "--methods", "dpo_kernels", "naive", "liger",
                 "--workload", "logprobs_fwd_bwd", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert {"device", "torch", "triton", "dpo_kernels", "command", "date", "rows"} <= set(result)
    assert result["device"].startswith("cpu: ")
    assert result["command"].startswith("dpo-kernels bench")
    rows = result["rows"]
    assert [(r["method"], r["tokens"]) for r in rows] == [
        (m, t) for t in (32, 64) for m in ("dpo_kernels", "naive", "liger")]
    for r in rows:
        assert {"method", "workload", "tokens", "hidden", "vocab", "dtype"} <= set(r)
        assert r["dtype"] == "float32" and r["workload"] == "logprobs_fwd_bwd"
        if r["method"] == "liger":  # Liger has no log-probs-only entry point: a row says so
            assert "median_ms" not in r and "not run" in r["error"]
        else:
            assert r["median_ms"] > 0 and math.isfinite(r["peak_mem_mb"]), r
    assert all(r["check"] == "ok" for r in rows if r["method"] == "naive")
    printed = capsys.readouterr().out
    assert "| dpo_kernels |" in printed and "results.json" in printed


def test_plan_presets_quick_and_softcap_rows():
    import argparse

    from dpo_kernels.bench import suite

    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    specs = suite.plan(parser.parse_args(["--preset", "gemma2-2b"]), "cpu")
    assert {(s["hidden"], s["vocab"], s["softcap"]) for s in specs} == {(2304, 256000, 30.0)}
    assert {s["tokens"] for s in specs} == set(suite.TOKENS["cpu"])
    assert specs[0]["method"] == "dpo_kernels" and specs[0]["dtype"] == "float32"
    softcap_row = run_method(next(s for s in specs if s["method"] == "torch_lce"))
    assert softcap_row["error"] == "not run: F.linear_cross_entropy has no softcap"
    gpu = suite.plan(parser.parse_args(["--preset", "qwen2.5-7b", "--dtype", "bf16"]), "cuda")
    assert {s["dtype"] for s in gpu} == {"bfloat16"} and max(s["tokens"] for s in gpu) == 16384
    assert all(2 * s["pairs"] * s["seq_len"] == s["tokens"] for s in specs + gpu)
    quick = suite.plan(parser.parse_args(["--quick"]), "cpu")
    assert len({s["tokens"] for s in quick}) >= 2
    try:
        suite.plan(parser.parse_args(["--tokens", "100", "--hidden", "8", "--vocab", "9",
                                      "--seq-len", "16"]), "cpu")
    except ValueError as e:
        assert "--tokens 100" in str(e)
    else:
        raise AssertionError("an unsplittable token count must be refused")


def test_readme_benchmark_tables_are_the_committed_results():
    """Every figure of the README's bench tables comes from a results file in the repo."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    for name in ("cpu-quick", "cpu-llama3-8b"):
        folder = root / "benchmarks" / "results" / name
        assert (folder / "results.png").is_file()
        tables = markdown(json.loads((folder / "results.json").read_text()))
        for block in tables.split("\n\n"):
            assert block.strip() in readme, (name, block[:200])
