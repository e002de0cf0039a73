"""The benchmark harness: rows carry the schema's fields, losses agree, failures become rows."""

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from dpo_kernels.bench import run_method, suite
from dpo_kernels.bench.methods import naive_token_logprobs, unavailable_reason
from dpo_kernels.bench.report import markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

TINY = dict(
    workload="dpo_step",
    pairs=2,
    seq_len=16,
    hidden=32,
    vocab=300,
    dtype="float32",
    device="cpu",
    warmup=1,
    repeats=2,
)


def test_rows_and_losses_agree():
    rows = [run_method(dict(TINY, method=m), timeout=300) for m in ("dpo_kernels", "naive")]
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2
        assert math.isfinite(r["peak_mem_mb"]) and math.isfinite(r["first_step_mem_mb"])
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-5
    table = markdown({"device": "cpu", "rows": [dict(r, tokens=64) for r in rows]})
    assert "| dpo_kernels |" in table and "| naive |" in table


def _args(*argv):
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_naive_baseline_is_the_op():
    """The one naive baseline: float32 log-probs of the labels, 0 at ignored positions."""
    import dpo_kernels as dk

    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(3, 7, 16, generator=g), torch.randn(53, 16, generator=g)
    labels = torch.randint(0, 53, (3, 7), generator=g)
    labels[:, :2] = -100
    for softcap in (None, 2.0):
        got = naive_token_logprobs(h, w, labels, softcap)
        want = dk.linear_logprobs(h.double(), w.double(), labels, reduction="none", softcap=softcap)
        assert got.dtype == torch.float32 and got.shape == labels.shape
        assert torch.allclose(got.double(), want, atol=1e-5), (got - want).abs().max()
        assert (got[:, :2] == 0).all() and (got[:, 2:] < 0).all()


def test_failures_are_rows_not_gaps():
    unknown = run_method(dict(TINY, method="nope"))
    assert unknown["error"].startswith("not run: unknown method")
    start = time.perf_counter()  # a run that cannot end in time is stopped there, and is a row
    slow = run_method(dict(TINY, method="naive", repeats=10**7), timeout=1.5)
    if "median_ms" in slow:  # stopped after some timed steps: a measurement of fewer steps
        assert slow["stopped"] == "timeout after 2 s" and slow["partial"] and "error" not in slow
    else:
        assert slow["error"] == "timeout after 2 s"
    assert slow["method"] == "naive" and slow["repeats"] == 10**7
    assert time.perf_counter() - start < 10
    broken = run_method(dict(TINY, method="naive", dtype="no_such_dtype"))
    assert "AttributeError" in broken["error"]


