"""Benchmarks of dpo_kernels against its peers: each method in its own process, same inputs.

:func:`run_method` runs one (method, workload, shape) in a fresh Python process
(:mod:`dpo_kernels.bench.worker`) and returns its row: median time, peak memory, loss, or the error
that stopped it (a missing peer, an exception, a timeout) — never a silently dropped row.
:func:`measure_gemm` times the machine's logits GEMM at one shape the same way, in its own process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .methods import METHODS, WORKLOADS, naive_token_logprobs, unavailable_reason

__all__ = ["METHODS", "WORKLOADS", "measure_gemm", "naive_token_logprobs", "run_method"]


def run_method(spec: dict, timeout: float = 600.0) -> dict:
    """One results row for ``spec`` (method, workload, pairs, seq_len, hidden, vocab, dtype,
    device, repeats, warmup): the spec's fields plus ``median_ms``, ``peak_mem_mb``, ``loss`` or
    ``error``."""
    row = dict(spec)
    reason = unavailable_reason(spec["method"], spec.get("softcap"), spec.get("workload"))
    if reason is not None:
        row["error"] = f"not run: {reason}"
        return row
    return _in_worker(row, timeout)


def measure_gemm(spec: dict, timeout: float = 600.0) -> dict:
    """The GEMM floor at one shape: ``spec`` (rows, hidden, vocab, dtype, device; optional warmup,
    repeats, budget_s) plus ``gflops``, ``median_ms`` and ``times_ms``, or ``error``."""
    return _in_worker(dict(spec, kind="gemm"), timeout)


def _stopped(row: dict, lines: list[str], killed: float, timeout: float) -> dict:
    """The row of a run stopped at ``timeout`` from the worker's progress lines. With timed steps
    finished it is a measurement of fewer steps (``partial``, ``stopped``); without, an ``error``
    row that keeps the warm-up time and how long the unfinished step had run."""
    steps = [ln.split()[1:] for ln in lines if ln.startswith("STEP ")]
    warm = [float(ln.split()[1]) for ln in lines if ln.startswith("WARM ")]
    began = [float(ln.split()[1]) for ln in lines if ln.startswith("BEGIN ")]
    if warm:
        row["warmup_ms"] = warm
    if steps:
        times = [float(st[0]) for st in steps]
        row.update(
            median_ms=statistics.median(times),
            times_ms=times,
            timed_steps=len(times),
            partial=True,
            loss=float(steps[-1][1]),
            peak_mem_mb=float(steps[-1][2]),
            stopped=f"timeout after {timeout:.0f} s",
        )
        return row
    row["error"] = f"timeout after {timeout:.0f} s"
    if began and len(began) > len(warm):  # stopped inside a step
        # How long that step had run: a lower bound on its time (a partial measured time, not a
        # bare timeout); "warm-up" where it was the first step (compilation included).
        row["step_lower_bound_ms"] = 1e3 * (killed - began[-1])
        row["unfinished_step"] = "timed" if len(warm) >= int(row.get("warmup", 1)) else "warm-up"
    return row


def _in_worker(row: dict, timeout: float) -> dict:
    """``row`` updated with what a fresh worker process reports for it."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a benchmark times compiled code or none
    # Large buffers from mmap, unmapped when freed: resident size follows live memory (glibc
    # otherwise raises this threshold after the first big free and keeps freed memory resident).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dpo_kernels.bench.worker", json.dumps(row)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return _stopped(row, out.splitlines(), time.time(), timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        row["error"] = f"worker exited {proc.returncode}: {tail[0][:300]}"
        return row
    row.update(json.loads(lines[-1][len("RESULT ") :]))
    row["wall_s"] = round(time.perf_counter() - start, 2)  # the whole process: imports included
    return row
