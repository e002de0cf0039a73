"""Every Triton kernel compiles for Hopper (sm_90) down to a cubin, even on a machine with no GPU.

The interpreter accepts kernels a GPU compiler rejects (dtype mismatches, shapes tl.dot does
not take, too much shared memory), so this compiles each kernel variant ahead of time with
Triton's own NVIDIA toolchain, in a process where TRITON_INTERPRET is off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import HAS_CUDA

pytest.importorskip("triton")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: the CUDA tests compile for it")
def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA backend here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile", "90"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"].split("[")[0] for r in rows}
    # The backward's GEMMs are cuBLAS (torch.mm): only the fused kernels are ours.
    assert names == {"fwd_partial", "fwd_combine", "bwd_logit_grad"}
    # Compiled as the JIT specialises them: no spills (the script exits non-zero on one).
    assert all(r.get("local") == 0 and r.get("stack") == 0 for r in rows), rows
    # Half-precision and TF32 dots must reach Hopper's tensor cores (wgmma); an fp32 upcast
    # would not. fp32 without TF32 is FMA only, as the README says.
    fused = [r for r in rows if r["kernel"].startswith(("fwd_partial", "bwd_logit_grad"))]
    # (the loss-level path's backward reads the kept logits: it has no dot at all)
    kept_bwd = [r for r in fused if r["kernel"].startswith("bwd") and ",keep" in r["kernel"]]
    assert kept_bwd and not any(r["mma"] for r in kept_bwd), kept_bwd
    fused = [r for r in fused if r not in kept_bwd]
    fast = [
        r for r in fused if "bf16" in r["kernel"] or "fp16" in r["kernel"] or "tf32" in r["kernel"]
    ]
    assert fast and all(r["wgmma"] > 0 and r["cp_async"] > 0 for r in fast), fast
    ieee32 = [r for r in fused if "fp32,ieee" in r["kernel"]]
    assert ieee32 and not any(r["mma"] for r in ieee32), ieee32
