"""Gather what ``benchmarks/gpu.sh`` wrote into one results JSON.

    python benchmarks/gpu_results.py DIR [--mode run|dry] [--budget S]

Reads, in ``DIR``: ``steps.tsv`` (one line per step: name, exit status, seconds, cap),
``info.txt``, ``cuda-tests.xml`` (pytest's JUnit XML; else the summary line of
``cuda-tests.log``), ``probe.json`` (``benchmarks/gpu_probe.py``) and ``bench/results.json``
(``dpo-kernels bench``), and writes ``DIR/results.json``: the probe's results under ``probe``, the
test counts under ``tests``, and under ``bench`` the path of the bench's results file with one line
per row (method, workload, median time, peak memory, or the error). Missing parts are recorded
as such, so a step that failed or ran out of time still leaves a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def steps(d: Path) -> list:
    out = []
    f = d / "steps.tsv"
    if f.exists():
        for line in f.read_text().splitlines():
            name, rc, seconds, cap = line.split("\t")
            out.append(dict(name=name, rc=int(rc), seconds=int(seconds), cap_s=int(cap)))
            if int(rc) in (124, 130, 137):
                out[-1]["note"] = "stopped at its time cap"
    return out


def tests(d: Path) -> dict:
    got = dict(log=_rel(d / "cuda-tests.log"))
    xml = d / "cuda-tests.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
            skipped = sum(int(s.get("skipped", 0)) for s in suites)
            got.update(
                source=_rel(xml),
                passed=n["tests"] - n["failures"] - n["errors"] - skipped,
                failed=n["failures"],
                errors=n["errors"],
                skipped=skipped,
                seconds=sum(float(s.get("time", 0)) for s in suites),
            )
            got["failures"] = [
                f"{c.get('classname')}::{c.get('name')}"
                for c in root.iter("testcase")
                if c.find("failure") is not None or c.find("error") is not None
            ][:50]
        except (ET.ParseError, ValueError) as e:
            got["xml_error"] = str(e)
    log = d / "cuda-tests.log"
    if "passed" not in got and log.exists():
        text = log.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)]
        if lines:
            got["source"] = _rel(log)
            for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
                got["errors" if word.startswith("error") else word] = int(count)
            for k in ("passed", "failed", "skipped", "errors"):
                got.setdefault(k, 0)
    if log.exists():
        got["interrupted"] = "KeyboardInterrupt" in log.read_text(errors="replace")
    if "passed" not in got:
        got["error"] = "no test summary (the step did not run or was killed)"
    return got


def bench(d: Path) -> dict:
    f = d / "bench" / "results.json"
    if not f.exists():
        return dict(results=None, error=f"{_rel(f)} was not written")
    r = json.loads(f.read_text())
    rows = []
    for row in r.get("rows", []):
        line = dict(method=row["method"], workload=row["workload"], tokens=row["tokens"])
        for k in ("median_ms", "peak_mem_mb", "gflops", "gemm_frac", "check", "error"):
            if k in row:
                line[k] = row[k]
        rows.append(line)
    return dict(
        results=_rel(f),
        plot=_rel(d / "bench" / "results.png") if (d / "bench" / "results.png").exists() else None,
        command=r.get("command"),
        device=r.get("device"),
        floor=r.get("floor"),
        rows=rows,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--mode", default="run", choices=["run", "dry"])
    p.add_argument("--budget", type=int, help="the time budget of the whole script, seconds")
    args = p.parse_args(argv)
    d = args.dir
    probe_file = d / "probe.json"
    probe = (
        json.loads(probe_file.read_text())
        if probe_file.exists()
        else {"error": f"{_rel(probe_file)} was not written"}
    )
    s = steps(d)
    result = dict(
        kind="gpu.sh",
        mode=args.mode,
        device=probe.get("device"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=f"benchmarks/gpu.sh {args.mode}",
        budget_s=args.budget,
        wall_s=sum(x["seconds"] for x in s),
        steps=s,
        info=(d / "info.txt").read_text() if (d / "info.txt").exists() else None,
        tests=tests(d),
        bench=bench(d),
        probe=probe,
    )
    out = d / "results.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    t = result["tests"]
    counts = ", ".join(f"{t[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if k in t)
    print(f"tests: {counts or t.get('error')}")
    print(f"bench: {len(result['bench'].get('rows', []))} rows in {result['bench']['results']}")
    print(f"results: {_rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
