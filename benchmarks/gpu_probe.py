"""What the GPU can do, and where our Triton path spends its time, in one JSON file.

    python benchmarks/gpu_probe.py --out probe.json [--dry]

On the current device (CUDA if present, else the CPU):

- ``matmul``: the bf16 ``torch.mm`` rate at 8192³ and at the LM-head shape
  ``[N × D]·[D × Vc]`` (N = 16,384, D = 4,096, one Vc = 8,192 vocab chunk, ``W`` stored
  ``(V, D)`` as a head is), TFLOP/s from the median of timed calls (CUDA events; on the CPU
  ``time.perf_counter``);
- ``copy``: device-to-device ``Tensor.copy_`` of 1 GiB, GB/s counting the read and the write;
- ``ours``: one forward + backward of ``dpo_kernels.linear_logprobs(backend="triton")`` at the
  Llama-3-8B head (N = 16,384 valid rows, D = 4,096, V = 128,256, bf16): the medians of timed
  passes, and one pass under ``torch.profiler`` aggregated per kernel name (self device time and
  call count);
- ``cublas``: cuBLAS doing the same GEMMs per vocab chunk: the forward ``H·W_cᵀ``, and the
  backward's ``dW_c = G_cᵀ·H`` and ``dH += G_c·W_c``, timed and profiled the same way;
- ``floor``: the FLOP counts and their time at the measured ``matmul`` rate.

``--dry``, or no CUDA device: the same code at tiny shapes on the CPU (N = 64, D = 64,
V = 1,000, 256³, 16 MiB copy), with ``TRITON_INTERPRET=1`` set before Triton is imported so that
the Triton backend runs on CPU tensors; it finishes in seconds. Only the public
``dpo_kernels.linear_logprobs`` is used for our path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

FULL = dict(n=16384, d=4096, v=128256, chunk=8192, square=8192, copy_bytes=2**30)
DRY = dict(n=64, d=64, v=1000, chunk=256, square=256, copy_bytes=2**24)
TOP_KERNELS = 25


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default 20 / 3)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    start = time.perf_counter()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton (and dpo_kernels) is imported
    import torch

    cuda = torch.cuda.is_available() and not args.dry
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    dry = not cuda
    shapes = DRY if dry else FULL
    device = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (3 if dry else 20)
    timer = Timer(torch, cuda)
    result = dict(
        kind="gpu_probe",
        dry=dry,
        why_dry=None if cuda else ("--dry" if args.dry else "no CUDA device"),
        device=_device_name(torch, cuda),
        versions=_versions(torch),
        command=" ".join(["python", "benchmarks/gpu_probe.py", *argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
        timing="CUDA events" if cuda else "time.perf_counter",
        repeats=repeats,
        shapes=dict(shapes, dtype="bfloat16"),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def step(name, fn):
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # recorded, never dropped: the other parts still run
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        result[name + "_wall_s"] = round(time.perf_counter() - t, 2)
        print(f"gpu_probe: {name} done in {result[name + '_wall_s']:.1f} s", flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial too

    print(f"gpu_probe on {result['device']} ({'dry' if dry else 'full'} shapes) -> {out}")
    step("matmul", lambda: matmul_rates(torch, timer, device, shapes, repeats))
    step("copy", lambda: copy_bandwidth(torch, timer, device, shapes, repeats))
    step("ours", lambda: ours(torch, timer, device, shapes, max(2, repeats // 4), cuda))
    step("cublas", lambda: cublas(torch, timer, device, shapes, max(2, repeats // 4), cuda))
    result["floor"] = floor(result, shapes)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0


# ----------------------------------------------------------------------------- helpers


class Timer:
    """Milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn) -> float:
        if self.cuda:
            ev = [self.torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            fn()
            ev[1].record()
            ev[1].synchronize()
            return ev[0].elapsed_time(ev[1])
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    def times(self, fn, repeats: int, warmup: int = 2) -> list:
        for _ in range(warmup):
            fn()
        self.sync()
        return [self.once(fn) for _ in range(repeats)]


def _stats(times_ms: list, flops=None, nbytes=None) -> dict:
    med = statistics.median(times_ms)
    out = dict(median_ms=med, times_ms=[round(t, 4) for t in times_ms])
    if flops is not None:
        out["flops"] = flops
        out["tflops"] = flops / (med / 1e3) / 1e12
    if nbytes is not None:
        out["bytes"] = nbytes
        out["gb_per_s"] = nbytes / (med / 1e3) / 1e9
    return out


def _device_name(torch, cuda: bool) -> str:
    if cuda:
        return f"cuda: {torch.cuda.get_device_name(0)}"
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def _versions(torch) -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__)
    out["cuda"] = torch.version.cuda
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import dpo_kernels

    out["dpo_kernels"] = dpo_kernels.__version__
    return out


