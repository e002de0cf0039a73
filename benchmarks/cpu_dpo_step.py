"""One DPO step on the CPU: dpo_kernels against every peer, each method in its own process.

    python benchmarks/cpu_dpo_step.py [--shapes W1 W2] [--dtypes float32 bfloat16] [--out FILE]

W1: 4 pairs, T=256, D=256, V=32000; W2: 2 pairs, T=512, D=512, V=128256; the first quarter of
every sequence is prompt (ignored). A step is policy forward + backward, reference forward (no
autograd) and the sigmoid DPO loss. Median of ``--repeats`` timed steps after one warm-up step;
memory is the step's peak resident size above what lives between steps (see
``dpo_kernels/bench/worker.py``). Every method's loss is recorded next to its time. A method that
runs past ``--timeout`` is reported with the step times it finished, never dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from dpo_kernels.bench import METHODS, run_method
from dpo_kernels.bench.suite import device_name, versions

SHAPES = {
    "W1": dict(pairs=4, seq_len=256, hidden=256, vocab=32000),
    "W2": dict(pairs=2, seq_len=512, hidden=512, vocab=128256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per method and shape")
    p.add_argument("--out", default="benchmarks/results/cpu_dpo_step.json")
    args = p.parse_args(argv)

    result = {
        "device": device_name("cpu"),
        **versions(),
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "memory": "peak resident size of a timed step above the resident size between steps",
        "rows": [],
    }
    jobs = [(s, d, m) for s in args.shapes for d in args.dtypes for m in args.methods]
    for k, (shape, dtype, method) in enumerate(jobs, 1):
        spec = dict(method=method, workload="dpo_step", dtype=dtype, device="cpu", warmup=1,
                    repeats=args.repeats, **SHAPES[shape])
        row = run_method(spec, timeout=args.timeout)
        row.update(shape=shape, tokens=2 * spec["pairs"] * spec["seq_len"])
        result["rows"].append(row)
        shown = (f"{row['median_ms']:9.1f} ms {row['peak_mem_mb']:8.1f} MB loss {row['loss']:.4f}"
                 if "median_ms" in row else row["error"])
        print(f"[{k}/{len(jobs)}] {shape} {dtype:8s} {method:12s} {shown}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # keep partial results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
