"""Pure-torch log-probs of target tokens under a linear head, chunked over tokens.

The fallback backend (``backend="torch"``) and the definition of the math every other backend
matches. It never holds more than one chunk of logits: the chunk is sized from the memory budget
(:func:`chunk_budget_bytes`), so peak memory is ``O(budget + V·D)`` whatever the token count.

All backends share one interface, on *compacted* rows (only the non-ignored tokens):

``forward(hidden, weight, bias, labels_c, rows, seg, opts, with_stats) -> (tok, seq)``
    hidden ``(N, D)``, weight ``(V, D)``, bias ``(V,)`` or None; ``rows (Nv,)`` the indices of the
    valid rows of ``hidden`` in increasing order, ``labels_c (Nv,)`` their labels; ``seg (S+1,)``
    the offsets of each sequence in the compacted order. ``tok`` maps ``logp, lse`` (and with
    stats ``logits_mean, entropy, top1, log_sum_sq_probs``) to ``(Nv,)`` tensors; ``seq`` maps the
    same keys except ``lse`` to their per-sequence sums ``(S,)``. A label outside ``[0, V)``
    gives a NaN log-prob, never a plausible number.

``backward(hidden, weight, bias, labels_c, rows, lse_c, grad_c, opts, needs) -> (dH, dW, db)``
    ``grad_c (Nv,)`` the upstream gradient of each valid token's log-prob; ``needs`` three bools
    (hidden, weight, bias). Returns gradients in the input dtype (None where not needed); the
    ignored rows of ``dH`` are zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

#: Default memory budget for one chunk of logits (forward) or logit gradients (backward).
DEFAULT_CHUNK_MB = 256.0
STAT_KEYS = ("logits_mean", "entropy", "top1", "log_sum_sq_probs")


def chunk_budget_bytes() -> int:
    """Bytes one chunk of ``[tokens × vocab]`` work may take: ``DPO_KERNELS_CHUNK_MB`` MiB."""
    raw = os.environ.get("DPO_KERNELS_CHUNK_MB")
    if raw is None:
        return int(DEFAULT_CHUNK_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"DPO_KERNELS_CHUNK_MB must be a number of MiB, got {raw!r}") from None
    if not mb > 0:
        raise ValueError(f"DPO_KERNELS_CHUNK_MB must be positive, got {raw!r}")
    return max(1, int(mb * 2**20))


@dataclass(frozen=True)
class LogitOptions:
    """The scalar options of one call, shared by every backend.

    Logits are ``z = softcap·tanh(logit_scale·x / softcap) / temperature`` with ``x = h·Wᵀ + b``,
    or ``z = logit_scale·x / temperature`` without softcap: ``z = post_scale·tanh(pre_scale·x)``
    or ``z = pre_scale·x``.
    """

    ignore_index: int = -100
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def pre_scale(self) -> float:
        if self.softcap is None:
            return self.logit_scale / self.temperature
        return self.logit_scale / self.softcap

    @property
    def post_scale(self) -> float:
        return 1.0 if self.softcap is None else self.softcap / self.temperature

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits ``x`` -> the logits ``z`` the log-softmax is taken over."""
        if self.softcap is None:
            return x * self.pre_scale
        return torch.tanh(x * self.pre_scale) * self.post_scale

    def transform_grad(self, z: torch.Tensor) -> torch.Tensor:
        """``dz/dx`` written in terms of ``z`` (for softcap ``tanh = z / post_scale``)."""
        if self.softcap is None:
            return torch.full_like(z, self.pre_scale)
        t = z / self.post_scale
        return (1.0 - t * t) * (self.pre_scale * self.post_scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 inputs stay float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Sums of ``x (Nv,)`` over the segments ``[seg[i], seg[i+1])``, deterministic on any device.

    A float64 prefix sum and a difference: no atomics, and the difference loses only ~1e-16 of
    the prefix magnitude, far below the float32 values summed. A non-finite value (the NaN of a
    bad label) makes its own segment NaN and leaves the others alone.
    """
    finite = torch.isfinite(x)
    prefix = torch.zeros((2, x.shape[0] + 1), dtype=torch.float64, device=x.device)
    torch.cumsum(torch.stack([torch.where(finite, x, 0).double(), (~finite).double()]), 1,
                 out=prefix[:, 1:])
    sums, n_bad = prefix[:, seg[1:]] - prefix[:, seg[:-1]]
    return torch.where(n_bad > 0, float("nan"), sums).to(x.dtype)


def _token_chunk(n_rows: int, vocab: int, itemsize: int) -> int:
    # Three [chunk × V] temporaries live at once (logits, probabilities, their product or grad).
    return max(1, min(n_rows, chunk_budget_bytes() // max(1, 3 * vocab * itemsize)))


def _chunk_logits(hidden_c, weight_c, bias_c, opts: LogitOptions) -> torch.Tensor:
    x = hidden_c @ weight_c.T
    if bias_c is not None:
        x = x + bias_c
    return opts.transform(x)


def forward(hidden, weight, bias, labels_c, rows, seg, opts: LogitOptions, with_stats: bool):
    acc = compute_dtype(hidden.dtype)
    vocab = weight.shape[0]
    # One upcast of the head (O(V·D)) so every chunk's logits are accumulated and kept in acc.
    weight_c = weight.to(acc)
    bias_c = None if bias is None else bias.to(acc)
    n = rows.shape[0]
    keys = ("logp", "lse") + (STAT_KEYS if with_stats else ())
    tok = {k: torch.empty(n, dtype=acc, device=hidden.device) for k in keys}
    bad = (labels_c < 0) | (labels_c >= vocab)
    safe_labels = labels_c.clamp(0, vocab - 1)
    step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
    for s in range(0, n, step):
        r = rows[s : s + step]
        z = _chunk_logits(hidden.index_select(0, r).to(acc), weight_c, bias_c, opts)
        lse = torch.logsumexp(z, dim=-1)
        target = z.gather(1, safe_labels[s : s + step, None]).squeeze(1)
        tok["lse"][s : s + step] = lse
        tok["logp"][s : s + step] = target - lse
        if with_stats:
            p = torch.exp(z - lse[:, None])
            tok["logits_mean"][s : s + step] = z.mean(dim=-1)
            tok["entropy"][s : s + step] = lse - (p * z).sum(dim=-1)
            tok["top1"][s : s + step] = (target >= z.amax(dim=-1)).to(acc)
            tok["log_sum_sq_probs"][s : s + step] = torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse
            del p
        del z
    tok["logp"] = torch.where(bad, torch.full_like(tok["logp"], float("nan")), tok["logp"])
    seq = {k: segment_sum(v, seg) for k, v in tok.items() if k != "lse"}
    return tok, seq


def backward(hidden, weight, bias, labels_c, rows, lse_c, grad_c, opts: LogitOptions, needs):
    need_h, need_w, need_b = needs
    acc = compute_dtype(hidden.dtype)
    vocab = weight.shape[0]
    weight_c = weight.to(acc)
    bias_c = None if bias is None else bias.to(acc)
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
    safe_labels = labels_c.clamp(0, vocab - 1)
    n = rows.shape[0]
    step = _token_chunk(n, vocab, torch.finfo(acc).bits // 8)
    for s in range(0, n, step):
        r = rows[s : s + step]
        h = hidden.index_select(0, r).to(acc)
        z = _chunk_logits(h, weight_c, bias_c, opts)
        # d logp / d z = onehot - softmax; chain rule through the transform, times upstream grad.
        g = torch.exp(z - lse_c[s : s + step, None].to(acc)).neg_()
        g.scatter_add_(1, safe_labels[s : s + step, None], torch.ones_like(g[:, :1]))
        g.mul_(opts.transform_grad(z)).mul_(grad_c[s : s + step, None].to(acc))
        del z
        if need_h:
            d_hidden.index_copy_(0, r, (g @ weight_c).to(hidden.dtype))
        if need_w:
            d_weight.addmm_(g.T, h)
        if need_b:
            d_bias += g.sum(dim=0)
        del g
    return (
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )
