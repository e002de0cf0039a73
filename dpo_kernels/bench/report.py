"""Markdown tables from a benchmark results JSON (``python -m dpo_kernels.bench.report FILE``).

Each time is followed by its rate (``GFLOP/s``: the workload's useful FLOPs over the median time,
the same count for every method) and that rate as a fraction of the GEMM floor measured in the same
run (``of GEMM``), "—" where the file has no floor. Files older than the counts get them from
their rows' shapes (:func:`dpo_kernels.bench.methods.work`, the bench's default quarter of each
sequence prompt). A ``trainer_step`` table's heading also gives its batch (real and padded
tokens, the pad fraction) and model (decoder layers, backbone parameters, a reduced hidden size).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Optional

from .methods import scored_tokens, work

COLUMNS = (
    "method",
    "median time",
    "GFLOP/s",
    "of GEMM",
    "ours / it",
    "step memory",
    "ours / it",
    "first-step memory",
    "loss",
)


def _fmt(x, unit=""):
    return "—" if x is None else f"{x:,.1f}{unit}"


def _pct(x):
    return "—" if x is None else f"{x:.0%}"


def _check_cell(row: dict) -> str:
    if "check" not in row:
        return "—"
    return f"{row['check']} ({row['loss_rel_diff']:.1e})"


def error_text(row: dict) -> str:
    """A row without a time: its error, and what was measured before it stopped (finished timed
    steps; how long the step it was stopped in had run: a lower bound on the step time)."""
    parts = [row["error"]]
    if row.get("finished_steps_ms"):
        parts.append(
            "timed steps finished: "
            + ", ".join(f"{t / 1e3:.1f} s" for t in row["finished_steps_ms"])
        )
    if "step_lower_bound_ms" in row:
        which = {"warm-up": "its first (warm-up) step", "inferred": "so a step"}.get(
            row.get("unfinished_step"), "a step"
        )
        parts.append(f"{which} takes > {row['step_lower_bound_ms'] / 1e3:.1f} s")
    return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


def _counts(row: dict) -> Optional[tuple[int, int, int]]:
    """(scored tokens, flops, bytes) of a row's step: its own, else from its shape."""
    if "flops" in row:
        return row["scored_tokens"], row["flops"], row["bytes"]
    if "pairs" not in row or "seq_len" not in row:
        return None
    scored = scored_tokens(row["pairs"], row["seq_len"], row.get("prompt_frac", 0.25))
    return (scored, *work(row["workload"], scored, row["hidden"], row["vocab"], row["dtype"]))


def _gflops(row: dict) -> Optional[float]:
    if "gflops" in row:
        return row["gflops"]
    counts = _counts(row)
    return None if counts is None else counts[1] / (row["median_ms"] / 1e3) / 1e9


def _floor_rate(result: dict, row: dict) -> Optional[float]:
    counts = _counts(row)
    for f in result.get("floor") or ():
        if counts is not None and (
            (f["hidden"], f["vocab"], f["rows"], f["dtype"])
            == (row["hidden"], row["vocab"], counts[0], row["dtype"])
        ):
            return f.get("gflops")
    return None


def _heading(result: dict, row: dict, shape: str, rows: Sequence[dict] = ()) -> str:
    cap = f", softcap {row['softcap']:g}" if row.get("softcap") else ""
    counts, floor = _counts(row), _floor_rate(result, row)
    per_step = (
        ""
        if counts is None
        else (
            f"; {counts[0]:,} scored: {counts[1] / 1e9:,.1f} GFLOP and {counts[2] / 1e6:,.1f} MB "
            f"least traffic per step; GEMM floor "
            + ("not measured" if floor is None else f"{floor:,.1f} GFLOP/s")
        )
    )
    head = (
        f"**{shape}** ({row['workload']}, {row['dtype']}; {row['tokens']} tokens, "
        f"D = {row['hidden']}, V = {row['vocab']:,}{cap}{per_step})"
    )
    return head + _trainer_text(row, rows)


def _trainer_text(row: dict, rows: Sequence[dict] = ()) -> str:
    """A trainer_step heading's batch and model: real and padded tokens, the backbone (its
    parameter count from any row that has it) and a note (a reduced hidden size)."""
    if "real_tokens" not in row:
        return ""
    params = next((r["backbone_params"] for r in (row, *rows) if "backbone_params" in r), None)
    model = f"a Llama with {row.get('layers', '?')} decoder layers"
    if params is not None:
        model += f" ({params / 1e6:,.1f} M backbone parameters)"
    out = (
        f". LM-head counts only. {row['pairs']} pairs: {row['real_tokens']:,} real tokens "
        f"of {row['tokens']:,} padded (pad fraction {row['pad_fraction']:.0%}); {model}"
    )
    return out + (f"; {row['note']}" if row.get("note") else "") + "."


