"""Vocabulary-parallel (tensor-parallel) heads and sequence-parallel sums over torch.distributed.

**Vocabulary parallel** (``linear_logprobs(..., vocab_parallel_group=group)``): each rank of
``group`` holds a contiguous shard of the head's rows, the shards in rank order make the whole
head (sizes may differ), and every rank holds the same ``hidden`` and the same ``labels``
(global token ids). Each rank runs the backend on its shard with the labels that fall in it
(others marked "not here": a label outside ``[0, V_shard)``, which no backend matches); then
two all-reduces of a few numbers per token (the max of the shards' log-sum-exps, of their max
logits and of the label's logit where the label is its shard's top-1; the sum of the rescaled
sum-exps, of the target logit and of the stats' partial sums) give every rank the full result.
The backward runs each shard's backward with the global log-sum-exp: ``dW``/``db`` are the
local shard's, and the shards' ``dH`` pieces are summed with one all-reduce, so every rank gets
the full gradient w.r.t. ``hidden``. Neither logits nor the head ever cross the group.

**Sequence parallel** (context parallelism, ring or Ulysses): when one sequence's tokens are
split over the ranks of ``group``, :func:`sequence_parallel_sum` (or
``linear_logprobs(..., sequence_parallel_group=group)``) all-reduces the per-sequence partial
sums so every rank holds the global ones; its backward hands each rank the gradient of its own
partials, so the ranks' parameter gradients add up to the unsplit run's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backend import (
    STAT_FIELDS,
    Backend,
    LogitOptions,
    Needs,
    Rows,
    check_cu_seqlens,
    check_labels,
    compact,
    compute_dtype,
    scatter_rows,
    segment_sum,
    validate_data,
)

__all__ = ["sequence_parallel_sum"]


# ----------------------------------------------------------------------------- sequence parallel


class _SequenceParallelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same loss from the global sums, so d loss / d (its partial) is
        # the upstream gradient itself: no communication (an all-reduce here would count the
        # loss once per rank).
        return grad, None


def sequence_parallel_sum(x: Tensor, group=None) -> Tensor:
    """The sum over the ranks of ``group`` of ``x`` (each rank's per-sequence partial sums,
    e.g. the ``logps`` or ``num_tokens`` of its slice of every sequence), on every rank.

    Differentiable: each rank's ``x`` receives the gradient of the global sum (not summed over
    the ranks again), so when every rank computes the same loss from the global sums, the
    parameter gradients of the ranks sum to those of the unsplit run — which is what a
    data-parallel engine spanning the context-parallel ranks adds up (mind its averaging: with
    gradients *averaged* over ``k`` context-parallel ranks, scale the loss by ``k``, as
    context-parallel trainers do). Integer ``x`` (token counts) is summed without autograd.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not (x.dtype.is_floating_point and x.requires_grad and torch.is_grad_enabled()):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out
    return _SequenceParallelSum.apply(x, group)


# ----------------------------------------------------------------------------- vocab parallel