def test_cli_bench_writes_schema_rows_and_a_table(tmp_path, capsys):
    from dpo_kernels.cli import main

    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--tokens",
                "32",
                "64",
                "--hidden",
                "24",
                "--vocab",
                "211",
                "--seq-len",
                "16",
                "--methods",
                "dpo_kernels",
                "naive",
                "liger",
                "--workload",
                "logprobs_fwd_bwd",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    assert {"device", "torch", "triton", "dpo_kernels", "command", "date", "rows"} <= set(result)
    assert result["device"].startswith("cpu: ")
    assert result["command"].startswith("dpo-kernels bench")
    rows = result["rows"]
    assert [(r["method"], r["tokens"]) for r in rows] == [
        (m, t) for t in (32, 64) for m in ("dpo_kernels", "naive", "liger")
    ]
    for r in rows:
        assert {"method", "workload", "tokens", "hidden", "vocab", "dtype"} <= set(r)
        assert r["dtype"] == "float32" and r["workload"] == "logprobs_fwd_bwd"
        if r["method"] == "liger":  # Liger has no log-probs-only entry point: a row says so
            assert "median_ms" not in r and "not run" in r["error"]
        else:
            assert r["median_ms"] > 0 and math.isfinite(r["peak_mem_mb"]), r
    assert all(r["check"] == "ok" for r in rows if r["method"] == "naive")
    # The GEMM floor: one entry per (D, V, scored rows, dtype), measured before the methods.
    floor = {(f["hidden"], f["vocab"], f["rows"], f["dtype"]): f for f in result["floor"]}
    # The run's dtype at every shape; on a CPU also fp32 and bf16 at the head's largest rows.
    assert set(floor) == {
        (24, 211, 24, "float32"),
        (24, 211, 48, "float32"),
        (24, 211, 48, "bfloat16"),
    }
    assert all(f["gflops"] > 0 and len(f["times_ms"]) >= 1 for f in floor.values())
    # FLOPs and bytes over the scored tokens: 2 sequences per pair, a quarter of each prompt.
    for r in rows:
        nv = 2 * r["pairs"] * (16 - 4)
        assert r["scored_tokens"] == nv == 3 * r["tokens"] // 4
        assert r["flops"] == 6 * nv * 24 * 211 and r["bytes"] == 3 * 4 * 24 * (211 + nv)
        if "median_ms" in r:
            assert math.isclose(r["gflops"], r["flops"] / r["median_ms"] / 1e6)
            f = floor[(24, 211, nv, "float32")]
            assert r["gemm_gflops"] == f["gflops"]
            assert math.isclose(r["gemm_frac"], r["gflops"] / f["gflops"])
    out = capsys.readouterr()
    printed = out.out
    assert "| dpo_kernels |" in printed and "results.json" in printed
    assert "| GFLOP/s | of GEMM |" in printed
    # The heading states the measured floor as a rate; the floor's progress line goes to stderr,
    # never into the table. (A plain "GEMM floor 1" substring check was flaky: it matched a
    # floor of 14.7 GFLOP/s on a slower CPU.)
    assert re.search(r"GEMM floor [\d,.]+ GFLOP/s\)", printed)
    assert "GEMM floor D=" not in printed
    assert "GEMM floor torch.mm [24 × 24]·[24 × 211] float32:" in out.err + printed  # the header
    ours = next(r for r in rows if r["method"] == "dpo_kernels")
    assert f"| {ours['gflops']:,.1f} | {ours['gemm_frac']:.0%} |" in printed


def test_plan_presets_quick_and_softcap_rows():
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
    assert {
        (s["tokens"], s["pairs"], s["seq_len"], s["hidden"], s["vocab"], s["workload"])
        for s in quick
    } == {
        (256, 1, 128, 256, 32000, "dpo_step"),
        (1024, 4, 128, 256, 32000, "dpo_step"),
    }  # as measured before
    try:
        suite.plan(
            parser.parse_args(
                ["--tokens", "100", "--hidden", "8", "--vocab", "9", "--seq-len", "16"]
            ),
            "cpu",
        )
    except ValueError as e:
        assert "--tokens 100" in str(e)
    else:
        raise AssertionError("an unsplittable token count must be refused")


def test_readme_benchmark_tables_are_the_committed_results():
    """Every figure of the README's bench tables comes from a results file in the repo."""
    readme = (ROOT / "README.md").read_text()
    for name in ("cpu-quick", "cpu-llama3-8b", "cpu-llama3-8b-bf16", "cpu-w1w2-xeon"):
        folder = RESULTS / name
        assert (folder / "results.png").is_file()
        tables = markdown(json.loads((folder / "results.json").read_text()))
        for block in tables.split("\n\n"):
            assert block.strip() in readme, (name, block[:200])
    from dpo_kernels.bench.report import goals  # the goal run: its goal lines, whole

    goal_run = json.loads((RESULTS / "cpu-goal-epyc" / "results.json").read_text())
    assert goals(goal_run) in readme and goal_run["cpu"]["isa"]


def test_w1_w2_presets_are_the_cpu_step_shapes():
    specs = suite.plan(_args("--preset", "W1", "--preset", "W2", "--dtype", "fp32", "bf16"), "cpu")
    shapes = {
        (s["preset"], s["pairs"], s["seq_len"], s["tokens"], s["hidden"], s["vocab"]) for s in specs
    }
    assert shapes == {("W1", 4, 256, 2048, 256, 32000), ("W2", 2, 512, 2048, 512, 128256)}
    assert {s["workload"] for s in specs} == {"dpo_step"}
    assert {s["softcap"] for s in specs} == {None}
    assert [(s["preset"], s["dtype"]) for s in specs if s["method"] == "dpo_kernels"] == [
        ("W1", "float32"),
        ("W1", "bfloat16"),
        ("W2", "float32"),
        ("W2", "bfloat16"),
    ]
    assert len(specs) == 4 * len(suite.METHODS)
    w2 = next(s for s in specs if s["preset"] == "W2" and s["dtype"] == "bfloat16")
    assert w2["scored_tokens"] == 1536 and w2["flops"] == 8 * 1536 * 512 * 128256
    assert w2["bytes"] == 4 * 2 * 512 * (128256 + 1536)
    for extra in (["--tokens", "128"], ["--seq-len", "64"]):
        try:
            suite.plan(_args("--preset", "W1", *extra), "cpu")
        except ValueError as e:
            assert "--preset W1 is a fixed batch" in str(e)
        else:
            raise AssertionError(f"W1 has fixed tokens: {extra} must be refused")


