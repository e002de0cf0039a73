"""The frozen-head forward (LoRA / PEFT, a frozen reference model being trained through): 4·N·D·V.

When the head needs no gradient, the backward of the recompute path costs 4·N·D·V (recompute and
dH; dW is skipped already). This path instead computes, in the forward, each valid token's
``J = d logp / d h = Σ_v (onehot − p)_v · z'_v · W_v`` into an ``(Nv, D)`` fp32 buffer, so the
backward is a scale ``dH = grad · J``: forward 2·N·D·V (logits) + 2·N·D·V (``G·W``), nothing in
the backward. Chunked over tokens, so one chunk's fp32 logits fit the memory budget; both GEMMs
are cuBLAS in the input dtype with fp32 accumulation (``out_dtype=torch.float32``, or exact TF32
on widened 16-bit operands where the installed torch lacks it).

Whether it pays (``logprobs._frozen_path``): it saves 2·N·D·V of GEMM (``2·D/R`` seconds per
logit at a GEMM rate R) and costs ~8 more bytes of traffic per logit than the recompute path
(fp32 logits written and read, ``G`` in the input dtype), ``8/BW``: it wins for
``D > 4·R/BW``, ~725 on an H100/H200 (R ≈ 780 TFLOP/s, BW ≈ 3–4.3 TB/s), so from D = 1024 on.
"""

import torch

from ..backend import LogitOptions, Rows
from ..reference import jacobian_forward
from .logprobs_backward import _accumulate_dh, _fp32_out_supported, _matmul_precision


def forward(x: Rows, opts: LogitOptions, with_stats: bool):
    """:meth:`dpo_kernels.backend.Backend.forward_jacobian` on cuBLAS."""
    weight, bias = x.weight, x.bias
    device, dtype = weight.device, weight.dtype
    wide = None
    if dtype != torch.float32 and not _fp32_out_supported(device):
        wide = weight.float()  # older torch / the CPU: widened once per call (exact in TF32)
    bias_f = None if bias is None else bias.float()

    def logits(h):
        with _matmul_precision(device, opts.allow_tf32 or wide is not None):
            if dtype == torch.float32:
                z = h @ weight.T
            elif wide is None:
                z = torch.mm(h, weight.T, out_dtype=torch.float32)
            else:
                z = h.float() @ wide.T
        if bias_f is not None:
            z += bias_f
        return opts.transform(z)

    def jac_mm(g):
        out = torch.zeros((g.shape[0], weight.shape[1]), dtype=torch.float32, device=device)
        with _matmul_precision(device, opts.allow_tf32):
            _accumulate_dh(out, g.to(dtype), weight)  # G in the input dtype, as the backward's
        return out

    return jacobian_forward(x, opts, with_stats, logits, jac_mm)
