"""The Triton backend (``backend="triton"``): fused LM-head log-prob kernels on CUDA tensors, or on
CPU tensors under ``TRITON_INTERPRET=1`` (the tests).

The kernel modules are imported on the first call, not with this package, because Triton decides
at ``@triton.jit`` time whether kernels are compiled or interpreted, and because this package must
import (to say why it cannot run) where Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..backend import Backend, Grads, LogitOptions, Needs, Rows, TokenResult, register

__all__ = ["BACKEND", "TritonBackend"]


class TritonBackend(Backend):
    """Forward: (row blocks × vocab splits) programs and a per-token combine; backward:
    vocab-chunked and deterministic (see :mod:`.logprobs_forward` and :mod:`.logprobs_backward`)."""

    name = "triton"
    sync_free = True  # the kernels read the valid-row count on the device

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "backend='triton' needs the triton package, which is not installed"
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            return (
                f"backend='triton' runs on CUDA tensors (or on CPU tensors under "
                f"TRITON_INTERPRET=1); got tensors on {device.type!r}"
            )
        if dtype == torch.float64:
            return (
                "backend='triton' takes float32, bfloat16 or float16; float64 runs on "
                "backend='torch' (or 'auto')"
            )
        return None

    def forward(self, x: Rows, opts: LogitOptions, with_stats: bool) -> TokenResult:
        from .logprobs_forward import forward

        return forward(x, opts, with_stats)

    jacobian = True

    def forward_jacobian(self, x: Rows, opts: LogitOptions, with_stats: bool):
        from .frozen_head import forward

        return forward(x, opts, with_stats)

    def backward(self, x: Rows, norm, grad, opts: LogitOptions, needs: Needs) -> Grads:
        from .logprobs_backward import backward

        return backward(x, norm, grad, opts, needs)

    keeps_logits = True

    def forward_kept(self, x: Rows, opts: LogitOptions, with_stats: bool):
        from .logprobs_forward import forward

        return forward(x, opts, with_stats, keep=True)

    def backward_kept(self, x: Rows, kept, norm, grad, opts: LogitOptions, needs: Needs) -> Grads:
        from .logprobs_backward import backward

        return backward(x, norm, grad, opts, needs, kept=kept)


BACKEND = register(TritonBackend())