def _layout(group, hidden: Tensor, weight: Tensor, labels: Tensor, cu: Tensor, n_valid: int):
    """(this rank's vocab offset, the full vocab size) from one all-gather, which also checks
    that every rank holds the same hidden size, token count, valid rows, labels and sequences (a
    mismatch would make the ranks' collectives disagree: it is an error on every rank, never a
    hang)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = labels.shape[0]
    weights = torch.arange(1, n + 1, dtype=torch.int64, device=labels.device) % 1000003
    fingerprint = int((labels.to(torch.int64) * weights).sum())  # wraps the same on every rank
    sequences = int((cu.to(torch.int64) * (cu.shape[0] + 7)).sum())
    info = torch.tensor(
        [weight.shape[0], weight.shape[1], n, n_valid, fingerprint, sequences],
        dtype=torch.int64,
        device=hidden.device,
    )
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=group)
    table = torch.stack(gathered).cpu()
    for r in range(world):
        if not torch.equal(table[r, 1:], table[0, 1:]):
            raise ValueError(
                "vocab_parallel_group: every rank must pass the same hidden (and D), the same "
                "labels and cu_seqlens; (D, tokens, valid tokens, labels, sequences) is "
                f"{tuple(table[0, 1:].tolist())} on rank 0 but {tuple(table[r, 1:].tolist())} "
                f"on rank {r}"
            )
    sizes = table[:, 0]
    return int(sizes[:rank].sum()), int(sizes.sum())


class _VocabParallelTokens(torch.autograd.Function):
    """Per-token log-probs (and stats) of the compacted rows over a vocab-sharded head."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, rows, local, own, group, opts, backend, with_stats, vocab
    ):
        x = Rows(hidden, weight, bias, rows, local)
        with torch.autocast(hidden.device.type, enabled=False):
            tok = backend.forward(x, opts, with_stats)
        m_r, log_s_r = tok.max_logit, tok.log_s
        minus_inf = torch.full_like(m_r, float("-inf"))
        maxes = [m_r]
        if with_stats:
            # top-1: the label's logit (exact: it is its shard's max where it is that shard's
            # top-1) against the max logit of every other shard.
            maxes.append(torch.where(own, minus_inf, m_r))
            mine = own & (tok.top1_correct > 0)
            maxes.append(torch.where(mine, m_r, minus_inf))
        big = torch.stack(maxes)
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        m = big[0]
        # The shard's log-sum-exp relative to the global maximum, and the target's logit
        # z_t − m (z_t − m_r is the shard's logp + log_s_r): differences of nearby numbers, never
        # a rounded log-sum-exp of the size of the logits.
        rel = (m_r - m) + log_s_r
        scale = torch.exp(rel)
        target = torch.where(own, (tok.logps + log_s_r) + (m_r - m), torch.zeros_like(m_r))
        sums = [scale, target]
        if with_stats:
            # Σ_v e^{z−m}(z−m) over the shard: its entropy relative to m, no huge cancellation;
            # a shard whose lanes are all masked (rel = -inf) adds nothing (not 0·∞)
            vanished = scale > 0
            sums.append(torch.where(vanished, scale * (rel - tok.entropy_sum), 0.0))
            part = torch.exp(tok.log_sum_sq_probs_sum + 2.0 * rel)  # Σ e^{2(z−m)}
            sums.append(torch.where(vanished, part, 0.0))
            # the shard's mean logit weighted by its share of the vocabulary (no overflow)
            sums.append(tok.logits_sum * (weight.shape[0] / vocab))
        total = torch.stack(sums)
        dist.all_reduce(total, group=group)
        log_s = torch.log(total[0])
        logps = total[1] - log_s
        ctx.save_for_backward(hidden, weight, bias, rows, local, torch.stack((m, log_s)))
        ctx.group, ctx.opts, ctx.backend = group, opts, backend
        if not with_stats:
            return logps, None, None, None, None
        stats = (
            total[4],
            log_s - total[2] / total[0],
            ((big[2] > float("-inf")) & (big[2] >= big[1])).to(logps.dtype),
            torch.log(total[3]) - 2.0 * log_s,
        )
        ctx.mark_non_differentiable(*stats)
        return (logps, *stats)

    @staticmethod
    def backward(ctx, grad, *_):
        hidden, weight, bias, rows, local, norm = ctx.saved_tensors
        needs = Needs(*ctx.needs_input_grad[:3])
        x = Rows(hidden, weight, bias, rows, local)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = ctx.backend.backward(x, norm, grad.contiguous(), ctx.opts, needs)
        d_hidden = grads.hidden
        if d_hidden is not None:
            dist.all_reduce(d_hidden, group=ctx.group)  # the shards' pieces of dH = G·W
        return d_hidden, grads.weight, grads.bias, *([None] * 8)


