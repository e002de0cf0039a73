"""The loss-level fast path: per-sequence log-probs of pairs whose loss is known in the forward.

A DPO policy pass with bounded memory costs 8·N·D·V on the plain op (forward, then in the
backward a recompute of the logits, dH and dW), because the op cannot know a sequence's gradient
before the loss is taken. Inside a loss module the loss *is* known, and once the reference
log-probs are in hand a pair's gradient is known as soon as its own log-probs are. So, for each
chunk of pairs whose fp32 logits fit the memory budget (``DPO_KERNELS_CHUNK_MB``):

1. the backend scores the chunk and keeps its logits (:meth:`Backend.forward_kept`);
2. the loss's gradient w.r.t. the chunk's per-sequence log-probs is taken at once (autograd on
   the chunk's few numbers, ``chunk_loss``);
3. the backend turns the kept logits into the logit gradient in place and into dH, dW, db
   (:meth:`Backend.backward_kept`): no recompute.

That is 6·N·D·V for the policy, memory one chunk of logits (N_chunk·V·4 bytes) plus the gradients.
The autograd graph holds the gradients until ``backward()``, which only scales them by the
upstream gradient of the loss.

:func:`plan` says where it applies; elsewhere the modules take the recompute path (the plain op,
the same values): ``DPO_KERNELS_LOSS_PATH=recompute`` forces that, and it is taken when

- the backend does not keep logits (all three do: C++, torch, and Triton, whose forward
  kernel then also writes the fp32 logits and whose backward kernel reads them instead of
  recomputing), or the call is being traced by ``torch.compile``, or no input needs a gradient;
- one pair's logits alone exceed the budget;
- the batch needs more than one chunk and the loss couples the pairs (``aot``,
  ``aot_unpaired`` and ``sft`` of the DPO family: a sort, or a batch mean, over all pairs), or
  the head is bf16/fp16 (its gradient would be rounded once per chunk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .backend import (
    Backend,
    LogitOptions,
    Needs,
    Rows,
    check_cu_seqlens,
    check_labels,
    chunk_budget_bytes,
    compute_dtype,
    resolve,
    segment_sum,
    sequence_offsets,
    validate_data,
)
from .logprobs import LogProbStats, _autocast_inputs, _check_args, _check_overflow, _per_row

__all__ = ["LOSS_PATHS", "fused_pair_loss", "plan"]

LOSS_PATHS = ("auto", "recompute")

#: ``chunk_loss(stats, pairs)``: the loss contribution of the pairs ``pairs`` (a slice of pair
#: indices) from their sequences' statistics ``stats`` (chosen sequences first, then rejected,
#: ``logps`` the per-sequence sums), already divided by the batch's own normalisers, so that the
#: contributions of disjoint chunks add up to the batch's loss. (Unpaired, ``paired=False``:
#: ``pairs`` is a slice of sequences and ``stats`` are theirs.)
ChunkLoss = Callable[[LogProbStats, slice], Tensor]


def _mode() -> str:
    mode = os.environ.get("DPO_KERNELS_LOSS_PATH", "auto")
    if mode not in LOSS_PATHS:
        raise ValueError(f"DPO_KERNELS_LOSS_PATH must be one of {LOSS_PATHS}, got {mode!r}")
    return mode


def plan(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    *,
    ignore_index: int,
    backend: str,
    separable: bool,
    paired: bool = True,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[list[slice], str]:
    """The chunks of pairs (slices of pair indices, in order) the fast path scores, or a string:
    why it does not apply here (the caller then takes the recompute path).

    ``hidden (2B, T, D)`` chosen half first, ``labels (2B, T)``; ``separable``: the loss is a sum
    of per-pair terms (else it must see the whole batch in one chunk). ``paired=False``: the
    sequences are unpaired (KTO): ``hidden (N, T, D)``, and a chunk is a slice of sequences.
    ``cu_seqlens (S + 1,)``: packed sequences, ``hidden (N, D)`` and ``labels (N,)`` one row of
    them (sequence ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s+1]``, chosen sequences first)."""
    if _mode() == "recompute":
        return "DPO_KERNELS_LOSS_PATH=recompute"
    if not torch.is_grad_enabled():
        return "gradients are off"
    if not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return "no input needs a gradient"
    if torch.compiler.is_compiling():
        return "traced by torch.compile (the plain op is one opaque custom op there)"
    if hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "CUDA-graph capture (planning the chunks reads token counts on the host)"
    chosen = resolve(backend, hidden.device, hidden.dtype)
    if not chosen.keeps_logits:
        return f"backend {chosen.name!r} does not keep logits"
    counts = _sequence_offsets(labels, ignore_index, cu_seqlens)[2].diff()
    pairs = counts.shape[0] // 2 if paired else counts.shape[0]
    item = torch.finfo(compute_dtype(hidden.dtype)).bits // 8
    row_bytes = weight.shape[0] * item
    per_pair = counts[:pairs] + counts[pairs:] if paired else counts
    per_pair = per_pair.tolist()  # one host read on a GPU
    budget = chunk_budget_bytes()
    biggest = max(per_pair, default=0) * row_bytes
    if biggest > budget:
        return (
            f"one pair's logits ({biggest / 2**20:.1f} MiB) exceed the memory budget "
            f"({budget / 2**20:.1f} MiB, DPO_KERNELS_CHUNK_MB)"
        )
    chunks, start, used = [], 0, 0
    for p, rows in enumerate(per_pair):
        if used + rows * row_bytes > budget:
            chunks.append(slice(start, p))
            start, used = p, 0
        used += rows * row_bytes
    chunks.append(slice(start, pairs))
    if len(chunks) > 1 and not separable:
        return "the loss couples the pairs and the batch's logits exceed the memory budget"
    if len(chunks) > 1 and weight.dtype not in (torch.float32, torch.float64):
        return (
            f"a {weight.dtype} head's gradient would be rounded once per chunk, and the batch's "
            "logits exceed the memory budget"
        )
    return chunks


def _sequence_offsets(labels: Tensor, ignore_index: int, cu_seqlens: Optional[Tensor]):
    """:func:`~dpo_kernels.backend.sequence_offsets` of the rows of ``labels (S, T)`` (each row
    a sequence) or of the packed ``labels (N,)`` with its ``cu_seqlens``."""
    if cu_seqlens is None:
        n_seq, seq_len = labels.shape
        cu_seqlens = torch.arange(n_seq + 1, device=labels.device) * seq_len
    return sequence_offsets(labels.reshape(-1), ignore_index, cu_seqlens)


def _rows_of(seqs: Tensor, valid_rows: Tensor, start: Tensor, counts: Tensor) -> Tensor:
    """The scored rows of the sequences ``seqs``, sequence after sequence."""
    lengths = counts[seqs]
    total = int(lengths.sum())
    first = torch.repeat_interleave(start[seqs], lengths, output_size=total)
    within = torch.arange(total, device=seqs.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths, output_size=total
    )
    return valid_rows[first + within]


@dataclass
class _Job:
    """One fused call: everything but the differentiable tensors."""

    labels: Tensor
    chunks: list[slice]
    chunk_loss: ChunkLoss
    backend: Backend
    opts: LogitOptions
    needs: Needs
    paired: bool = True
    cu_seqlens: Optional[Tensor] = None

    def run(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        dim = hidden.shape[-1]
        acc = compute_dtype(hidden.dtype)
        h2 = hidden.reshape(-1, dim)
        labels = self.labels.reshape(-1).to(torch.int64)
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        valid, _, seg = _sequence_offsets(
            self.labels.to(hidden.device), self.opts.ignore_index, self.cu_seqlens
        )
        valid_rows, start, counts = valid.nonzero().squeeze(1), seg[:-1], seg.diff()
        n_seq = counts.shape[0]
        pairs = n_seq // 2 if self.paired else n_seq
        stats = [torch.zeros(n_seq, dtype=acc, device=hidden.device) for _ in range(5)]
        grads = [None, None, None]
        for sl in self.chunks:
            seqs = torch.arange(sl.start, sl.stop)
            if self.paired:
                seqs = torch.cat([seqs, torch.arange(pairs + sl.start, pairs + sl.stop)])
            seqs = seqs.to(hidden.device)
            # Chosen sequences of the chunk, then its rejected ones: rows in increasing order.
            rows = _rows_of(seqs, valid_rows, start, counts)
            seg = torch.zeros(seqs.shape[0] + 1, dtype=torch.int64, device=hidden.device)
            torch.cumsum(counts[seqs], 0, out=seg[1:])
            n_rows = rows.shape[0]
            x = Rows(h2, weight, bias, rows, labels.index_select(0, rows))
            if n_rows:
                tok, kept = self.backend.forward_kept(x, self.opts, True)
                if hidden.device.type == "cpu" or validate_data():
                    _check_overflow(tok, x)
                fields = (tok.logps, tok.logits_sum, tok.entropy_sum)
                fields += (tok.top1_correct, tok.log_sum_sq_probs_sum)
                sums = [segment_sum(f.to(acc), seg) for f in fields]
                sums[3] = sums[3].round()  # top1_correct: a count
            else:
                sums = [torch.zeros(seqs.shape[0], dtype=acc, device=hidden.device)] * 5
            leaf = sums[0].detach().requires_grad_()
            chunk_stats = LogProbStats(leaf, counts[seqs], *sums[1:])
            with torch.enable_grad():
                loss = self.chunk_loss(_as_counts(chunk_stats), sl)
            g_seq = None
            if loss.requires_grad:
                (g_seq,) = torch.autograd.grad(loss, leaf, allow_unused=True)
            for out, s in zip(stats, sums):
                out[seqs] = s
            if not n_rows:
                continue
            g_seq = torch.zeros_like(leaf) if g_seq is None else g_seq.detach()
            got = self.backend.backward_kept(
                x, kept, tok.norm, _per_row(g_seq, seg, n_rows), self.opts, self.needs
            )
            del kept
            for k, g in enumerate(got):
                if g is not None:
                    grads[k] = g if grads[k] is None else grads[k].add_(g)
        if self.needs.hidden and grads[0] is None:
            grads[0] = torch.zeros_like(h2)
        for k, (need, like) in enumerate(zip(self.needs[1:], (weight, bias)), 1):
            if need and grads[k] is None:
                grads[k] = torch.zeros_like(like)
        if grads[0] is not None:
            grads[0] = grads[0].view(hidden.shape)
        seq_stats = LogProbStats(stats[0], counts, *stats[1:])
        return _as_counts(seq_stats), grads


def _as_counts(st: LogProbStats) -> LogProbStats:
    """``num_tokens`` and ``top1_correct`` as int64 counts, as :func:`linear_logprobs` gives."""
    return st._replace(
        num_tokens=st.num_tokens.to(torch.int64), top1_correct=st.top1_correct.to(torch.int64)
    )


class _FusedPairLoss(torch.autograd.Function):
    """Outputs ``(carrier, *stats)``: ``carrier`` is a 0-d zero whose backward hands out the
    gradients computed in the forward, times the upstream gradient; ``stats`` are the
    per-sequence :class:`LogProbStats` fields, not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        stats, grads = job.run(hidden.detach(), weight.detach(), _detach(bias))
        ctx.save_for_backward(*grads)
        carrier = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ctx.mark_non_differentiable(*stats)
        return (carrier, *stats)

    @staticmethod
    def backward(ctx, grad_carrier, *_):
        # A CPU scalar is read for free: skip the pass over a V×D gradient when it is 1.
        one = grad_carrier.device.type == "cpu" and float(grad_carrier) == 1.0
        return (
            *(g if g is None or one else g * grad_carrier.to(g.dtype) for g in ctx.saved_tensors),
            None,
        )


