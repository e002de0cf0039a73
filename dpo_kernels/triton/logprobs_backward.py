"""Backward: vocab-chunked and deterministic.

For each vocab chunk ``[v0, v0 + Vc)``: ``_bwd_logit_grad_kernel`` recomputes the logits of all
valid rows against the chunk (same tiles as the forward) and writes
``G = g · (onehot − softmax) · dz/dx`` in the input dtype; then ``dW[chunk] = Gᵀ·H`` (one GEMM,
K = all rows, fp32 accumulation, written in the input dtype) and ``dH += G·W[chunk]`` into a
fp32 ``(Nv, D)`` buffer. Both GEMMs are the vendor library's (cuBLAS through ``torch.mm`` /
``torch.addmm``; the same calls run on CPU tensors under the interpreter): plain GEMMs are not
worth hand-writing. The logit-grad kernel runs in a grouped order (``policy.grad_group``) so the
programs resident together share H row blocks and W column tiles in L2. Memory beyond the
gradients: one ``Nv × Vc`` chunk and fp32 ``dH``; ``Vc`` comes from the chunk budget. Every sum
runs in a fixed order (cuBLAS included, on one GPU and library version): bitwise reproducible.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ..backend import Grads, LogitOptions, Needs, Rows
from . import policy
from .logprobs_forward import _count, fused_config
from .tile import cast_for_store, logits_tile


@triton.jit
def _bwd_logit_grad_kernel(
    H,
    W,
    BIAS,
    LABELS,
    NORM,  # (2, Nv) fp32: max logit m, then log_s = log Σ e^(z−m)
    GRAD,
    G,  # compacted hidden (Nv, D); G (Nv, Vc) out
    KEPT,  # with KEPT_LOGITS: the forward's (Nv, V) fp32 logits, read instead of recomputed
    COUNT,  # (1,) int64: rows past it are not valid; their G is written as 0
    n_rows,
    D,
    v_beg,
    v_count,
    group,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gn,
    stride_gv,
    stride_kn,
    pre_scale,
    post_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr,
    KEPT_LOGITS: tl.constexpr = False,
):
    # Grouped order: ``group`` row blocks walk down the chunk's vocab tiles together.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = group * tl.cdiv(v_count, BLOCK_V)
    first = (pid // per_group) * group
    size = tl.minimum(row_blocks - first, group)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = tl.minimum(tl.load(COUNT), n_rows)
    row_mask = offs_n < n_valid
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_count
    offs_v = v_beg + cols
    if KEPT_LOGITS:
        k_ptrs = KEPT + offs_n.to(tl.int64)[:, None] * stride_kn + offs_v[None, :]
        z = tl.load(k_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        d_eff = tl.where(pid_n * BLOCK_N < n_valid, D, 0)  # a block of ignored rows: no matmul
        z = logits_tile(
            H,
            W,
            BIAS,
            offs_n.to(tl.int64),
            row_mask,
            offs_v,
            col_mask,
            d_eff,
            stride_hn,
            stride_hd,
            stride_wv,
            stride_wd,
            pre_scale,
            post_scale,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            HAS_BIAS,
            HAS_SOFTCAP,
            INTERPRETER,
            PRECISION,
        )
    m = tl.load(NORM + offs_n, mask=row_mask, other=0.0)
    log_s = tl.load(NORM + n_rows + offs_n, mask=row_mask, other=0.0)
    grad = tl.load(GRAD + offs_n, mask=row_mask, other=0.0)
    labels = tl.load(LABELS + offs_n, mask=row_mask, other=-1)
    p = tl.exp((z - m[:, None]) - log_s[:, None])  # in that order: as log_softmax
    g = tl.where(offs_v[None, :] == labels[:, None], 1.0 - p, -p) * grad[:, None]
    if HAS_SOFTCAP:
        t = z / post_scale
        g = g * ((1.0 - t * t) * (pre_scale * post_scale))
    else:
        g = g * pre_scale
    g = tl.where(row_mask[:, None], g, 0.0)  # the GEMMs read every row of G
    g_ptrs = G + offs_n.to(tl.int64)[:, None] * stride_gn + cols[None, :] * stride_gv
    mask = (offs_n < n_rows)[:, None] & col_mask[None, :]
    tl.store(g_ptrs, cast_for_store(g, G.dtype.element_ty, INTERPRETER), mask=mask)


def _fp32_out_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs 16-bit inputs on this device
    (torch >= 2.8 on CUDA; not on the CPU as of torch 2.13)."""
    key = device.type
    if key not in _FP32_OUT:
        a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            _FP32_OUT[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


_FP32_OUT: dict = {}


@contextlib.contextmanager
def _matmul_precision(device: torch.device, allow_tf32: bool):
    """The GEMMs of one backward run with the precision the forward saved, not whatever the
    global flag says now (it is restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _accumulate_dh(d_hc, g, w_chunk):
    """``d_hc (fp32) += g · w_chunk`` on the vendor GEMM with fp32 accumulation."""
    if g.dtype == torch.float32:
        d_hc.addmm_(g, w_chunk)
    elif _fp32_out_supported(g.device):
        torch.addmm(d_hc, g, w_chunk, out_dtype=torch.float32, out=d_hc)
    else:
        # bf16 and fp16 values are exact in TF32 (8-bit exponent, 10-bit mantissa covers both),
        # so on a GPU this widened GEMM may run on TF32 tensor cores without losing anything.
        with _matmul_precision(g.device, True):
            d_hc.addmm_(g.float(), w_chunk.float())


def backward(x: Rows, norm_c, grad_c, opts: LogitOptions, needs: Needs, kept=None) -> Grads:
    """Launcher of :meth:`dpo_kernels.backend.Backend.backward` (with ``kept``, the forward's
    ``(Nv, V)`` fp32 logits, of :meth:`~dpo_kernels.backend.Backend.backward_kept`: no
    recompute, 4·N·D·V)."""
    hidden, weight, bias, rows, labels_c, _ = x
    need_h, need_w, need_b = needs
    n_rows = rows.shape[0]
    vocab, dim = weight.shape
    dtype, device = hidden.dtype, hidden.device
    # The forward's config (same key, never re-tuned here): bit-identical recomputed logits.
    t = fused_config(x, opts)
    group = policy.grad_group(t, dim, hidden.element_size(), device)
    interpreter = not policy.compiled_on_gpu(device)
    n_valid = _count(x)
    precision = policy.fp32_precision(dtype, opts.allow_tf32)
    h_c = hidden.index_select(0, rows)  # (Nv, D) contiguous: the GEMMs need dense rows
    if x.count is not None:
        # Sync-free layout: rows past the count may be anything (NaN padding); their G is 0,
        # but 0 · NaN in dW = Gᵀ·H is NaN, so they must be 0 in H too.
        keep = torch.arange(n_rows, device=device) < n_valid
        h_c = torch.where(keep[:, None], h_c, torch.zeros((), dtype=dtype, device=device))
    norm_c = norm_c.to(torch.float32).contiguous()
    grad_c = grad_c.to(torch.float32).contiguous()
    d_hc = torch.zeros((n_rows, dim), dtype=torch.float32, device=device) if need_h else None
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    d_bias = torch.empty(vocab, dtype=torch.float32, device=device) if need_b else None
    chunk = policy.vocab_chunk(n_rows, vocab, hidden.element_size(), t)
    g_buf = torch.empty((n_rows, chunk), dtype=dtype, device=device)
    has_bias = bias is not None
    for v0 in range(0, vocab, chunk):
        count = min(chunk, vocab - v0)
        g = g_buf[:, :count]
        grid = (triton.cdiv(n_rows, t.block_n) * triton.cdiv(count, t.block_v),)
        _bwd_logit_grad_kernel[grid](
            h_c,
            weight,
            bias if has_bias else weight,
            labels_c,
            norm_c,
            grad_c,
            g,
            g if kept is None else kept,
            n_valid,
            n_rows,
            dim,
            v0,
            count,
            group,
            h_c.stride(0),
            h_c.stride(1),
            weight.stride(0),
            weight.stride(1),
            g.stride(0),
            g.stride(1),
            0 if kept is None else kept.stride(0),
            opts.pre_scale,
            opts.post_scale,
            BLOCK_N=t.block_n,
            BLOCK_V=t.block_v,
            BLOCK_D=t.block_d,
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=opts.has_softcap,
            INTERPRETER=interpreter,
            PRECISION=precision,
            KEPT_LOGITS=kept is not None,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        with _matmul_precision(device, opts.allow_tf32):
            if need_w:  # K = all rows inside one GEMM: fp32 accumulation, one rounding
                torch.mm(g.t(), h_c, out=d_weight[v0 : v0 + count])
            if need_h:
                _accumulate_dh(d_hc, g, weight[v0 : v0 + count])
        if need_b:
            torch.sum(g, dim=0, dtype=torch.float32, out=d_bias[v0 : v0 + count])
    d_hidden = None
    if need_h:
        d_hidden = torch.zeros_like(hidden)
        d_hidden.index_copy_(0, rows, d_hc.to(dtype))
    return Grads(d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype))