def _chunks(v: int, chunk: int):
    return [(c, min(c + chunk, v)) for c in range(0, v, chunk)]


def _profile(torch, fn, cuda: bool) -> dict:
    """``fn()`` once under the profiler: self device time (CPU: self CPU time) per kernel."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows, host = [], []
    for ev in prof.key_averages():
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0)
        else:
            us = ev.self_cpu_time_total
        if us > 0:
            # on CUDA, host-side ops also carry their kernels' time: kernels are rows of their own
            on_host = cuda and str(getattr(ev, "device_type", "")).endswith("CPU")
            (host if on_host else rows).append(dict(name=ev.key, count=ev.count, self_ms=us / 1e3))
    rows = rows or host  # a profiler that files kernels under their ops
    rows.sort(key=lambda r: -r["self_ms"])
    return dict(
        what="self device time per kernel" if cuda else "self CPU time per op (no device)",
        total_ms=sum(r["self_ms"] for r in rows),
        kernels=rows[:TOP_KERNELS],
        others=len(rows[TOP_KERNELS:]),
        others_ms=sum(r["self_ms"] for r in rows[TOP_KERNELS:]),
    )


# ----------------------------------------------------------------------------- measurements


def matmul_rates(torch, timer, device, s, repeats) -> list:
    bf16 = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    m = s["square"]
    a = torch.randn(m, m, generator=g, device=device, dtype=bf16)
    b = torch.randn(m, m, generator=g, device=device, dtype=bf16)
    c = torch.empty(m, m, device=device, dtype=bf16)
    t = timer.times(lambda: torch.mm(a, b, out=c), repeats)
    out.append(dict(name="square", m=m, k=m, n=m, layout="A·B", **_stats(t, 2 * m**3)))
    n, d, vc = s["n"], s["d"], s["chunk"]
    h = torch.randn(n, d, generator=g, device=device, dtype=bf16)
    w = torch.randn(vc, d, generator=g, device=device, dtype=bf16)
    c = torch.empty(n, vc, device=device, dtype=bf16)
    t = timer.times(lambda: torch.mm(h, w.t(), out=c), repeats)
    out.append(
        dict(name="lm_head_chunk", m=n, k=d, n=vc, layout="H·W_cᵀ", **_stats(t, 2 * n * d * vc))
    )
    return out


def copy_bandwidth(torch, timer, device, s, repeats) -> dict:
    nbytes = s["copy_bytes"]
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timer.times(lambda: dst.copy_(src), repeats)
    return dict(size_bytes=nbytes, counted="read + write", **_stats(t, nbytes=2 * nbytes))


def _head_inputs(torch, device, s):
    n, d, v = s["n"], s["d"], s["v"]
    b = max(1, n // 1024)  # sequences of 1,024 tokens, every token scored
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(b, n // b, d, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(v, d, generator=g, device=device) * d**-0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (b, n // b), generator=g, device=device)
    return h.requires_grad_(), w.requires_grad_(), labels


def ours(torch, timer, device, s, repeats, cuda) -> dict:
    import dpo_kernels

    h, w, labels = _head_inputs(torch, device, s)
    state = {}

    def fwd():
        state["out"] = dpo_kernels.linear_logprobs(h, w, labels, backend="triton")

    def bwd():
        torch.autograd.grad(state["out"].sum(), [h, w])

    def both():
        fwd()
        bwd()

    t = time.perf_counter()
    both()  # compiles the kernels (or fills the interpreter's caches)
    timer.sync()
    first_s = time.perf_counter() - t
    fwd_ms, bwd_ms, both_ms = [], [], []
    for _ in range(repeats):
        fwd_ms.append(timer.once(fwd))
        bwd_ms.append(timer.once(bwd))
        both_ms.append(timer.once(both))
    n, d, v = s["n"], s["d"], s["v"]
    return dict(
        call="dpo_kernels.linear_logprobs(hidden, weight, labels, backend='triton')",
        hidden=list(h.shape),
        weight=list(w.shape),
        first_call_s=first_s,
        forward=_stats(fwd_ms, 2 * n * d * v),
        backward=_stats(bwd_ms),
        # useful work: forward + dH + dW (the backward's logit recompute is overhead)
        fwd_bwd=_stats(both_ms, 6 * n * d * v),
        profile=_profile(torch, both, cuda),
    )


def cublas(torch, timer, device, s, repeats, cuda) -> dict:
    bf16 = torch.bfloat16
    n, d, v, chunk = s["n"], s["d"], s["v"], s["chunk"]
    g = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(n, d, generator=g, device=device, dtype=bf16)
    w = torch.randn(v, d, generator=g, device=device, dtype=bf16)
    grad = torch.randn(n, chunk, generator=g, device=device, dtype=bf16)  # G_c, any chunk
    chunks = _chunks(v, chunk)
    # one contiguous logits buffer per chunk width (the last chunk is narrower)
    logits = {b - a: torch.empty(n, b - a, device=device, dtype=bf16) for a, b in chunks}
    dw = torch.empty(v, d, device=device, dtype=bf16)
    dh = torch.zeros(n, d, device=device, dtype=bf16)

    def fwd():
        for a, b in chunks:
            torch.mm(h, w[a:b].t(), out=logits[b - a])

    def dw_gemm():
        for a, b in chunks:
            torch.mm(grad[:, : b - a].t(), h, out=dw[a:b])

    def dh_gemm():
        for a, b in chunks:
            dh.addmm_(grad[:, : b - a], w[a:b])

    def bwd():  # what our backward does per chunk: recompute the logits, then dW_c and dH
        for a, b in chunks:
            torch.mm(h, w[a:b].t(), out=logits[b - a])
            torch.mm(grad[:, : b - a].t(), h, out=dw[a:b])
            dh.addmm_(grad[:, : b - a], w[a:b])

    def both():
        fwd()
        bwd()

    ndv = n * d * v
    got = dict(
        chunk=chunk,
        chunks=len(chunks),
        gemms=dict(
            forward="logits_c = H·W_cᵀ  [N × D]·[D × Vc]",
            dw="dW_c = G_cᵀ·H  [Vc × N]·[N × D]",
            dh="dH += G_c·W_c  [N × Vc]·[Vc × D] (bf16 dH; ours accumulates fp32)",
        ),
        forward=_stats(timer.times(fwd, repeats, 1), 2 * ndv),
        dw=_stats(timer.times(dw_gemm, repeats, 1), 2 * ndv),
        dh=_stats(timer.times(dh_gemm, repeats, 1), 2 * ndv),
        # forward + (recompute + dW + dH): the same GEMMs as ours, 8NDV
        fwd_bwd=_stats(timer.times(both, repeats, 1), 8 * ndv),
        profile=_profile(torch, both, cuda),
    )
    return got


def floor(result: dict, s: dict) -> dict:
    """FLOPs of the head and their time at the measured square-GEMM rate."""
    ndv = s["n"] * s["d"] * s["v"]
    out = dict(forward_flops=2 * ndv, fwd_bwd_flops=8 * ndv, useful_fwd_bwd_flops=6 * ndv)
    mm = result.get("matmul")
    if isinstance(mm, list) and mm:
        rate = mm[0]["tflops"] * 1e12
        out["at_tflops"] = mm[0]["tflops"]
        out["forward_ms"] = 2 * ndv / rate * 1e3
        out["fwd_bwd_ms"] = 8 * ndv / rate * 1e3
    return out


def summary(r: dict) -> str:
    lines = [f"gpu_probe on {r['device']}{' (dry)' if r['dry'] else ''}:"]
    for m in r["matmul"] if isinstance(r.get("matmul"), list) else []:
        lines.append(
            f"  bf16 torch.mm {m['name']} {m['m']}×{m['k']}×{m['n']}: "
            f"{m['tflops']:.2f} TFLOP/s ({m['median_ms']:.3f} ms)"
        )
    c = r.get("copy", {})
    if "gb_per_s" in c:
        lines.append(f"  copy {c['size_bytes'] / 2**20:.0f} MiB: {c['gb_per_s']:.1f} GB/s (r+w)")
    for name in ("ours", "cublas"):
        part = r.get(name, {})
        if "error" in part:
            lines.append(f"  {name}: {part['error']}")
            continue
        fb = part.get("fwd_bwd", {})
        lines.append(f"  {name} fwd+bwd: {fb.get('median_ms', float('nan')):.2f} ms")
        for k in part.get("profile", {}).get("kernels", [])[:6]:
            lines.append(f"    {k['self_ms']:9.3f} ms  ×{k['count']:<4d} {k['name'][:90]}")
    f = r.get("floor", {})
    if "fwd_bwd_ms" in f:
        lines.append(f"  floor fwd+bwd (8NDV at the measured rate): {f['fwd_bwd_ms']:.2f} ms")
    lines.append(f"  wall {r.get('wall_s', 0):.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
