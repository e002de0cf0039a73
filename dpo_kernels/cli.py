"""The ``dpo-kernels`` command.

``dpo-kernels demo`` runs one DPO-shaped batch through ``linear_logprobs`` and through the naive
``log_softmax(h @ Wᵀ)`` on whatever device is here, and prints time, agreement and memory.
``dpo-kernels bench`` times dpo_kernels against every installed peer
(``dpo_kernels.bench.suite``).
``dpo-kernels info`` prints versions, the CPU and its vector units, and which backends can run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from . import __version__, cpu
from .backend import available, get
from .bench.methods import naive_token_logprobs
from .logprobs import linear_logprobs

#: /proc/cpuinfo flags that decide the CPU backend's speed: fp32 FMA width and bf16 units.


def _cpu() -> str:
    """The CPU model, thread count and which of the ISA flags the results record it has."""
    from .bench.suite import ISA_FLAGS, cpu_info

    name, flags = cpu_info()
    isa = (
        "ISA flags unknown"
        if flags is None
        else ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ISA_FLAGS)
    )
    return f"{name} ({torch.get_num_threads()} threads); {isa}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(fn, device, repeats):
    """Median seconds of fn() (forward + backward), and the peak CUDA memory it added."""
    fn()  # warm-up: compiles kernels, fills caches
    _sync(device)
    times = []
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pairs, seq_len, dim, vocab = args.pairs, args.seq_len, args.hidden, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2 * pairs, seq_len, dim, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, device=device, generator=g) * dim**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=device, generator=g)
    labels[:, : seq_len // 4] = -100  # the prompt: ignored, and never scored by the kernels
    hidden.requires_grad_()
    weight.requires_grad_()

    def ours():
        out = linear_logprobs(hidden, weight, labels)
        torch.autograd.grad(out.sum(), [hidden, weight])
        return out

    def naive():
        out = naive_token_logprobs(hidden, weight, labels).sum(-1)  # 0 at ignored positions
        torch.autograd.grad(out.sum(), [hidden, weight])
        return out

    print(
        f"dpo-kernels {__version__} demo on {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f": {2 * pairs} sequences x {seq_len} tokens, D={dim}, V={vocab}, {args.dtype}"
    )
    logits_bytes = 2 * pairs * seq_len * vocab * 4
    print(
        f"full float32 logits would take {logits_bytes / 2**20:,.0f} MiB; "
        "linear_logprobs never materialises them"
    )
    with torch.no_grad():
        diff = linear_logprobs(hidden, weight, labels) - naive_token_logprobs(
            hidden, weight, labels
        ).sum(-1)
    print(f"max |ours - naive| per-sequence log-prob: {diff.abs().max().item():.3g}")
    for name, fn in (("dpo_kernels", ours), ("naive", naive)):
        seconds, peak = _run(fn, device, args.repeats)
        mem = f", peak +{peak / 2**20:,.0f} MiB" if peak is not None else ""
        print(
            f"  {name:12s} forward+backward {seconds * 1e3:9.1f} ms (median of {args.repeats}){mem}"
        )
    return 0


def info(_args) -> int:
    print(f"dpo-kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    print(f"cpu: {_cpu()}")
    print(f"cuda: {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    # Each backend on its own device: triton on CUDA (if any), cpp and torch on the CPU.
    reasons = available()
    if cuda:
        reasons.update({k: v for k, v in available("cpu").items() if k != "triton"})
    for name, reason in reasons.items():
        print(f"backend {name}: {'available' if reason is None else reason}")
    if reasons["cpp"] is None:
        try:
            path, why = cpu.bf16_path()
            print(f"backend cpp, bf16 inputs: {path} ({why})")
        except (ValueError, cpu.BackendUnavailable) as e:
            print(f"backend cpp, bf16 inputs: {e}")
        threads = torch.get_num_threads()
        print(
            f"backend cpp, tiles: {threads} threads, L2 {cpu.l2_bytes() // 2**10} KiB per core; "
            f"below {threads * cpu.TILE_ROWS} rows the threads share out the vocabulary, "
            "else the row tiles (widening path; cpu.plan)"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton kernels run interpreted on the CPU (slow; for tests)")
    return 0


def build(_args) -> int:
    """Build (or find in the cache) the C++ CPU backend now instead of on first use."""
    reason = get("cpp").unavailable_reason(torch.device("cpu"))
    print("C++ CPU backend: " + ("ready" if reason is None else reason))
    return 0 if reason is None else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpo-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="time and check linear_logprobs against naive logits")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs (2 sequences each)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="hidden size D")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size V")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=demo)
    from .bench import suite

    p = sub.add_parser(
        "bench",
        help="time and memory against every installed peer",
        description=suite.__doc__.split("\n\n")[0],
    )
    suite.add_arguments(p)
    p.set_defaults(func=lambda a: suite.main(a, argv_list))
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=info)
    p = sub.add_parser("build", help="build the C++ CPU backend now (else: on first use)")
    p.set_defaults(func=build)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_list)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