def markdown(result: dict) -> str:
    """One table per (shape, dtype): each method's time, rate, memory and loss, and our time and
    memory as a fraction of each peer's (below 1: we are faster / leaner)."""
    groups = defaultdict(list)
    for row in result["rows"]:
        name = row.get("preset") or "custom"
        key = (
            name,
            row["tokens"],
            row["hidden"],
            row["vocab"],
            row.get("softcap"),
            row["dtype"],
            row["workload"],
        )
        groups[key].append(row)
    versions = result.get("versions") or {"torch": result.get("torch")}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "python")
    isa = (result.get("cpu") or {}).get("isa")
    isa = f" (ISA: {', '.join(isa)})" if isa else ""
    out = [
        f"Device: {result['device']}{isa}; {shown}; command: `{result.get('command')}`; "
        f"{result.get('date')}.",
        "",
    ]
    if result.get("note"):
        out += [f"Note: {result['note']}", ""]
    for key, rows in groups.items():
        ours = next((r for r in rows if r["method"] == "dpo_kernels" and "median_ms" in r), None)
        checked = any("check" in r for r in rows)
        columns = COLUMNS + (("loss vs ours",) if checked else ())
        out.append(_heading(result, rows[0], key[0], rows))
        out.append("")
        out.append("| " + " | ".join(columns) + " |")
        out.append("|---|" + "---:|" * (len(COLUMNS) - 1) + ("---|" if checked else ""))
        for r in rows:
            if "median_ms" not in r:
                bound = ""  # a stopped run's lower bound on its step time bounds our ratio
                if ours is not None and r.get("step_lower_bound_ms", 0) > 0:
                    bound = f"< {ours['median_ms'] / r['step_lower_bound_ms']:.2f}"
                rest = ["", "", bound] + [""] * (len(columns) - 5)
                out.append(
                    f"| {r['method']} | {error_text(r)} |"
                    + "".join(f" {c} |" if c else " |" for c in rest)
                )
                continue
            t_ratio = m_ratio = "—"
            rate, floor = _gflops(r), _floor_rate(result, r)
            if ours is not None and r is not ours:
                t_ratio = f"{ours['median_ms'] / r['median_ms']:.2f}"
                if r["peak_mem_mb"] > 0:
                    m_ratio = f"{ours['peak_mem_mb'] / r['peak_mem_mb']:.2f}"
            n = r.get("timed_steps")
            cut = ", stopped" if r.get("stopped") else ""
            steps = f" ({n} step{'s' if n != 1 else ''}{cut})" if r.get("partial") else ""
            out.append(
                f"| {r['method']} | {_fmt(r['median_ms'], ' ms')}{steps} | {_fmt(rate)} | "
                f"{_pct(None if rate is None or floor is None else rate / floor)} | {t_ratio} | "
                f"{_fmt(r['peak_mem_mb'], ' MB')} | {m_ratio} | "
                f"{_fmt(r.get('first_step_mem_mb'), ' MB')} | {r['loss']:.4f} |"
                + (f" {_check_cell(r)} |" if checked else "")
            )
        out.append("")
    return "\n".join(out)


#: The CPU goal of issue 15: our time over the fastest peer's that finished, per workload and dtype.
GOAL = {
    ("dpo_step", "float32"): 0.9,
    ("dpo_step", "bfloat16"): 0.9,
    ("logprobs_fwd_bwd", "bfloat16"): 0.9,
    ("logprobs_fwd_bwd", "float32"): 1.1,
}


def goals(result: dict) -> str:
    """One line per (shape, workload, dtype): our time over the fastest peer's that finished and
    our step memory over the leanest's, against :data:`GOAL` (time) and 1 (memory)."""
    groups = defaultdict(list)
    for row in result["rows"]:
        key = (row.get("preset") or "custom", row["tokens"], row["workload"], row["dtype"])
        groups[key].append(row)
    out = [
        "| shape | workload | dtype | ours | fastest peer | ours / it | goal | ours, memory | "
        "leanest peer | ours / it |",
        "|---|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for (shape, tokens, workload, dtype), rows in groups.items():
        ours = next((r for r in rows if r["method"] == "dpo_kernels" and "median_ms" in r), None)
        # Peers only: our own variants (recompute, packed) are not what we are measured against.
        peers = [r for r in rows if not r["method"].startswith("dpo_kernels") and "median_ms" in r]
        if ours is None or not peers:
            continue
        fast = min(peers, key=lambda r: r["median_ms"])
        lean = min(peers, key=lambda r: r["peak_mem_mb"])
        t, m = ours["median_ms"] / fast["median_ms"], ours["peak_mem_mb"] / lean["peak_mem_mb"]
        goal = GOAL.get((workload, dtype))
        mark = "—" if goal is None else f"≤ {goal:g} " + ("met" if t <= goal else "missed")
        out.append(
            f"| {shape} ({tokens} tok) | {workload} | {dtype} | {_fmt(ours['median_ms'], ' ms')} | "
            f"{fast['method']} {_fmt(fast['median_ms'], ' ms')} | {t:.2f} | {mark} | "
            f"{_fmt(ours['peak_mem_mb'], ' MB')} | {lean['method']} "
            f"{_fmt(lean['peak_mem_mb'], ' MB')} | {m:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m dpo_kernels.bench.report FILE [--goals]``: the tables, or the goal lines."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        result = json.load(f)
    print(goals(result) if "--goals" in argv[1:] else markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
