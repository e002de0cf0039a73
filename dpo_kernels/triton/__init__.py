"""Triton backend: fused LM-head log-prob kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

Imported lazily by :mod:`dpo_kernels.logprobs` on first use, because Triton decides at
``@triton.jit`` time whether kernels are compiled or interpreted.
"""

from .logprobs_backward import backward
from .logprobs_forward import forward

__all__ = ["forward", "backward"]
