"""Run one method on one workload in this process and print one JSON line of results.

``python -m dpo_kernels.bench.worker '<json spec>'``. Each method runs in its own process so that
its peak resident memory (CPU) is its own. After the warm-up steps (imports, compilation, first-call
caches) the peak is reset (``/proc/self/clear_refs``); the high-water mark over the timed steps
minus the resident size at that point is the method's peak memory per step. The runner sets
``MALLOC_MMAP_THRESHOLD_`` so large buffers are returned to the OS when freed and the resident
size follows live memory. ``first_step_mem_mb`` is the same delta over the warm-up steps, from just
after the inputs are built: one-time costs (imports, compilation, caches, the gradients' first
allocation) included. On CUDA the same is done with ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .methods import BUILDERS, make_inputs


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak memory from now on, above the current level: CUDA allocator or resident size."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.ok = _reset_peak_rss()
            self.base = _rss_mb("VmRSS")

    def delta_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _rss_mb("VmHWM") - self.base if self.ok else float("nan")


def run(spec: dict) -> dict:
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    x = make_inputs(spec["pairs"], spec["seq_len"], spec["hidden"], spec["vocab"], dtype, device,
                    spec["workload"], spec.get("prompt_frac", 0.25), spec.get("seed", 0),
                    spec.get("softcap"))
    step = BUILDERS[spec["method"]](x)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    warmup, repeats = spec.get("warmup", 1), spec.get("repeats", 3)
    # First step(s): imports, compilation, first-call caches and the gradients' first allocation.
    mark = PeakMeter(cuda)
    for _ in range(warmup):
        step()
    sync()
    first = mark.delta_mb()
    # Then each timed step's own peak above what lives between steps.
    mark = PeakMeter(cuda)
    times, loss = [], None
    for _ in range(repeats):
        sync()
        if cuda:  # device time between two events: no host-side launch jitter
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        print(f"STEP {1e3 * times[-1]:.1f}", flush=True)  # read back if the run times out
    peak = mark.delta_mb()
    return {"median_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times],
            "peak_mem_mb": peak, "first_step_mem_mb": first, "loss": float(loss)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        out = run(spec)
    except Exception as e:  # reported as the row's error, never dropped
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
