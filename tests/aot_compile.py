"""Compile every Triton kernel for a GPU target on a machine without one (used by a test).

Run as ``python -m tests.aot_compile [ARCH]`` with ``TRITON_INTERPRET`` unset: prints one JSON
line per compiled kernel variant (name, shared memory bytes) or exits non-zero with the error.
"""

import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dpo_kernels.triton import logprobs_backward as backward
from dpo_kernels.triton import logprobs_forward as forward
from dpo_kernels.triton import policy

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Shared memory one block may use on sm_90 (227 KiB).
SM90_MAX_SHARED = 232448


def compile_kernel(kernel, pointers, constexprs, *, arch, num_warps, num_stages):
    """``pointers`` maps pointer args to element types; other runtime args are i32 or fp32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ("pre_scale", "post_scale", "inv_V"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def variants():
    cuda = torch.device("cuda")
    for dtype, flags in [
        (torch.bfloat16, (True, True, True)),
        (torch.bfloat16, (False, False, False)),
        (torch.float16, (True, False, True)),
        (torch.float32, (True, True, True)),
    ]:
        has_bias, has_softcap, has_stats = flags
        dt = TYPES[dtype]
        t = policy.tiles(dtype, cuda)
        m = policy.matmul_tiles(dtype, cuda)
        assert not t.interpreter and not m.interpreter, "interpreter flag leaked into a GPU launch"
        tile_c = {
            "BLOCK_N": t.block_n,
            "BLOCK_V": t.block_v,
            "BLOCK_D": t.block_d,
            "HAS_BIAS": has_bias,
            "HAS_SOFTCAP": has_softcap,
            "INTERPRETER": t.interpreter,
            "PRECISION": t.precision,
        }
        launch = {"num_warps": t.num_warps, "num_stages": t.num_stages}
        yield (
            f"fwd_partial[{dt},{flags}]",
            forward._fwd_partial_kernel,
            {"H": dt, "W": dt, "BIAS": dt, "ROWS": "i64", "LABELS": "i64", "PART": "fp32"},
            {**tile_c, "HAS_STATS": has_stats},
            launch,
        )
        yield (
            f"fwd_combine[{has_stats}]",
            forward._fwd_combine_kernel,
            {"PART": "fp32", "LABELS": "i64", "TOK": "fp32"},
            {"HAS_STATS": has_stats, "BLOCK": policy.combine_block(cuda)},
            {"num_warps": 4, "num_stages": 1},
        )
        yield (
            f"bwd_logit_grad[{dt},{flags[:2]}]",
            backward._bwd_logit_grad_kernel,
            {"H": dt, "W": dt, "BIAS": dt, "LABELS": "i64", "LSE": "fp32", "GRAD": "fp32", "G": dt},
            tile_c,
            launch,
        )
        for accumulate, out in ((True, "fp32"), (False, dt)):
            yield (
                f"matmul[{dt}->{out}]",
                backward._matmul_kernel,
                {"A": dt, "B": dt, "C": out},
                {
                    "BLOCK_M": m.block_m,
                    "BLOCK_N": m.block_n,
                    "BLOCK_K": m.block_k,
                    "ACCUMULATE": accumulate,
                    "INTERPRETER": m.interpreter,
                    "PRECISION": m.precision,
                },
                {"num_warps": m.num_warps, "num_stages": m.num_stages},
            )


def main(arch=90):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    seen = set()
    for name, kernel, pointers, constexprs, launch in variants():
        if name in seen:
            continue
        seen.add(name)
        compiled = compile_kernel(kernel, pointers, constexprs, arch=arch, **launch)
        shared = compiled.metadata.shared
        if shared > SM90_MAX_SHARED:
            raise SystemExit(f"{name}: {shared} bytes of shared memory > {SM90_MAX_SHARED}")
        uses_mma = "mma" in compiled.asm["ptx"]
        print(json.dumps({"kernel": name, "shared": shared, "mma": uses_mma}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