def _detach(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def fused_pair_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    chunk_loss: ChunkLoss,
    chunks: list[slice],
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    paired: bool = True,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, LogProbStats]:
    """Per-sequence statistics of ``hidden (2B, T, D)`` (chosen half first) under the head
    ``weight (V, D)`` (``bias (V,)``) with ``labels (2B, T)``, and a 0-d ``carrier`` (value 0)
    whose gradient is that of ``Σ_chunks chunk_loss(stats[chunk], chunk)`` w.r.t. ``hidden``,
    ``weight`` and ``bias``: add it to the loss computed from the (detached) statistics.
    ``chunks`` from :func:`plan`. The statistics are those of ``linear_logprobs(...,
    softcap=softcap, temperature=temperature, logit_scale=logit_scale, return_stats=True)``
    (``logps`` the per-sequence sums). ``paired=False`` (with :func:`plan`'s): unpaired
    sequences ``hidden (N, T, D)``, ``chunk_loss`` called with the chunk's sequences.
    ``cu_seqlens`` (with :func:`plan`'s): packed sequences, ``hidden (N, D)``, ``labels (N,)``."""
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_args(
        hidden,
        weight,
        labels,
        bias,
        cu_seqlens,
        "sum",
        temperature,
        logit_scale,
        softcap,
        ignore_index,
        backend,
    )
    if labels.device.type == "cpu":
        check_labels(labels, weight.shape[0], ignore_index)
    if cu_seqlens is not None and cu_seqlens.device.type == "cpu":
        check_cu_seqlens(cu_seqlens, labels.shape[0])
    opts = LogitOptions(
        ignore_index,
        float(temperature),
        float(logit_scale),
        None if softcap is None else float(softcap),
        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        autotune=False,
    )
    needs = Needs(
        hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad
    )
    job = _Job(
        labels,
        chunks,
        chunk_loss,
        resolve(backend, hidden.device, hidden.dtype),
        opts,
        needs,
        paired,
        None if cu_seqlens is None else cu_seqlens.to(hidden.device, torch.int64),
    )
    with torch.autocast(hidden.device.type, enabled=False):
        carrier, *stats = _FusedPairLoss.apply(hidden, weight, bias, job)
    return carrier, LogProbStats(*stats)