def test_report_renders_results_without_a_floor():
    result = json.loads((RESULTS / "cpu-llama3-8b" / "results.json").read_text())
    assert "floor" not in result and "flops" not in result["rows"][0]
    table = markdown(result)
    ours = result["rows"][0]
    assert ours["method"] == "dpo_kernels" and ours["tokens"] == 128
    assert ours["workload"] == "logprobs_fwd_bwd"
    # 96 scored tokens of 128; 6·Nv·D·V FLOPs from the row's shape; no floor: "—"
    rate = 6 * 96 * 4096 * 128256 / (ours["median_ms"] / 1e3) / 1e9
    assert f"| dpo_kernels | {ours['median_ms']:,.1f} ms | {rate:,.1f} | — | — |" in table
    assert "GEMM floor not measured" in table
    assert "| GFLOP/s | of GEMM |" in table


def test_converted_w1_w2_results_render():
    path = RESULTS / "cpu-w1w2" / "results.json"
    result = json.loads(path.read_text())
    assert {
        "device",
        "torch",
        "triton",
        "dpo_kernels",
        "versions",
        "command",
        "date",
        "note",
        "rows",
    } <= set(result)
    assert "benchmarks/cpu_dpo_step.py" in result["command"] and "converted" in result["note"]
    rows = result["rows"]
    assert len(rows) == 24 and {r["preset"] for r in rows} == {"W1", "W2"}
    for r in rows:
        assert {
            "method",
            "workload",
            "preset",
            "tokens",
            "hidden",
            "vocab",
            "softcap",
            "dtype",
            "pairs",
            "seq_len",
            "scored_tokens",
            "flops",
            "bytes",
        } <= set(r)
        assert "shape" not in r and ("median_ms" in r) != ("error" in r)
    w1 = next(
        r
        for r in rows
        if (r["preset"], r["dtype"], r["method"]) == ("W1", "float32", "dpo_kernels")
    )
    assert w1["median_ms"] == 846.1704219998865 and w1["peak_mem_mb"] == 4.9765625
    table = markdown(result)
    assert "**W1** (dpo_step, float32; 2048 tokens, D = 256, V = 32,000; 1,536 scored" in table
    assert "**W2** (dpo_step, bfloat16; 2048 tokens, D = 512, V = 128,256; 1,536 scored" in table
    assert "| dpo_kernels | 846.2 ms | 119.0 | — |" in table
    assert "| trl_chunked | timeout after 240 s (timed steps finished: 68.0 s, 65.1 s) |" in table


def test_budget_cuts_the_timed_steps_and_says_so():
    row = run_method(dict(TINY, method="naive", repeats=50, budget_s=0.0), timeout=300)
    assert row["timed_steps"] == 1 and row["partial"] is True and len(row["times_ms"]) == 1
    full = run_method(dict(TINY, method="naive", repeats=2), timeout=300)
    assert full["timed_steps"] == 2 and full["partial"] is False
    table = markdown({"device": "cpu", "rows": [dict(row, tokens=64)]})
    assert f"| naive | {row['median_ms']:,.1f} ms (1 step) |" in table


