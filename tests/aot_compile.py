"""Compile every shipped Triton config for a GPU target on a machine without one (used by a test).

Run as ``python -m tests.aot_compile [ARCH]`` with ``TRITON_INTERPRET`` unset: prints one JSON
line per compiled kernel variant, or exits non-zero naming the variant that spills registers,
overflows shared memory or does not reach the tensor cores.

Each kernel is compiled *as the JIT would specialise it at run time*: Triton's own argument
binder runs on CPU tensors (16-byte-aligned pointers) and real-model sizes and strides (D, V
and chunk widths divisible by 16, unit inner strides), so the cubin has the vectorised loads and
the cp.async pipeline a GPU launch gets. Registers and spills come from ``cuobjdump``.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from dpo_kernels.triton import logprobs_backward as backward
from dpo_kernels.triton import logprobs_forward as forward
from dpo_kernels.triton import policy

try:
    from triton._utils import find_paths_if, get_iterable_path
except ImportError:  # older layouts
    from triton.runtime.jit import find_paths_if, get_iterable_path

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The Llama-3-8B head at 16k valid rows, as the launchers would size it on an H100.
N, D, V = 16384, 4096, 128256


def _compile_like_jit(kernel, args, kwargs, arch):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, _ = binder(*args, **kwargs)
    opts = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {p: get_iterable_path(list(bound_args.values()), p) for p in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=opts.__dict__)


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))


def _buf(dtype):
    return torch.empty(64, dtype=dtype)  # only the pointer's dtype and alignment matter


def variants(arch):
    cap = (arch // 10, arch % 10)
    lim = policy.KNOWN_LIMITS[cap]
    for dtype, flags in [
        (torch.bfloat16, (True, True, True)),
        (torch.bfloat16, (False, False, False)),
        (torch.float16, (True, False, True)),
        (torch.float32, (True, True, True)),
        (torch.float32, (False, False, False)),
    ]:
        has_bias, has_softcap, has_stats = flags
        dt, item = TYPES[dtype], torch.tensor([], dtype=dtype).element_size()
        cfg = base = policy.lookup("fused", dtype, cap)
        reason = policy.check(cfg, dtype, lim)
        assert reason is None, f"shipped fused config for {dt} on sm_{arch}: {reason}"
        tf32 = (False, True) if dtype == torch.float32 else (False,)
        for allow_tf32 in tf32:
            precision = policy.fp32_precision(dtype, allow_tf32)
            tiles = dict(
                BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v,
                BLOCK_D=cfg.block_d,
                HAS_BIAS=has_bias,
                HAS_SOFTCAP=has_softcap,
                INTERPRETER=False,
                PRECISION=precision,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            lanes = 6 if has_stats else 3
            h, w = _buf(dtype), _buf(dtype)
            f32, i64 = _buf(torch.float32), _buf(torch.int64)
            # The loss-level path's variants (logits kept by the forward, read by the backward)
            # with every option on: the most live values. Its forward runs policy.keep_config.
            keeps = (False, True) if all(flags) else (False,)
            for keep in keeps:
                tag = ",keep" if keep else ""
                fma = dtype == torch.float32 and precision == "ieee"
                fcfg = policy.keep_config(base, fma=fma) if keep else base
                splits, split = policy.vocab_splits(N, V, D, item, fcfg, lim)
                name = f"fwd_partial[{dt},{precision},{flags}{tag}]"
                args = (h, w, w, i64, i64, f32, f32, i64, N, D, V, splits, split, D, 1, D, 1)
                args += (lanes * splits * N, N, V, 1.0, 1.0, 1.0 / V)
                kw = {**tiles, "HAS_STATS": has_stats, "KEEP": keep}
                kw.update(BLOCK_N=fcfg.block_n, num_warps=fcfg.num_warps)
                yield name, forward._fwd_partial_kernel, args, kw, fcfg
                chunk = policy.vocab_chunk(N, V, item, cfg)
                group = policy.grad_group(cfg, D, item, lim)
                name = f"bwd_logit_grad[{dt},{precision},{flags[:2]}{tag}]"
                args = (h, w, w, i64, f32, f32, _buf(dtype), f32, i64, N, D, chunk, chunk, group)
                args += (D, 1, D, 1, chunk, 1, V, 1.0, 1.0)
                kw = {**tiles, "KEPT_LOGITS": keep}
                yield name, backward._bwd_logit_grad_kernel, args, kw, cfg
    comb = policy.lookup("combine", torch.float32, cap)
    for has_stats in (True, False):
        f32, i64 = _buf(torch.float32), _buf(torch.int64)
        args = (f32, i64, f32, i64, N, 8, V, 6 * 8 * N, N, N)  # 8 splits
        kw = dict(HAS_STATS=has_stats, BLOCK=comb.block_n, num_warps=comb.num_warps, num_stages=1)
        yield f"fwd_combine[{has_stats}]", forward._fwd_combine_kernel, args, kw, comb


def main(arch=90):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    lim = policy.KNOWN_LIMITS[(arch // 10, arch % 10)]
    for name, kernel, args, kwargs, cfg in variants(arch):
        compiled = _compile_like_jit(kernel, args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        res = _resources(compiled.asm["cubin"])
        row = {
            "kernel": name,
            "config": cfg.key(),
            "shared": compiled.metadata.shared,
            "mma": "mma" in ptx,
            "wgmma": ptx.count("wgmma.mma_async"),
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            **res,
        }
        print(json.dumps(row), flush=True)
        if compiled.metadata.shared > lim.shared_per_block:
            raise SystemExit(f"{name}: {compiled.metadata.shared} B of shared memory > limit")
        if res.get("local", 0) or res.get("stack", 0):
            raise SystemExit(f"{name}: spills ({res})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
