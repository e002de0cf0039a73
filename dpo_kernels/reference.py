"""The pure-torch backend (``backend="torch"``): the oracle every other backend matches, and the
last-resort fallback.

It implements :class:`dpo_kernels.backend.Backend` with plain torch ops, chunked over tokens: it
never holds more than one chunk of logits, sized from the memory budget
(:func:`dpo_kernels.backend.chunk_budget_bytes`), so peak memory is ``O(budget + V·D)`` whatever
the token count. Runs on any device and dtype, float64 included (in float64).
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import (
    Backend,
    Grads,
    LogitOptions,
    Needs,
    Rows,
    TokenResult,
    chunk_budget_bytes,
    compute_dtype,
    register,
)


def _token_chunk(n_rows: int, vocab: int, itemsize: int) -> int:
    # Three [chunk × V] temporaries live at once (logits, probabilities, their product or grad).
    return max(1, min(n_rows, chunk_budget_bytes() // max(1, 3 * vocab * itemsize)))


def _chunk_logits(hidden_c, weight_c, bias_c, opts: LogitOptions) -> torch.Tensor:
    x = hidden_c @ weight_c.T
    if bias_c is not None:
        x = x + bias_c
    return opts.transform(x)


def token_results(z, safe_labels, out, with_stats: bool) -> torch.Tensor:
    """Fills ``out (3 or 7, n)`` from one chunk's logits ``z (n, V)``: the fields of
    :class:`~dpo_kernels.backend.TokenResult` (log-prob, max logit, ``log_s``, stats); returns
    their norm ``(2, n)`` (a view of ``out``)."""
    m = z.amax(dim=-1)
    # Relative to the maximum (0 for a row of -inf logits: no NaN from -inf − -inf).
    m_ref = torch.where(m == float("-inf"), 0.0, m)
    rel = z - m_ref[:, None]
    log_s = torch.log(torch.exp(rel).sum(dim=-1))
    z_t = z.gather(1, safe_labels[:, None]).squeeze(1)
    out[0] = (z_t - m_ref) - log_s  # no rounded log-sum-exp of |z|'s size
    out[1] = m
    out[2] = log_s
    if with_stats:
        # Everything relative to the maximum (log p <= 0): no overflow for logits near the
        # float limit, no cancellation of huge terms; a -inf logit (p = 0) adds nothing.
        logp = rel.sub_(log_s[:, None])
        p = torch.exp(logp)
        out[3] = (z * (1.0 / z.shape[1])).sum(dim=-1)  # each term scaled: no overflow
        out[4] = -torch.where(p == 0, 0.0, p * logp).sum(dim=-1)
        out[5] = (z_t >= m).to(out.dtype)
        out[6] = torch.logsumexp(2.0 * logp, dim=-1)
    return out[1:3]


def _add_onehot(g, labels):
    """``g += onehot(labels)`` in place; a label outside ``[0, V)`` adds nothing (the contract
    of every backend's backward: a vocabulary-parallel call relies on it)."""
    safe = labels.clamp(0, g.shape[1] - 1)
    g.scatter_add_(1, safe[:, None], (safe == labels).to(g.dtype)[:, None])
    return g


def softmax_from(z, norm) -> torch.Tensor:
    """``p = exp((z − m) − log_s)`` of one chunk from the forward's ``norm (2, n)``, in that
    order (as accurate as ``log_softmax``), as a new tensor."""
    return (z - norm[0][:, None]).sub_(norm[1][:, None]).exp_()


def logit_grad(z, norm, labels, opts: LogitOptions) -> torch.Tensor:
    """``(onehot − softmax) · dz/dx`` of one chunk, in place of a new ``z``-shaped tensor."""
    g = _add_onehot(softmax_from(z, norm).neg_(), labels)
    return g.mul_(opts.transform_grad(z))


def jacobian_forward(x: Rows, opts: LogitOptions, with_stats: bool, logits, jac_mm=None):
    """The frozen-head forward (4·N·D·V): per-token results and ``J (Nv, D)`` fp32 with
    ``J[i] = d logp_i / d h_i = Σ_v (onehot − p)_v · z'_v · W_v`` (= ``W[y] − E_p[W]`` without
    softcap), chunked over tokens so one chunk of logits fits the budget. ``logits(h)`` gives a
    chunk's logits in the compute dtype; ``jac_mm(g)`` multiplies a chunk's ``g`` by ``W``.
    Without ``jac_mm`` it is the plain forward (2·N·D·V) and ``J`` is None."""
    hidden, weight, _, rows, labels, count = x
    acc = compute_dtype(hidden.dtype)
    vocab, dim = weight.shape
    n = rows.shape[0]
    out = torch.empty((7 if with_stats else 3, n), dtype=acc, device=hidden.device)
    jac = None if jac_mm is None else torch.empty((n, dim), dtype=acc, device=hidden.device)
    bad = (labels < 0) | (labels >= vocab)
    safe_labels = labels.clamp(0, vocab - 1)
    step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
    for s in range(0, n, step):
        sl = slice(s, s + step)
        z = logits(hidden.index_select(0, rows[sl]))
        norm = token_results(z, safe_labels[sl], out[:, sl], with_stats)
        if jac_mm is None:
            del z  # before the next chunk's logits exist: one chunk live at a time
            continue
        g = logit_grad(z, norm, labels[sl], opts)
        del z
        if count is not None:  # sync-free layout: rows past the count get no gradient
            keep = torch.arange(s, s + g.shape[0], device=g.device) < count
            g = torch.where(keep[:, None], g, 0.0)  # (not g·0: junk there may be NaN)
        jac[sl] = jac_mm(g)
        del g
    out[0] = torch.where(bad, float("nan"), out[0])
    return TokenResult(*out.unbind()), jac


class TorchBackend(Backend):
    """Logits chunk by chunk in the compute dtype (fp32, or float64 for float64 inputs)."""

    name = "torch"

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        return None

    def forward(self, x: Rows, opts: LogitOptions, with_stats: bool) -> TokenResult:
        return self._scan(x, opts, with_stats, jacobian=False)[0]

    jacobian = True

    def forward_jacobian(self, x: Rows, opts: LogitOptions, with_stats: bool):
        return self._scan(x, opts, with_stats, jacobian=True)

    keeps_logits = True

    def forward_kept(self, x: Rows, opts: LogitOptions, with_stats: bool):
        hidden, weight, bias, rows, labels, _ = x
        acc = compute_dtype(hidden.dtype)
        vocab = weight.shape[0]
        h = hidden.index_select(0, rows).to(acc)
        z = _chunk_logits(h, weight.to(acc), None if bias is None else bias.to(acc), opts)
        out = torch.empty((7 if with_stats else 3, rows.shape[0]), dtype=acc, device=h.device)
        token_results(z, labels.clamp(0, vocab - 1), out, with_stats)
        bad = (labels < 0) | (labels >= vocab)
        out[0] = torch.where(bad, float("nan"), out[0])
        return TokenResult(*out.unbind()), z.contiguous()

    def backward_kept(self, x: Rows, kept, norm, grad, opts: LogitOptions, needs: Needs) -> Grads:
        hidden, weight, bias, rows, labels, _ = x
        acc = compute_dtype(hidden.dtype)
        # G = grad · (onehot − softmax) · dz/dx, in place of the kept logits where the transform's
        # derivative is a constant (one temporary of their size with softcap).
        dzdx = opts.transform_grad(kept) if opts.has_softcap else None
        norm = norm.to(acc)
        g = kept.sub_(norm[0][:, None]).sub_(norm[1][:, None]).exp_().neg_()
        g = _add_onehot(g, labels)
        g = g.mul_(dzdx) if dzdx is not None else g.mul_(opts.pre_scale)
        del dzdx
        g.mul_(grad.to(acc)[:, None])
        weight_c = weight.to(acc)
        d_hidden = d_weight = d_bias = None
        if needs.hidden:
            d_hidden = torch.zeros_like(hidden)
            d_hidden.index_copy_(0, rows, (g @ weight_c).to(hidden.dtype))
        if needs.weight:
            d_weight = (g.T @ hidden.index_select(0, rows).to(acc)).to(weight.dtype)
        if needs.bias:
            d_bias = g.sum(dim=0).to(bias.dtype)
        return Grads(d_hidden, d_weight, d_bias)

    @staticmethod
    def _scan(x: Rows, opts: LogitOptions, with_stats: bool, jacobian: bool):
        acc = compute_dtype(x.hidden.dtype)
        # One upcast of the head (O(V·D)) so every chunk's logits are accumulated and kept in acc.
        weight_c = x.weight.to(acc)
        bias_c = None if x.bias is None else x.bias.to(acc)

        def logits(h):
            return _chunk_logits(h.to(acc), weight_c, bias_c, opts)

        jac_mm = (lambda g: g @ weight_c) if jacobian else None
        return jacobian_forward(x, opts, with_stats, logits, jac_mm)

    def backward(self, x: Rows, norm, grad, opts: LogitOptions, needs: Needs) -> Grads:
        hidden, weight, bias, rows, labels, _ = x
        acc = compute_dtype(hidden.dtype)
        vocab = weight.shape[0]
        weight_c = weight.to(acc)
        bias_c = None if bias is None else bias.to(acc)
        d_hidden = torch.zeros_like(hidden) if needs.hidden else None
        d_weight = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs.weight else None
        )
        d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if needs.bias else None
        n = rows.shape[0]
        step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            r = rows[sl]
            h = hidden.index_select(0, r).to(acc)
            z = _chunk_logits(h, weight_c, bias_c, opts)
            # d logp / d z = onehot - softmax; chain rule through the transform, times upstream.
            g = logit_grad(z, norm[:, sl].to(acc), labels[sl], opts)
            g.mul_(grad[sl, None].to(acc))
            del z
            if needs.hidden:
                d_hidden.index_copy_(0, r, (g @ weight_c).to(hidden.dtype))
            if needs.weight:
                d_weight.addmm_(g.T, h)
            if needs.bias:
                d_bias += g.sum(dim=0)
            del g
        return Grads(
            d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
        )


BACKEND = register(TorchBackend())
