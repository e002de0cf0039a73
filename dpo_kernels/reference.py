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


class TorchBackend(Backend):
    """Logits chunk by chunk in the compute dtype (fp32, or float64 for float64 inputs)."""

    name = "torch"

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        return None

    def forward(self, x: Rows, opts: LogitOptions, with_stats: bool) -> TokenResult:
        hidden, weight, bias, rows, labels = x
        acc = compute_dtype(hidden.dtype)
        vocab = weight.shape[0]
        # One upcast of the head (O(V·D)) so every chunk's logits are accumulated and kept in acc.
        weight_c = weight.to(acc)
        bias_c = None if bias is None else bias.to(acc)
        n = rows.shape[0]
        n_out = 6 if with_stats else 2
        out = torch.empty((n_out, n), dtype=acc, device=hidden.device)
        bad = (labels < 0) | (labels >= vocab)
        safe_labels = labels.clamp(0, vocab - 1)
        step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            z = _chunk_logits(hidden.index_select(0, rows[sl]).to(acc), weight_c, bias_c, opts)
            lse = torch.logsumexp(z, dim=-1)
            target = z.gather(1, safe_labels[sl, None]).squeeze(1)
            out[0, sl] = target - lse
            out[1, sl] = lse
            if with_stats:
                p = torch.exp(z - lse[:, None])
                out[2, sl] = z.mean(dim=-1)
                out[3, sl] = lse - (p * z).sum(dim=-1)
                out[4, sl] = (target >= z.amax(dim=-1)).to(acc)
                out[5, sl] = torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse
                del p
            del z
        out[0] = torch.where(bad, float("nan"), out[0])
        return TokenResult(*out.unbind())

    def backward(self, x: Rows, lse, grad, opts: LogitOptions, needs: Needs) -> Grads:
        hidden, weight, bias, rows, labels = x
        acc = compute_dtype(hidden.dtype)
        vocab = weight.shape[0]
        weight_c = weight.to(acc)
        bias_c = None if bias is None else bias.to(acc)
        d_hidden = torch.zeros_like(hidden) if needs.hidden else None
        d_weight = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs.weight else None
        )
        d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if needs.bias else None
        safe_labels = labels.clamp(0, vocab - 1)
        n = rows.shape[0]
        step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            r = rows[sl]
            h = hidden.index_select(0, r).to(acc)
            z = _chunk_logits(h, weight_c, bias_c, opts)
            # d logp / d z = onehot - softmax; chain rule through the transform, times upstream.
            g = torch.exp(z - lse[sl, None].to(acc)).neg_()
            g.scatter_add_(1, safe_labels[sl, None], torch.ones_like(g[:, :1]))
            g.mul_(opts.transform_grad(z)).mul_(grad[sl, None].to(acc))
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