def test_a_stopped_run_reports_how_long_its_step_had_run(monkeypatch):
    """The runner reads the worker's BEGIN/WARM/STEP lines from a stopped run (faked here): with a
    timed step finished the row is that measurement; without, the unfinished step's elapsed time
    is a lower bound (here a step begun 30 s before the stop)."""
    import subprocess

    import dpo_kernels.bench as bench

    now = 1000.0
    progress = f"BEGIN {now - 50:.3f}\nWARM 20000.0\nBEGIN {now - 30:.3f}\n"

    def stopped_with(out):
        def fake_run(*_a, timeout, **_k):
            raise subprocess.TimeoutExpired("worker", timeout, output=out)

        return fake_run

    monkeypatch.setattr(bench.time, "time", lambda: now)
    monkeypatch.setattr(bench.subprocess, "run", stopped_with(progress))
    row = run_method(dict(TINY, method="naive"), timeout=60)
    assert row["error"] == "timeout after 60 s" and "median_ms" not in row
    assert row["warmup_ms"] == [20000.0] and abs(row["step_lower_bound_ms"] - 30000.0) < 1
    assert row["unfinished_step"] == "timed"
    ours = dict(TINY, method="dpo_kernels", tokens=64, median_ms=3000.0, peak_mem_mb=1.0, loss=0.7)
    table = markdown({"device": "cpu", "rows": [ours, dict(row, tokens=64)]})
    assert "| naive | timeout after 60 s (a step takes > 30.0 s) | | | < 0.10 |" in table

    progress += "STEP 21000.0 0.693 12.5\n"
    monkeypatch.setattr(bench.subprocess, "run", stopped_with(progress))
    row = run_method(dict(TINY, method="naive"), timeout=60)
    assert "error" not in row and row["median_ms"] == 21000.0 and row["partial"] is True
    assert row["loss"] == 0.693 and row["peak_mem_mb"] == 12.5
    assert row["stopped"] == "timeout after 60 s"
    table = markdown({"device": "cpu", "rows": [ours, dict(row, tokens=64)]})
    assert "| naive | 21,000.0 ms (1 step, stopped) |" in table


def test_estimate_is_bounded_and_grows_with_work():
    spec = dict(
        next(iter(suite.plan(_args("--preset", "llama3-8b", "--tokens", "128"), "cpu"))),
        warmup=1,
    )
    slow = suite.estimate_s(spec, 1.0, timeout=60)
    fast = suite.estimate_s(spec, 1000.0, timeout=60)
    assert slow == 60 and suite.STARTUP_S["cpu"] < fast < slow
    gemm = dict(rows=96, hidden=4096, vocab=128256, dtype="float32", device="cpu")
    assert suite.estimate_s(gemm, 100.0, timeout=60) < 60


def test_main_job_defaults_fit_five_minutes_on_a_cpu():
    """The CPU defaults of `dpo-kernels bench` (no flags): one head, one token count, every run
    capped, so the worst case (every run reaching its timeout) stays near five minutes of runs
    that are each cut well before (the budget)."""
    specs = suite.plan(_args(), "cpu")
    assert {s["preset"] for s in specs} == {"llama3-8b"} and {s["tokens"] for s in specs} == {128}
    assert {s["workload"] for s in specs} == {"dpo_step"}
    assert all(s["budget_s"] == suite.BUDGET["cpu"] for s in specs)
    runs = [
        s for s in specs if unavailable_reason(s["method"], s["softcap"], s["workload"]) is None
    ]
    assert len(runs) <= 6 and suite.TIMEOUT["cpu"] <= 60


def test_a_dpo_step_is_not_rerun_where_its_logprobs_pass_was_stopped():
    stopped_row = dict(
        TINY,
        method="torch_lce",
        workload="logprobs_fwd_bwd",
        tokens=64,
        error="timeout after 30 s",
        step_lower_bound_ms=25000.0,
        unfinished_step="warm-up",
    )
    stopped = {suite._slow_key(stopped_row): stopped_row}
    spec = dict(stopped_row, workload="dpo_step")
    for k in ("error", "step_lower_bound_ms", "unfinished_step"):
        spec.pop(k)
    row = suite.known_too_slow(spec, stopped)
    assert row["error"].startswith("not run: its first logprobs_fwd_bwd step")
    assert "median_ms" not in row
    assert row["step_lower_bound_ms"] == 25000.0
    assert suite.known_too_slow(dict(spec, method="naive"), stopped) is None
    assert suite.known_too_slow(dict(spec, workload="logprobs_fwd_bwd"), stopped) is None


