"""Markdown tables from a benchmark results JSON (``python -m dpo_kernels.bench.report FILE``)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _fmt(x, unit=""):
    return "—" if x is None else f"{x:,.1f}{unit}"


def _check_cell(row: dict) -> str:
    if "check" not in row:
        return "—"
    return f"{row['check']} ({row['loss_rel_diff']:.1e})"


def markdown(result: dict) -> str:
    """One table per (shape, dtype): each method's time, memory and loss, and our time and memory
    as a fraction of each peer's (below 1: we are faster / leaner)."""
    groups = defaultdict(list)
    for row in result["rows"]:
        name = row.get("shape") or row.get("preset") or "custom"
        key = (name, row["tokens"], row["dtype"], row["workload"])
        groups[key].append(row)
    versions = result.get("versions") or {"torch": result.get("torch")}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "python")
    out = [f"Device: {result['device']}; {shown}; command: `{result.get('command')}`; "
           f"{result.get('date')}.", ""]
    for (shape, _, dtype, workload), rows in groups.items():
        ours = next((r for r in rows if r["method"] == "dpo_kernels" and "median_ms" in r), None)
        first = rows[0]
        checked = any("check" in r for r in rows)
        cap = f", softcap {first['softcap']:g}" if first.get("softcap") else ""
        out.append(f"**{shape}** ({workload}, {dtype}; {first['tokens']} tokens, "
                   f"D = {first['hidden']}, V = {first['vocab']:,}{cap})")
        out.append("")
        out.append("| method | median time | ours / it | step memory | ours / it | "
                   "first-step memory | loss |" + (" loss vs ours |" if checked else ""))
        out.append("|---|---:|---:|---:|---:|---:|---:|" + ("---|" if checked else ""))
        for r in rows:
            if "median_ms" not in r:
                done = ", ".join(f"{t / 1e3:.1f} s" for t in r.get("finished_steps_ms", []))
                note = r["error"] + (f" (timed steps finished: {done})" if done else "")
                out.append(f"| {r['method']} | {note} | | | | | |" + (" |" if checked else ""))
                continue
            t_ratio = m_ratio = "—"
            if ours is not None and r is not ours:
                t_ratio = f"{ours['median_ms'] / r['median_ms']:.2f}"
                if r["peak_mem_mb"] > 0:
                    m_ratio = f"{ours['peak_mem_mb'] / r['peak_mem_mb']:.2f}"
            out.append(
                f"| {r['method']} | {_fmt(r['median_ms'], ' ms')} | {t_ratio} | "
                f"{_fmt(r['peak_mem_mb'], ' MB')} | {m_ratio} | "
                f"{_fmt(r.get('first_step_mem_mb'), ' MB')} | {r['loss']:.4f} |"
                + (f" {_check_cell(r)} |" if checked else "")
            )
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        print(markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
