"""Forward: per-token log-sum-exp, target logit and stats.

Two kernels. ``_fwd_partial_kernel`` runs on a 1-D grid of (row blocks × vocab splits) with the
split index varying fastest, so the programs resident together share a few H row blocks in L2
(``policy`` sizes the splits from the L2); each program streams its vocab range in tiles, keeps
an online max / sum-exp per row, and takes the target logit from the same tile it is
exponentiated in. ``_fwd_combine_kernel`` runs one program per
block of tokens and merges each token's splits in a fixed order — deterministic, no atomics. The
per-sequence sums are the one reduction every backend shares (``backend.segment_sum``).
"""

import torch
import triton
import triton.language as tl

from ..backend import LogitOptions, Rows, TokenResult
from . import policy
from .tile import logits_tile

# Rows of the partials buffer: online max m, s = Σ e^(z−m), target logit; with stats also
# Σ e^(z−m)·(z−m), Σ e^(2(z−m)) and Σ z/V (each term scaled first: no overflow near the float
# limit). A -inf logit (a masked vocabulary lane) adds nothing but -inf to Σ z/V.
_M, _S, _ZT, _PZ, _P2, _Z = (tl.constexpr(i) for i in range(6))
# Rows of the per-token outputs, in the order of the fields of backend.TokenResult.
_LOGP, _MAX, _LOGS, _MEAN, _ENT, _TOP1, _LSS = (tl.constexpr(i) for i in range(7))