def test_goal_lines_compare_ours_with_the_fastest_and_leanest_peer_that_finished():
    from dpo_kernels.bench.report import goals

    base = dict(TINY, tokens=64, loss=0.7)
    rows = [
        dict(base, method="dpo_kernels", median_ms=90.0, peak_mem_mb=2.0),
        dict(base, method="naive", median_ms=100.0, peak_mem_mb=8.0),
        dict(base, method="cce", median_ms=120.0, peak_mem_mb=4.0),
        dict(base, method="torch_lce", error="timeout after 40 s"),  # did not finish: no peer
    ]
    table = goals({"rows": rows})
    line = table.splitlines()[-1]
    assert "| naive 100.0 ms | 0.90 | ≤ 0.9 met |" in line and "| cce 4.0 MB | 0.50 |" in line
    rows[0]["median_ms"] = 95.0
    assert "≤ 0.9 missed" in goals({"rows": rows})


def test_cpu_results_name_the_cpu_kind():
    record = suite.cpu_record()
    assert record["model"] and record["threads"] >= 1
    assert record["isa"] is None or set(record["isa"]) <= set(suite.ISA_FLAGS)
    assert (
        record["cpp_bf16_path"] in ("native", "widen") or "unavailable" in record["cpp_bf16_path"]
    )
    table = markdown({"device": "cpu: X", "cpu": dict(record, isa=["avx2", "fma"]), "rows": []})
    assert table.startswith("Device: cpu: X (ISA: avx2, fma);")


# ----------------------------------------------------------------------------- dpo_step recompute


