"""Run one method on one workload in this process and print one JSON line of results.

``python -m dpo_kernels.bench.worker '<json spec>'``. Each method runs in its own process so that
its peak resident memory (CPU) is its own. After the warm-up steps (imports, compilation, first-call
caches) the peak is reset (``/proc/self/clear_refs``); the high-water mark over the timed steps
minus the resident size at that point is the method's peak memory per step. The runner sets
``MALLOC_MMAP_THRESHOLD_`` so large buffers are returned to the OS when freed and the resident
size follows live memory. ``first_step_mem_mb`` is the same delta over the warm-up steps, from just
after the inputs are built: one-time costs (imports, compilation, caches, the gradients' first
allocation) included. On CUDA the same is done with ``max_memory_allocated``.

A spec with ``budget_s`` caps the timed steps: they stop once their sum reaches it (at least one
step), and the row says how many ran (``timed_steps``, ``partial``). Before each step the worker
prints ``BEGIN <epoch seconds>`` and after it ``WARM <ms>`` or ``STEP <ms> <loss> <peak MB>``, so
a runner that has to stop it still has the finished steps and how long the unfinished step had
run (a lower bound on its time).

A spec with ``"kind": "gemm"`` times the GEMM floor instead (:func:`gemm`): the logits GEMM alone,
``torch.mm`` of ``[rows × D]·[D × V]``, in its own process like the methods so that nothing else
runs beside it.

A method's ``step`` may carry an ``info`` dict (its loss path, its model's parameter counts):
its entries join the row.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .methods import BUILDERS, TRAINER_WORKLOAD, make_inputs


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


def _timed(fn, cuda: bool):
    """(seconds, fn()): CUDA events on a GPU (device time, no host-side launch jitter)."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def build(spec: dict):
    """The spec's ``step()``: an LM-head method on :func:`make_inputs`' tensors, or a whole
    trainer (``trainer_step``, :func:`dpo_kernels.bench.trainer_step.build`)."""
    if spec["workload"] == TRAINER_WORKLOAD:
        from .trainer_step import build as build_trainer

        return build_trainer(spec)
    x = make_inputs(
        spec["pairs"],
        spec["seq_len"],
        spec["hidden"],
        spec["vocab"],
        getattr(torch, spec["dtype"]),
        spec["device"],
        spec["workload"],
        spec.get("prompt_frac", 0.25),
        spec.get("seed", 0),
        spec.get("softcap"),
    )
    return BUILDERS[spec["method"]](x)


def run(spec: dict) -> dict:
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    step = build(spec)
    cuda = device.startswith("cuda")

    warmup, repeats = spec.get("warmup", 1), spec.get("repeats", 3)
    budget = spec.get("budget_s")
    # First step(s): imports, compilation, first-call caches and the gradients' first allocation.
    mark = PeakMeter(cuda)
    for _ in range(warmup):
        print(f"BEGIN {time.time():.3f}", flush=True)
        seconds = _timed(step, cuda)[0]
        print(f"WARM {1e3 * seconds:.1f}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    first = mark.delta_mb()
    # Then each timed step's own peak above what lives between steps.
    mark = PeakMeter(cuda)
    times, loss = [], None
    while len(times) < repeats and not (budget is not None and times and sum(times) >= budget):
        print(f"BEGIN {time.time():.3f}", flush=True)
        seconds, loss = _timed(step, cuda)
        times.append(seconds)
        # Read back if the run is stopped: the step's time, loss and the peak so far.
        print(f"STEP {1e3 * times[-1]:.1f} {float(loss):.9g} {mark.delta_mb():.3f}", flush=True)
    peak = mark.delta_mb()
    return {
        **getattr(step, "info", {}),  # what the method says of itself (e.g. its loss path)
        "median_ms": 1e3 * statistics.median(times),
        "times_ms": [1e3 * t for t in times],
        "timed_steps": len(times),
        "partial": len(times) < spec.get("repeats", 3),
        "peak_mem_mb": peak,
        "first_step_mem_mb": first,
        "loss": float(loss),
    }


def gemm(spec: dict) -> dict:
    """The machine's GEMM rate at a workload's logits GEMM: ``torch.mm`` of ``a [rows × D]`` and
    ``Wᵀ`` (``W (V, D)`` stored as an LM head is) into a preallocated ``[rows × V]``, in the spec's
    dtype; ``gflops = 2·rows·D·V / median``. Up to ``warmup`` untimed and ``repeats`` timed calls,
    each group cut short once it has used ``budget_s`` (at least one call each), so that a slow
    dtype (bf16 on a CPU without bf16 units) costs two calls, not minutes: the warm-up stops once it
    has used a quarter of the budget."""
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rows, d, v = spec["rows"], spec["hidden"], spec["vocab"]
    gen = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen).manual_seed(0)  # drawn on the GPU there: seconds, not ~10 s
    a = torch.randn(rows, d, generator=g, device=gen).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=g, device=gen) / d**0.5).to(device=device, dtype=dtype)
    out = torch.empty(rows, v, device=device, dtype=dtype)
    cuda = device.startswith("cuda")
    budget = spec.get("budget_s", 20.0)

    def call():
        return torch.mm(a, w.t(), out=out)

    warm = 0.0
    for _ in range(max(1, spec.get("warmup", 2))):
        warm += _timed(call, cuda)[0]
        if warm >= budget / 4:  # a slow GEMM (bf16 without bf16 units): one warm-up call
            break
    times: list[float] = []
    # At least one timed call, whatever the budget (--budget 0 asks for the fewest).
    while len(times) < max(1, spec.get("repeats", 5)) and not (times and sum(times) >= budget):
        times.append(_timed(call, cuda)[0])
    med = statistics.median(times)
    return {
        "median_ms": 1e3 * med,
        "times_ms": [1e3 * t for t in times],
        "gflops": 2 * rows * d * v / med / 1e9,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        out = gemm(spec) if spec.get("kind") == "gemm" else run(spec)
    except Exception as e:  # reported as the row's error, never dropped
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