@triton.jit
def _fwd_partial_kernel(
    H,
    W,
    BIAS,
    ROWS,
    LABELS,
    PART,  # inputs; PART [6, n_splits, Nv] fp32
    KEPT,  # with KEEP: (Nv, V) fp32 out, the valid rows' logits (the loss-level path)
    COUNT,  # (1,) int64: rows past it are not valid (read on the device: no host sync)
    n_rows,
    D,
    V,
    n_splits,
    split_size,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_pq,
    stride_ps,
    stride_kn,
    pre_scale,
    post_scale,
    inv_V,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PRECISION: tl.constexpr,
    KEEP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_n = pid // n_splits  # split index fastest: neighbours in launch order share H rows
    pid_s = pid % n_splits
    n_valid = tl.minimum(tl.load(COUNT), n_rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(ROWS + offs_n, mask=row_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=row_mask, other=-1)
    v_beg = pid_s * split_size
    v_end = tl.minimum(v_beg + split_size, V)
    v_end = tl.where(pid_n * BLOCK_N < n_valid, v_end, v_beg)  # a block of ignored rows: no work

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    pz = tl.zeros([BLOCK_N], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    zs = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_beg, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = logits_tile(
            H,
            W,
            BIAS,
            rows,
            row_mask,
            offs_v,
            v_mask,
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
        if KEEP:  # one fp32 write per logit: the backward reads them instead of recomputing
            k_ptrs = KEPT + offs_n.to(tl.int64)[:, None] * stride_kn + offs_v[None, :]
            tl.store(k_ptrs, z, mask=row_mask[:, None] & v_mask[None, :])
        z = tl.where(v_mask[None, :], z, float("-inf"))
        zt += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
        if HAS_STATS:
            zs += tl.sum(tl.where(v_mask[None, :], z * inv_V, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While every logit so far is -inf (masked lanes), subtract 0, not -inf (no NaN).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        z = z - m_ref[:, None]  # z - m from here on (z itself is no longer needed)
        p = tl.exp(z)
        s_old = s
        s = s * alpha + tl.sum(p, axis=1)
        if HAS_STATS:
            # Σ e^(z−m)(z−m) brought to the new reference gains (m − m_new)·s; where the old sums
            # vanish against the new maximum (or there are none yet), 0 (not 0·∞).
            carried = tl.where(alpha > 0.0, alpha * (pz + (m - m_ref) * s_old), 0.0)
            pz = carried + tl.sum(tl.where(p > 0.0, p * z, 0.0), axis=1)
            p2 = p2 * (alpha * alpha) + tl.sum(p * p, axis=1)
        m = m_new

    base = PART + pid_s * stride_ps + offs_n
    tl.store(base + _M * stride_pq, m, mask=row_mask)
    tl.store(base + _S * stride_pq, s, mask=row_mask)
    tl.store(base + _ZT * stride_pq, zt, mask=row_mask)
    if HAS_STATS:
        tl.store(base + _PZ * stride_pq, pz, mask=row_mask)
        tl.store(base + _P2 * stride_pq, p2, mask=row_mask)
        tl.store(base + _Z * stride_pq, zs, mask=row_mask)


@triton.jit
def _fwd_combine_kernel(
    PART,
    LABELS,
    TOK,  # partials, compacted labels; TOK [3 or 7, Nv] out
    COUNT,
    n_rows,
    n_splits,
    V,
    stride_pq,
    stride_ps,
    stride_tq,
    HAS_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.minimum(tl.load(COUNT), n_rows)
    big_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for k in range(n_splits):
        mk = tl.load(PART + _M * stride_pq + k * stride_ps + offs, mask=mask, other=0.0)
        big_m = tl.maximum(big_m, mk)
    big_ref = tl.where(big_m == float("-inf"), 0.0, big_m)  # a row of -inf logits: no NaN
    s = tl.zeros([BLOCK], dtype=tl.float32)
    zt = tl.zeros([BLOCK], dtype=tl.float32)
    pz = tl.zeros([BLOCK], dtype=tl.float32)
    p2 = tl.zeros([BLOCK], dtype=tl.float32)
    zs = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_splits):
        base = PART + k * stride_ps + offs
        mk = tl.load(base + _M * stride_pq, mask=mask, other=0.0)
        scale = tl.exp(mk - big_ref)
        sk = tl.load(base + _S * stride_pq, mask=mask, other=0.0)
        s += sk * scale
        zt += tl.load(base + _ZT * stride_pq, mask=mask, other=0.0)
        if HAS_STATS:
            tk = tl.load(base + _PZ * stride_pq, mask=mask, other=0.0)
            pz += tl.where(scale > 0.0, scale * (tk + (mk - big_ref) * sk), 0.0)
            p2 += tl.load(base + _P2 * stride_pq, mask=mask, other=0.0) * (scale * scale)
            zs += tl.load(base + _Z * stride_pq, mask=mask, other=0.0)
    s = tl.where(mask, s, 1.0)  # padding lanes: keep log() finite
    log_s = tl.log(s)
    labels = tl.load(LABELS + offs, mask=mask, other=0)
    # An out-of-range label never matched a column: make its log-prob NaN, not a number.
    bad = (labels < 0) | (labels >= V)
    # (z_t − m) − log_s, never z_t − (m + log_s): no rounded log-sum-exp of the logits' size.
    logp = tl.where(bad, float("nan"), (zt - big_m) - log_s)
    tl.store(TOK + _LOGP * stride_tq + offs, logp, mask=mask)
    tl.store(TOK + _MAX * stride_tq + offs, big_m, mask=mask)
    tl.store(TOK + _LOGS * stride_tq + offs, log_s, mask=mask)
    if HAS_STATS:
        tl.store(TOK + _MEAN * stride_tq + offs, zs, mask=mask)
        tl.store(TOK + _ENT * stride_tq + offs, log_s - pz / s, mask=mask)
        tl.store(TOK + _TOP1 * stride_tq + offs, tl.where(zt >= big_m, 1.0, 0.0), mask=mask)
        lss = tl.log(tl.where(mask, p2, 1.0)) - 2.0 * log_s
        tl.store(TOK + _LSS * stride_tq + offs, lss, mask=mask)


def _count(x: Rows):
    """The device-side count of valid rows (all of ``rows`` unless the layout is sync-free)."""
    if x.count is not None:
        return x.count
    return torch.full((1,), x.rows.shape[0], dtype=torch.int64, device=x.rows.device)


def fused_config(x: Rows, opts: LogitOptions, with_stats: bool = False, tune: bool = False):
    """The call's config of the forward partial and logit-grad kernels (``policy.fused_config``);
    with ``tune`` (the forward) an untuned bucket is tuned on this call's own inputs."""
    hidden, weight = x.hidden, x.weight
    vocab, dim = weight.shape

    def bench(cfg):
        n_valid = _count(x)
        return policy.time_call(lambda: _partials(x, opts, with_stats, cfg, n_valid), hidden.device)

    return policy.fused_config(
        hidden.dtype,
        hidden.device,
        hidden.shape[0],  # all rows, known without a sync: the same key in either layout
        dim,
        vocab,
        allow_tf32=opts.allow_tf32,
        autotune=opts.autotune,
        bench=bench if tune else None,
    )


def _partials(x: Rows, opts: LogitOptions, with_stats: bool, cfg, n_valid, kept=None):
    """Launches the partial kernel with ``cfg``; returns the ``[n_q, n_splits, Nv]`` partials
    (and fills ``kept (Nv, V)`` fp32 with the logits if given)."""
    hidden, weight, bias, rows, labels, _ = x
    n_rows = rows.shape[0]
    vocab, dim = weight.shape
    device = hidden.device
    n_splits, split_size = policy.vocab_splits(
        n_rows, vocab, dim, hidden.element_size(), cfg, device
    )
    n_q = 6 if with_stats else 3
    part = torch.empty((n_q, n_splits, n_rows), dtype=torch.float32, device=device)
    has_bias = bias is not None
    grid = (triton.cdiv(n_rows, cfg.block_n) * n_splits,)
    _fwd_partial_kernel[grid](
        hidden,
        weight,
        bias if has_bias else weight,
        rows,
        labels,
        part,
        part if kept is None else kept,
        n_valid,
        n_rows,
        dim,
        vocab,
        n_splits,
        split_size,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        part.stride(0),
        part.stride(1),
        0 if kept is None else kept.stride(0),
        opts.pre_scale,
        opts.post_scale,
        1.0 / vocab,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        HAS_BIAS=has_bias,
        HAS_SOFTCAP=opts.has_softcap,
        HAS_STATS=with_stats,
        INTERPRETER=not policy.compiled_on_gpu(device),
        PRECISION=policy.fp32_precision(hidden.dtype, opts.allow_tf32),
        KEEP=kept is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return part


def forward(x: Rows, opts: LogitOptions, with_stats: bool, keep: bool = False):
    """Launcher of :meth:`dpo_kernels.backend.Backend.forward` (with ``keep``, of
    :meth:`~dpo_kernels.backend.Backend.forward_kept`: also the ``(Nv, V)`` fp32 logits)."""
    hidden, labels = x.hidden, x.labels
    n_rows = x.rows.shape[0]
    vocab = x.weight.shape[0]
    cfg = fused_config(x, opts, with_stats, tune=True)
    n_valid = _count(x)  # one device tensor for both launches
    kept = None
    if keep:
        kept = torch.empty((n_rows, vocab), dtype=torch.float32, device=hidden.device)
        # The store's pointers need registers too.
        fma = policy.fp32_precision(hidden.dtype, opts.allow_tf32) == "ieee"
        cfg = policy.keep_config(cfg, fma=fma and hidden.dtype == torch.float32)
    part = _partials(x, opts, with_stats, cfg, n_valid, kept)
    n_splits = part.shape[1]
    n_out = 7 if with_stats else 3
    tok = torch.empty((n_out, n_rows), dtype=torch.float32, device=hidden.device)
    comb = policy.combine_config(hidden.device)
    block = comb.block_n
    _fwd_combine_kernel[(triton.cdiv(n_rows, block),)](
        part,
        labels,
        tok,
        n_valid,
        n_rows,
        n_splits,
        vocab,
        part.stride(0),
        part.stride(1),
        tok.stride(0),
        HAS_STATS=with_stats,
        BLOCK=block,
        num_warps=comb.num_warps,
    )
    return TokenResult(*tok.unbind()) if not keep else (TokenResult(*tok.unbind()), kept)