def vocab_parallel_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    cu_seqlens: Tensor,
    group,
    opts: LogitOptions,
    backend: Backend,
    reduction: str,
    with_stats: bool,
):
    """``linear_logprobs``'s outputs ``(logps, num_tokens, logits_sum, entropy_sum,
    top1_correct, log_sum_sq_probs_sum)`` for a vocabulary-sharded head (stats None without
    ``with_stats``); ``hidden (N, D)``, ``labels (N,)`` global ids, ``weight`` this rank's rows."""
    n = hidden.shape[0]
    acc = compute_dtype(hidden.dtype)
    per_token = reduction == "none"
    x, seg, cu_ok = compact(
        hidden, weight, bias, labels, cu_seqlens, opts.ignore_index, check=False
    )
    rows, glob = x.rows, x.labels
    offset, vocab = _layout(group, hidden, weight, labels, cu_seqlens, rows.shape[0])
    # The checks linear_logprobs makes, against the full vocabulary (the same on every rank).
    if labels.device.type == "cpu" or validate_data():
        check_labels(labels, vocab, opts.ignore_index)
    if cu_seqlens.device.type == "cpu" or validate_data():
        check_cu_seqlens(cu_seqlens, n)
    v_local = weight.shape[0]
    own = (glob >= offset) & (glob < offset + v_local)
    local = torch.where(own, glob - offset, torch.full_like(glob, v_local))  # v_local: not here
    fields = ("logps",) + (STAT_FIELDS if with_stats else ())
    if rows.shape[0] == 0:  # the same on every rank (checked): no collective, no backend call
        # Keep the graph: a loss on these zeros backpropagates zeros to hidden, weight, bias.
        zero = (hidden.sum() + weight.sum() + (0 if bias is None else bias.sum())) * 0
        tok = [zero.to(acc).expand(0)] + [torch.zeros(0, dtype=acc, device=hidden.device)] * (
            len(fields) - 1
        )
    else:
        out = _VocabParallelTokens.apply(
            hidden, x.weight, x.bias, rows, local, own, group, opts, backend, with_stats, vocab
        )
        tok = [out[0]]
        if with_stats:
            logits_sum, entropy, top1, lss = out[1:]
            tok += [logits_sum, entropy, top1, lss]
    if per_token:
        vals = [scatter_rows(t, x, n, acc) for t in tok]
        num_tokens = (labels != opts.ignore_index).to(torch.int64)
    else:
        seq_of_row = torch.repeat_interleave(
            torch.arange(seg.shape[0] - 1, device=seg.device),
            seg[1:] - seg[:-1],
            output_size=rows.shape[0],
        )
        vals = [_SegmentSum.apply(tok[0], seg, seq_of_row, reduction == "mean")]
        vals += [segment_sum(t.to(acc), seg) for t in tok[1:]]
        num_tokens = seg[1:] - seg[:-1]
    if cu_ok is not None:
        vals = [torch.where(cu_ok, v, float("nan")) for v in vals]
    if not with_stats:
        return vals[0], num_tokens, None, None, None, None
    logps, logits_sum, entropy, top1, lss = vals
    return logps, num_tokens, logits_sum, entropy, top1.round().to(torch.int64), lss


class _SegmentSum(torch.autograd.Function):
    """:func:`~dpo_kernels.backend.segment_sum` (deterministic, float64 inside; the mean with
    ``mean``) with its backward: each row gets its sequence's gradient (over its length)."""

    @staticmethod
    def forward(ctx, values, seg, seq_of_row, mean):
        ctx.save_for_backward(seg, seq_of_row)
        ctx.mean = mean
        return segment_sum(values, seg, mean)

    @staticmethod
    def backward(ctx, grad):
        seg, seq_of_row = ctx.saved_tensors
        if ctx.mean:
            grad = grad / (seg[1:] - seg[:-1]).clamp(min=1)
        return grad.index_select(0, seq_of_row), None, None, None
