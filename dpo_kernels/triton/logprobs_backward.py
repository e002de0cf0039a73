"""Backward: vocab-chunked and deterministic.

For each vocab chunk ``[v0, v0 + Vc)``: ``_bwd_logit_grad_kernel`` recomputes the logits of all
valid rows against the chunk (same tiles as the forward) and writes
``G = g · (onehot − softmax) · dz/dx`` in the input dtype; then ``dW[chunk] = Gᵀ·H`` (one GEMM,
K = all rows, fp32 accumulation, written in the input dtype) and ``dH += G·W[chunk]`` into a
fp32 ``(Nv, D)`` buffer. Memory beyond the gradients: one ``Nv × Vc`` chunk and fp32 ``dH``;
``Vc`` comes from the chunk budget. Every sum runs in a fixed order: bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from ..backend import Grads, LogitOptions, Needs, Rows
from . import policy
from .tile import cast_for_store, logits_tile


@triton.jit
def _bwd_logit_grad_kernel(
    H,
    W,
    BIAS,
    LABELS,
    LSE,
    GRAD,
    G,  # compacted hidden (Nv, D); G (Nv, Vc) out
    n_rows,
    D,
    v_beg,
    v_count,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gn,
    stride_gv,
    pre_scale,
    post_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_rows
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_count
    offs_v = v_beg + cols
    z = logits_tile(
        H,
        W,
        BIAS,
        offs_n.to(tl.int64),
        row_mask,
        offs_v,
        col_mask,
        D,
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
    lse = tl.load(LSE + offs_n, mask=row_mask, other=0.0)
    grad = tl.load(GRAD + offs_n, mask=row_mask, other=0.0)
    labels = tl.load(LABELS + offs_n, mask=row_mask, other=-1)
    p = tl.exp(z - lse[:, None])
    g = tl.where(offs_v[None, :] == labels[:, None], 1.0 - p, -p) * grad[:, None]
    if HAS_SOFTCAP:
        t = z / post_scale
        g = g * ((1.0 - t * t) * (pre_scale * post_scale))
    else:
        g = g * pre_scale
    g_ptrs = G + offs_n.to(tl.int64)[:, None] * stride_gn + cols[None, :] * stride_gv
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(g_ptrs, cast_for_store(g, G.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _matmul_kernel(
    A,
    B,
    C,  # C (M, N) = [C +] A (M, K) · B (K, N)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptrs, cast_for_store(acc, C.dtype.element_ty, INTERPRETER), mask=c_mask)


def _matmul(a, b, out, accumulate):
    """``out (=|+=) a @ b`` with fp32 accumulation; ``a``, ``b`` in the input dtype."""
    m, k = a.shape
    n = b.shape[1]
    t = policy.matmul_tiles(a.dtype, a.device)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n))
    _matmul_kernel[grid](
        a,
        b,
        out,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        ACCUMULATE=accumulate,
        INTERPRETER=t.interpreter,
        PRECISION=t.precision,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def backward(x: Rows, lse_c, grad_c, opts: LogitOptions, needs: Needs) -> Grads:
    """Launcher of :meth:`dpo_kernels.backend.Backend.backward`."""
    hidden, weight, bias, rows, labels_c = x
    need_h, need_w, need_b = needs
    n_rows = rows.shape[0]
    vocab, dim = weight.shape
    dtype, device = hidden.dtype, hidden.device
    t = policy.tiles(dtype, device)
    h_c = hidden.index_select(0, rows)  # (Nv, D) contiguous: the GEMMs need dense rows
    lse_c = lse_c.to(torch.float32).contiguous()
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
        grid = (triton.cdiv(n_rows, t.block_n), triton.cdiv(count, t.block_v))
        _bwd_logit_grad_kernel[grid](
            h_c,
            weight,
            bias if has_bias else weight,
            labels_c,
            lse_c,
            grad_c,
            g,
            n_rows,
            dim,
            v0,
            count,
            h_c.stride(0),
            h_c.stride(1),
            weight.stride(0),
            weight.stride(1),
            g.stride(0),
            g.stride(1),
            opts.pre_scale,
            opts.post_scale,
            BLOCK_N=t.block_n,
            BLOCK_V=t.block_v,
            BLOCK_D=t.block_d,
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=opts.has_softcap,
            INTERPRETER=t.interpreter,
            PRECISION=t.precision,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        if need_w:
            _matmul(g.t(), h_c, d_weight[v0 : v0 + count], accumulate=False)
        if need_h:
            _matmul(g, weight[v0 : v0 + count], d_hc, accumulate=True)
        if need_b:
            torch.sum(g, dim=0, dtype=torch.float32, out=d_bias[v0 : v0 + count])
    d_hidden = None
    if need_h:
        d_hidden = torch.zeros_like(hidden)
        d_hidden.index_copy_(0, rows, d_hc.to(dtype))
    return Grads(d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype))
