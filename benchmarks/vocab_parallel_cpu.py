"""What splitting the head over the vocabulary costs on the CPU: one process with T threads on
the whole head against T gloo processes of one thread each on 1/T of it (vocab_parallel_group),
forward + backward of linear_logprobs, fp32, the C++ backend.

    python benchmarks/vocab_parallel_cpu.py [OUT.json] [--n 512 --d 2048 --v 32768 --reps 3]

The same FLOPs run on the same cores either way; the difference is what the vocabulary-parallel
op adds: two all-reduces of a few floats per token in the forward, one of N x D in the backward.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dpo_kernels as dk


def _inputs(n, d, v):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g) * 0.05
    weight = torch.randn(v, d, generator=g) * 0.05
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def _step(hidden, weight, labels, group):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logps = dk.linear_logprobs(h, w, labels, vocab_parallel_group=group, backend="cpp")
    logps.sum().backward()
    return h.grad


def _time(fn, reps):
    fn()  # warm-up (first touch of the buffers)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _rank(rank, world, init, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    hidden, weight, labels = _inputs(args.n, args.d, args.v)
    sizes = [args.v // world + (r < args.v % world) for r in range(world)]
    lo = sum(sizes[:rank])
    shard = weight[lo : lo + sizes[rank]].contiguous()
    dist.barrier()
    times = _time(
        lambda: (_step(hidden, shard, labels, dist.group.WORLD), dist.barrier()), args.reps
    )
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    from dpo_kernels import cpu

    cpu.load()
    torch.set_num_threads(threads)
    hidden, weight, labels = _inputs(args.n, args.d, args.v)
    single = _time(lambda: _step(hidden, weight, labels, None), args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(
            _rank, args=(threads, os.path.join(tmp, "pg"), args, out), nprocs=threads
        )
        split = torch.load(out)
    flops = 8 * args.n * args.d * args.v
    result = {
        "shape": {"N": args.n, "D": args.d, "V": args.v, "dtype": "float32"},
        "threads": threads,
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.machine(),
        ),
        "torch": torch.__version__,
        "single_process_s": single,
        "vocab_parallel_s": split,
        "ratio_median": statistics.median(split) / statistics.median(single),
        "gflops_single": flops / statistics.median(single) / 1e9,
        "comm_bytes_per_rank": {
            "forward_allreduce": 4 * args.n + 8 * args.n,  # MAX of 1 fp32 row, SUM of 2
            "backward_allreduce_dH": 4 * args.n * args.d,
        },
        "command": "python benchmarks/vocab_parallel_cpu.py " + " ".join(sys.argv[1:]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
