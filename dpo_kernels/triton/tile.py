"""Device functions shared by the forward and backward kernels.

Both recompute logits through :func:`logits_tile`, with the same tile shapes, so the backward
sees bit-for-bit the logits whose log-sum-exp the forward saved.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # libdevice's tanh does not run under the interpreter, so build it from exp. A Taylor series
    # where (1 - e)/(1 + e) would cancel (|x| < 0.55: next term < 3e-8); the exp form elsewhere.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a_s = tl.minimum(a, 0.55)  # the series is only selected below 0.55: keep it finite elsewhere
    x2 = a_s * a_s
    p = -929569.0 / 638512875.0
    p = p * x2 + 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = a_s + a_s * x2 * p
    r = tl.where(a < 0.55, small, big)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even, as a GPU does.

    Triton 3.9's interpreter truncates fp32 -> bf16 casts (a full ulp of error where a GPU has
    half), so under it round by integer arithmetic first; the cast then truncates exact zeros.
    """
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def logits_tile(
    H,
    W,
    BIAS,  # hidden rows, head (V, D), bias (V,)
    rows,
    row_mask,  # [BLOCK_N] int64 row indices of H, and which are real
    offs_v,
    v_mask,  # [BLOCK_V] vocab indices, and which are real
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
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
    """``[BLOCK_N, BLOCK_V]`` fp32 logits ``post·tanh(pre·(h·Wᵀ + b))`` or ``pre·(h·Wᵀ + b)``."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = W + offs_v.to(tl.int64)[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = offs_d < D - d0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        if INTERPRETER:  # the interpreter's bf16 tl.dot returns garbage: upcast its operands
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        return tanh(acc * pre_scale) * post_scale
    return acc * pre_scale