def test_dpo_kernels_recompute_is_ours_without_the_loss_level_path(monkeypatch):
    """``dpo_kernels_recompute``: FusedLinearDPOLoss with DPO_KERNELS_LOSS_PATH=recompute during
    its steps only; same loss as ``dpo_kernels``, whose row says it took the fast path."""
    import os

    import dpo_kernels.loss_path as lp
    from dpo_kernels.bench.methods import BUILDERS, make_inputs

    monkeypatch.delenv("DPO_KERNELS_LOSS_PATH", raising=False)
    rows = {
        m: run_method(dict(TINY, method=m), timeout=300)
        for m in ("dpo_kernels", "dpo_kernels_recompute")
    }
    assert all("error" not in r for r in rows.values()), rows
    assert rows["dpo_kernels"]["loss_path"] == "fast (1 chunk)"
    assert (
        rows["dpo_kernels_recompute"]["loss_path"] == "recompute: DPO_KERNELS_LOSS_PATH=recompute"
    )
    ours = rows["dpo_kernels"]
    suite._check(rows["dpo_kernels_recompute"], ours)
    assert rows["dpo_kernels_recompute"]["check"] == "ok"
    assert rows["dpo_kernels_recompute"]["loss_rel_diff"] <= 1e-6

    # In this process: the fast path's fused call runs for dpo_kernels only, and the variable is
    # set during the recompute method's steps alone.
    calls = []
    real = lp.fused_pair_loss
    monkeypatch.setattr(lp, "fused_pair_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method, fused in (("dpo_kernels", 1), ("dpo_kernels_recompute", 0)):
        x = make_inputs(2, 16, 32, 300, torch.float32, "cpu", "dpo_step")
        calls.clear()
        BUILDERS[method](x)()
        assert len(calls) == fused, method
        assert x.weight.grad is not None and "DPO_KERNELS_LOSS_PATH" not in os.environ

    # Opt-in on dpo_step (the default job keeps its runs and its time). Elsewhere a row says
    # why: on the log-probs pass (the plain op always recomputes), and for a trainer method on
    # an LM-head workload.
    assert {s["method"] for s in suite.plan(_args(), "cpu")} == set(suite.METHODS)
    named = suite.plan(
        _args("--preset", "W1", "--methods", "dpo_kernels", "dpo_kernels_recompute"), "cpu"
    )
    assert [s["method"] for s in named] == ["dpo_kernels", "dpo_kernels_recompute"]
    assert "always recomputes" in unavailable_reason(
        "dpo_kernels_recompute", None, "logprobs_fwd_bwd"
    )
    assert unavailable_reason("dpo_kernels_recompute", None, "dpo_step") is None
    assert "trainer_step only" in unavailable_reason("dpo_kernels_packed", None, "dpo_step")


# ----------------------------------------------------------------------------- trainer_step


def test_trainer_step_plan_real_vocab_reduced_hidden_and_not_in_the_default_job():
    from dpo_kernels.bench.methods import TRAINER_METHODS

    specs = suite.plan(_args("--preset", "llama3-8b", "--workload", "trainer_step"), "cpu")
    assert [s["method"] for s in specs] == list(TRAINER_METHODS)
    s = specs[0]
    assert (s["hidden"], s["vocab"], s["real_hidden"]) == (1024, 128256, 4096)
    assert "instead of llama3-8b's 4096" in s["note"]
    assert (s["tokens"], s["pairs"], s["seq_len"], s["layers"], s["intermediate"]) == (
        2048,
        4,
        256,
        2,
        2048,
    )
    assert 1 / 3 <= s["pad_fraction"] <= 1 / 2
    assert s["real_tokens"] == round((1 - s["pad_fraction"]) * s["tokens"])
    assert s["scored_tokens"] + s["prompt_tokens"] == s["real_tokens"]
    assert s["flops"] == 8 * s["scored_tokens"] * 1024 * 128256  # the LM head's passes only
    # On a GPU: the real D; a custom shape as given; never in a default run.
    gpu = suite.plan(_args("--preset", "llama3-8b", "--workload", "trainer_step"), "cuda")
    assert gpu[0]["hidden"] == 4096 and "real_hidden" not in gpu[0] and gpu[0]["tokens"] == 8192
    for device in ("cpu", "cuda"):
        assert all(s["workload"] != "trainer_step" for s in suite.plan(_args(), device))
    # A method a workload has no part in is a row saying so.
    mixed = suite.plan(
        _args("--preset", "W1", "--workload", "trainer_step", "--methods", "dpo_kernels", "naive"),
        "cpu",
    )
    assert [(s["workload"], s["hidden"], s["vocab"]) for s in mixed] == [
        ("trainer_step", 256, 32000)
    ] * 2
    assert "trainer_step runs whole trainers" in run_method(mixed[1])["error"]
    try:
        suite.plan(
            _args(
                "--tokens",
                "16",
                "--hidden",
                "8",
                "--vocab",
                "9",
                "--seq-len",
                "8",
                "--workload",
                "trainer_step",
            ),
            "cpu",
        )
    except ValueError as e:
        assert "pads a third to a half" in str(e)
    else:
        raise AssertionError("a batch that cannot pad a third to a half must be refused")


def test_trainer_step_runs_each_trainer_and_their_losses_agree():
    """One warm-up (``trainer.train()``, one step) and one timed optimizer step of each method in
    its own process at a tiny shape: every row timed, the same batch, the same loss."""
    from concurrent.futures import ThreadPoolExecutor

    specs = suite.plan(
        _args(
            *("--tokens", "64", "--hidden", "32", "--vocab", "257", "--seq-len", "16"),
            *("--workload", "trainer_step", "--repeats", "1"),
        ),
        "cpu",
    )
    assert specs[0]["method"] == "dpo_kernels" and len(specs) == 4
    with ThreadPoolExecutor(2) as pool:  # two one-thread workers at a time
        rows = list(pool.map(lambda s: run_method(dict(s, threads=1), timeout=240), specs))
    ours = rows[0]
    for r in rows:
        assert "error" not in r, r
        assert r["timed_steps"] == 1 and r["median_ms"] > 0 and math.isfinite(r["peak_mem_mb"])
        assert (r["tokens"], r["pairs"], r["seq_len"]) == (64, 2, 16)
        assert 1 / 3 <= r["pad_fraction"] <= 1 / 2 and r["real_tokens"] < r["tokens"]
        assert r["backbone_params"] > 0 and r["model_params"] > r["backbone_params"]
        suite._check(r, ours)
    assert [r["check"] for r in rows[1:]] == ["ok"] * 3
    assert max(r["loss_rel_diff"] for r in rows[1:]) <= 1e-5
    # The reference differs from the policy: a method that ignored it (loss log 2) would differ
    # from ours by 10x that bound (measured 5e-4 relative here; 0.1 at the real head).
    assert abs(ours["loss"] - math.log(2)) > 1e-4
    table = markdown({"device": "cpu", "rows": rows})
    assert f"of 64 padded (pad fraction {ours['pad_fraction']:.0%})" in table
    assert "| dpo_kernels_packed |" in table and "| trl |" in table
