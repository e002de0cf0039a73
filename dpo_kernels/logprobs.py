"""``linear_logprobs``: per-sequence log-probs of target tokens under a linear LM head.

Validation and layout handling happen here, in plain (traceable) torch; the work is two
``torch.library`` custom ops, ``dpo_kernels::linear_logprobs_fwd`` and ``..._bwd``, tied by
``register_autograd`` so ``torch.compile(fullgraph=True)`` sees one opaque op with a known
backward. Inside the ops the valid (non-ignored) rows are compacted once and handed to a backend
(the contract is :mod:`dpo_kernels.backend`); the per-sequence sums are the one reduction
:func:`dpo_kernels.backend.segment_sum`, the same for every backend.
"""

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Importing the three backend modules registers them (none builds or compiles anything here).
from . import cpu, reference, triton  # noqa: F401
from .backend import (
    BACKENDS,
    STAT_FIELDS,
    Grads,
    LogitOptions,
    Needs,
    TokenResult,
    compact,
    compute_dtype,
    get,
    resolve,
    scatter_rows,
    segment_sum,
    validate_data,
)

REDUCTIONS = ("sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class LogProbStats(NamedTuple):
    """What ``linear_logprobs(..., return_stats=True)`` returns.

    Per sequence (``(B,)`` / ``(S,)``), or per token (``(B, T)`` / ``(N,)``) for
    ``reduction="none"``. Sums run over the valid (non-ignored) tokens; only ``logps`` carries
    gradients. With ``z`` the logits and ``p = softmax(z)`` of one token:

    - ``logps``: as ``linear_logprobs`` returns without stats (float32; float64 for float64 input)
    - ``num_tokens``: number of valid tokens (int64)
    - ``logits_sum``: Σ of the vocab-mean logit ``mean_v z_v``
    - ``entropy_sum``: Σ of ``-Σ_v p_v log p_v``
    - ``top1_correct``: number of tokens whose target has the largest logit (int64)
    - ``log_sum_sq_probs_sum``: Σ of ``log Σ_v p_v²`` (what WPO weighting needs)

    The per-token fields of a backend (:class:`dpo_kernels.backend.TokenResult`) carry the same
    names.
    """

    logps: Tensor
    num_tokens: Tensor
    logits_sum: Tensor
    entropy_sum: Tensor
    top1_correct: Tensor
    log_sum_sq_probs_sum: Tensor


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # older torch, or no autocast for it
        pass
    return None


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast``, run in its dtype as ``F.linear`` would (fp32 master weights)."""
    if not isinstance(hidden, Tensor):
        return hidden, weight, bias
    amp = _autocast_dtype(hidden.device.type)
    if amp is None:
        return hidden, weight, bias
    low = (torch.float32, torch.float16, torch.bfloat16)

    def cast(t):
        return t.to(amp) if isinstance(t, Tensor) and t.dtype in low else t

    return cast(hidden), cast(weight), cast(bias)


# ----------------------------------------------------------------------------- inside the ops


FROZEN_PATHS = ("auto", "jacobian", "recompute")


def _frozen_path(chosen, hidden, weight, bias) -> bool:
    """True to take the frozen-head Jacobian path (see :mod:`dpo_kernels.triton.frozen_head`):
    only the hidden states need a gradient (LoRA / PEFT: the head is frozen), the backend has
    the path, and ``DPO_KERNELS_FROZEN_PATH`` (auto | jacobian | recompute) allows it. ``auto``
    takes it on a GPU from D = 1024 on (the modelled break-even is D ≈ 4·R/BW ≈ 725)."""
    mode = os.environ.get("DPO_KERNELS_FROZEN_PATH", "auto")
    if mode not in FROZEN_PATHS:
        raise ValueError(f"DPO_KERNELS_FROZEN_PATH must be one of {FROZEN_PATHS}, got {mode!r}")
    frozen = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )
    if not (frozen and chosen.jacobian) or mode == "recompute":
        return False
    return mode == "jacobian" or (hidden.is_cuda and hidden.shape[-1] >= 1024)


def _autotune_requested() -> bool:
    return os.environ.get("DPO_KERNELS_AUTOTUNE", "0") == "1"


def _check_overflow(tok: TokenResult, x) -> None:
    """A NaN or infinite maximum logit (or a NaN ``log_s``) from inputs that are all finite
    means a logit overflowed the compute dtype: raise rather than return NaN that log_softmax in
    float64 would not give. (A row whose logits are all -inf because a bias masks every lane is
    not finite input: it gives NaN log-probs, as log_softmax does.) Free on CPU tensors; on CUDA
    it costs a host sync, so it runs there only with ``DPO_KERNELS_VALIDATE=1``."""
    rows, m, log_s = x.rows, tok.max_logit, tok.log_s
    if x.count is not None:  # sync-free layout: entries past the count are not results
        n = int(x.count)
        m, log_s, rows = m[:n], log_s[:n], rows[:n]
    if m.numel() == 0 or not bool((~torch.isfinite(m) | torch.isnan(log_s)).any()):
        return
    rows = x.hidden.index_select(0, rows)
    if not (bool(torch.isfinite(rows).all()) and bool(torch.isfinite(x.weight).all())):
        return
    if x.bias is not None and not bool(torch.isfinite(x.bias).all()):
        return  # a -inf lane times a logit_scale <= 0 is +inf or NaN: not an overflow
    big = torch.finfo(compute_dtype(x.hidden.dtype)).max
    raise OverflowError(
        f"logits overflow the {compute_dtype(x.hidden.dtype)} range (|logit| > {big:.3g}) for "
        "finite inputs: scale hidden or weight down, lower logit_scale or raise the "
        "temperature, or use float64 inputs (backend='torch')"
    )


def _sync_free(backend: str, device: torch.device) -> bool:
    """No host sync for this call: the backend takes a device-side row count, and the call runs
    under CUDA-graph capture (``torch.compile(mode="reduce-overhead")`` included) or the user
    asked with ``DPO_KERNELS_SYNC_FREE=1``. Launches then cover all N rows (ignored ones exit at
    once in the fused kernels, but the backward's GEMMs do cost them)."""
    if not get(backend).sync_free:
        return False
    if os.environ.get("DPO_KERNELS_SYNC_FREE", "0") == "1":
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    cu_seqlens: Tensor,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: float,
    allow_tf32: bool,
    autotune: bool,
    reduction: str,
    backend: str,
    with_stats: bool,
    jacobian: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logps, norm, num_tokens, logits_sum, entropy_sum, top1_correct,
    log_sum_sq_probs_sum, jac)`` per sequence (per token for ``reduction="none"``; ``logps``
    the mean for ``"mean"``, the stats sums); ``norm (2, N)`` per token, the softmax normaliser
    the backward needs (:attr:`TokenResult.norm`, 0 at ignored rows); the stats are empty
    without ``with_stats``; ``jac (N, D)`` (``d logp_t / d h_t``, 0 at ignored rows) only with
    ``jacobian`` (the frozen-head path), else empty."""
    opts = LogitOptions.from_op_args(
        ignore_index, temperature, logit_scale, softcap, allow_tf32, autotune
    )
    n, acc, device = hidden.shape[0], compute_dtype(hidden.dtype), hidden.device
    per_token, mean = reduction == "none", reduction == "mean"
    sync_free = _sync_free(backend, device)
    x, seg, cu_ok = compact(
        hidden, weight, bias, labels, cu_seqlens, ignore_index, check=True, sync_free=sync_free
    )
    fields = ("logps",) + (STAT_FIELDS if with_stats else ())
    jac = hidden.new_empty(0, dtype=acc)
    if x.rows.shape[0] == 0:
        tok = TokenResult(*(torch.zeros(0, dtype=acc, device=device) for _ in TokenResult._fields))
        if jacobian:
            jac = torch.zeros((n, hidden.shape[1]), dtype=acc, device=device)
    else:
        # Autocast stays on inside a custom op: keep it off the backends' own fp32 math.
        with torch.autocast(device.type, enabled=False):
            if jacobian:
                tok, jac_c = get(backend).forward_jacobian(x, opts, with_stats)
                jac = torch.zeros((n, hidden.shape[1]), dtype=acc, device=device)
                jac.index_copy_(0, x.rows, jac_c.to(acc))
            else:
                tok = get(backend).forward(x, opts, with_stats)
        if device.type == "cpu" or validate_data():
            _check_overflow(tok, x)
    if per_token:
        vals = [scatter_rows(getattr(tok, f), x, n, acc) for f in fields]
        num_tokens = (labels != ignore_index).to(torch.int64)
    else:
        # The mean divides the float64 sum: the mean of values near the float limit is finite.
        vals = [segment_sum(getattr(tok, f).to(acc), seg, mean and f == "logps") for f in fields]
        num_tokens = seg[1:] - seg[:-1]
    if cu_ok is not None:
        vals = [torch.where(cu_ok, v, float("nan")) for v in vals]
    if with_stats:
        vals[3] = vals[3].round().to(torch.int64)  # top1_correct: a count
    else:
        vals += [
            hidden.new_empty(0, dtype=acc),
            hidden.new_empty(0, dtype=acc),
            hidden.new_empty(0, dtype=torch.int64),
            hidden.new_empty(0, dtype=acc),
        ]
    logps, *stats = vals
    norm = torch.stack([scatter_rows(t, x, n, acc) for t in (tok.max_logit, tok.log_s)])
    return (logps, norm, num_tokens, *stats, jac)


_fwd_op = torch.library.custom_op("dpo_kernels::linear_logprobs_fwd", _forward, mutates_args=())


@_fwd_op.register_fake
def _forward_fake(hidden, weight, bias, labels, cu_seqlens, *scalars):
    reduction, with_stats, jacobian = scalars[6], scalars[8], scalars[9]
    acc, n = compute_dtype(hidden.dtype), hidden.shape[0]
    m = n if reduction == "none" else cu_seqlens.shape[0] - 1
    k = m if with_stats else 0
    return (
        hidden.new_empty(m, dtype=acc),
        hidden.new_empty((2, n), dtype=acc),
        hidden.new_empty(m, dtype=torch.int64),
        hidden.new_empty(k, dtype=acc),
        hidden.new_empty(k, dtype=acc),
        hidden.new_empty(k, dtype=torch.int64),
        hidden.new_empty(k, dtype=acc),
        hidden.new_empty((n, hidden.shape[1]) if jacobian else (0,), dtype=acc),
    )


def _backward(
    grad: Tensor,
    norm: Tensor,
    jac: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    cu_seqlens: Tensor,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: float,
    allow_tf32: bool,
    autotune: bool,
    reduction: str,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ grad · logps`` w.r.t. hidden, weight, bias (empty where not needed);
    ``logps`` the per-sequence sums, also for ``reduction="mean"`` (the caller has divided
    ``grad`` by the counts)."""
    per_token = reduction == "none"
    if jac.numel() and not (need_weight or need_bias):
        return _jacobian_backward(grad, jac, hidden, labels, cu_seqlens, ignore_index, per_token)
    opts = LogitOptions.from_op_args(
        ignore_index, temperature, logit_scale, softcap, allow_tf32, autotune
    )
    # The forward checked these very tensors (saved for backward): no second pass over them.
    sync_free = _sync_free(backend, hidden.device)
    x, seg, _ = compact(
        hidden, weight, bias, labels, cu_seqlens, ignore_index, check=False, sync_free=sync_free
    )
    needs = Needs(need_hidden, need_weight, need_bias)
    n_valid = x.rows.shape[0]
    if n_valid == 0:
        grads = Grads(
            *(
                torch.zeros_like(t) if need else None
                for t, need in zip((hidden, weight, bias), needs)
            )
        )
    else:
        if per_token:
            grad_c = grad.index_select(0, x.rows)
        else:  # each valid token gets its sequence's gradient
            grad_c = _per_row(grad, seg, n_valid)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = get(backend).backward(x, norm.index_select(1, x.rows), grad_c, opts, needs)
    # Custom-op outputs may not alias: each unneeded gradient is its own empty tensor.
    return tuple(g if need else hidden.new_empty(0) for g, need in zip(grads, needs))


def _per_row(grad: Tensor, offsets: Tensor, n: int) -> Tensor:
    """``grad (S,)`` per sequence -> ``(n,)`` per row, row ``i`` in ``[offsets[s], offsets[s+1])``
    getting ``grad[s]`` (rows past the last offset get the last sequence's, and are masked)."""
    seq_of = torch.searchsorted(offsets[1:], torch.arange(n, device=grad.device), right=True)
    return grad.index_select(0, seq_of.clamp_(max=max(offsets.shape[0] - 2, 0)))


def _jacobian_backward(grad, jac, hidden, labels, cu_seqlens, ignore_index, per_token):
    """The frozen-head backward: ``dH = grad · J``, a scale (no recompute, no GEMM)."""
    if per_token:
        grad_rows = grad
    else:  # each row gets its sequence's gradient (J is 0 on ignored rows)
        cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
        grad_rows = _per_row(grad, cu, hidden.shape[0])
    grad_rows = torch.where(labels != ignore_index, grad_rows.to(jac.dtype), 0.0)
    d_hidden = (jac * grad_rows[:, None]).to(hidden.dtype)
    return d_hidden, hidden.new_empty(0), hidden.new_empty(0)


_bwd_op = torch.library.custom_op("dpo_kernels::linear_logprobs_bwd", _backward, mutates_args=())


@_bwd_op.register_fake
def _backward_fake(grad, norm, jac, hidden, weight, bias, *rest):
    needs = rest[-3:]
    return tuple(
        torch.empty_like(t) if need else hidden.new_empty(0)
        for t, need in zip((hidden, weight, bias), needs)
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, cu_seqlens, *scalars = inputs
    norm, num_tokens, jac = output[1], output[2], output[7]
    ctx.save_for_backward(hidden, weight, bias, labels, cu_seqlens, norm, num_tokens, jac)
    ctx.scalars = scalars[:-2]  # all but with_stats and jacobian: the backward sees jac itself
    ctx.mean = scalars[6] == "mean"
    ctx.n_inputs = len(inputs)


def _autograd_backward(ctx, grad_logps, *_grad_stats):
    hidden, weight, bias, labels, cu_seqlens, norm, num_tokens, jac = ctx.saved_tensors
    needs = (*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and bias is not None)
    if ctx.mean:  # d mean / d sum
        grad_logps = grad_logps / num_tokens.clamp(min=1)
    grads = _bwd_op(
        grad_logps, norm, jac, hidden, weight, bias, labels, cu_seqlens, *ctx.scalars, *needs
    )
    # Only hidden, weight and bias are differentiable; the rest of the inputs get None.
    return (
        *(g if need else None for g, need in zip(grads, needs)),
        *(None,) * (ctx.n_inputs - len(needs)),
    )


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _check_whole(name: str, t: Optional[Tensor]) -> None:
    """Refuses a head that a sharding engine holds in pieces outside its forward: used as it is,
    each rank would get a gradient of its own piece only, silently wrong after reduction."""
    if t is None:
        return
    if type(t).__name__ == "DTensor":
        raise TypeError(
            f"{name} is a DTensor (a shard held by FSDP2 or tensor parallelism): call the fused op "
            "inside the forward of the module that FSDP2 wraps with the head, where it is whole "
            "(dpo_kernels.integrations.transformers.sequence_logprobs does this), pass "
            "vocab_parallel_group= for a vocabulary-sharded head, or pass "
            f"{name}.full_tensor() yourself if no engine manages it"
        )
    status = getattr(t, "ds_status", None)
    if status is not None and getattr(status, "name", "") != "AVAILABLE":
        raise TypeError(
            f"{name} is a DeepSpeed ZeRO-3 partition that is not gathered here: call the fused op "
            "inside the head module's forward, or register it with "
            "deepspeed.zero.register_external_parameter(module, param) on the module whose "
            "forward calls it, so ZeRO-3 gathers it for that forward and its backward"
        )


def _check_args(
    hidden,
    weight,
    labels,
    bias,
    cu_seqlens,
    reduction,
    temperature,
    logit_scale,
    softcap,
    ignore_index,
    backend,
):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_whole(name, t)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype} (cast one of them)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 token ids), got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if vocab == 0:
        raise ValueError("weight must have at least one row (vocab size V >= 1)")
    if dim == 0:
        raise ValueError("weight must have at least one column (hidden size D >= 1)")
    if hidden.dim() == 0 or hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension must equal weight's D={dim}: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if cu_seqlens is None:
        if hidden.dim() not in (2, 3):
            raise ValueError(
                f"hidden must be (B, T, D), or (N, D) for one packed sequence; "
                f"got shape {tuple(hidden.shape)}"
            )
    else:
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if hidden.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, hidden must be packed (N, D), got shape {tuple(hidden.shape)}"
            )
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(
                f"cu_seqlens must be 1-D (S+1,) offsets, got shape {tuple(cu_seqlens.shape)}"
            )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (labels[t] is the target of hidden[t])"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(logit_scale, (int, float)) and abs(logit_scale) < float("inf")):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    cu_seqlens: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    return_stats: bool = False,
    backend: str = "auto",
    vocab_parallel_group=None,
    sequence_parallel_group=None,
):
    """Log-probs of ``labels`` under the head ``weight``, never materialising the logits.

    Shapes: ``hidden (B, T, D)`` with ``labels (B, T)`` → ``(B,)``; or packed
    ``hidden (N, D)`` with ``labels (N,)`` and ``cu_seqlens (S+1,)`` → ``(S,)`` (without
    ``cu_seqlens``, ``(N, D)`` is one sequence → ``(1,)``). ``weight (V, D)``, ``bias (V,)``.
    ``labels`` are already aligned: ``hidden[t]`` predicts ``labels[t]``; ``ignore_index``
    tokens are skipped (they cost no matmul).

        z = softcap·tanh(logit_scale·(h·Wᵀ + b) / softcap) / temperature   (softcap optional)
        logps[s] = Σ_{t in s, valid} (z_t[labels_t] − logsumexp(z_t))

    ``reduction``: ``"sum"`` (above), ``"mean"`` (over the valid tokens; 0 for a sequence with
    none) or ``"none"`` (per token, shaped like ``labels``, 0 at ignored positions). Output is
    float32 (float64 for float64 inputs); differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    ``return_stats=True`` returns a :class:`LogProbStats` from the same pass. ``backend``:
    ``"auto"`` (Triton on CUDA, else the CPU backend), ``"triton"``, ``"cpp"`` or ``"torch"``.
    Under ``torch.autocast`` the inputs are cast to its dtype first, as ``F.linear`` does.

    ``vocab_parallel_group`` (a ``torch.distributed`` process group): ``weight``/``bias`` are
    this rank's contiguous shard of the vocabulary (shards in rank order, sizes may differ),
    every rank passes the same ``hidden`` and ``labels`` (global ids) and gets the full result;
    the gradient w.r.t. ``hidden`` is the full one on every rank (already summed over the
    group), w.r.t. ``weight``/``bias`` the local shard's. ``sequence_parallel_group``: each
    rank holds a slice of every sequence's tokens; the per-sequence sums (and the ``"mean"``)
    are over all of them (see :mod:`dpo_kernels.distributed`).
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_args(
        hidden,
        weight,
        labels,
        bias,
        cu_seqlens,
        reduction,
        temperature,
        logit_scale,
        softcap,
        ignore_index,
        backend,
    )
    dim = weight.shape[1]
    if cu_seqlens is None and hidden.dim() == 3:
        n_seq, seq_len = hidden.shape[0], hidden.shape[1]
        cu_seqlens = torch.arange(n_seq + 1, device=hidden.device, dtype=torch.int64) * seq_len
    elif cu_seqlens is None:
        cu_seqlens = torch.tensor([0, hidden.shape[0]], device=hidden.device, dtype=torch.int64)
    hidden_2d = hidden.reshape(-1, dim)
    labels_1d = labels.reshape(-1).to(torch.int64)
    per_token = reduction == "none"
    # The mean of a sequence sharded over ranks divides the all-reduced sum (below); else the op
    # divides each float64 sum before rounding it.
    split_mean = sequence_parallel_group is not None and reduction == "mean"
    op_reduction = "sum" if split_mean else reduction
    opts = LogitOptions(
        ignore_index,
        float(temperature),
        float(logit_scale),
        None if softcap is None else float(softcap),
        # Read once here and saved with the call: the backward recomputes the forward's logits
        # with the forward's precision and tiles even if these change in between.
        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        autotune=_autotune_requested(),
    )
    chosen = resolve(backend, hidden.device, hidden.dtype)
    if vocab_parallel_group is not None:
        from .distributed import vocab_parallel_forward

        outs = vocab_parallel_forward(
            hidden_2d,
            weight,
            bias,
            labels_1d,
            cu_seqlens,
            vocab_parallel_group,
            opts,
            chosen,
            op_reduction,
            bool(return_stats),
        )
        logps, num_tokens, logits_sum, entropy_sum, top1, lss = outs
    else:
        jacobian = _frozen_path(chosen, hidden, weight, bias)
        outs = _fwd_op(
            hidden_2d,
            weight,
            bias,
            labels_1d,
            cu_seqlens,
            *opts.op_args(),
            op_reduction,
            chosen.name,
            bool(return_stats),
            jacobian,
        )
        logps, _norm, num_tokens, logits_sum, entropy_sum, top1, lss, _jac = outs
    if sequence_parallel_group is not None and not per_token:
        from .distributed import sequence_parallel_sum

        logps = sequence_parallel_sum(logps, sequence_parallel_group)
        num_tokens = sequence_parallel_sum(num_tokens, sequence_parallel_group)
        if return_stats:
            logits_sum, entropy_sum, top1, lss = (
                sequence_parallel_sum(t, sequence_parallel_group)
                for t in (logits_sum, entropy_sum, top1, lss)
            )
    if split_mean:
        logps = logps / num_tokens.clamp(min=1)
    if per_token:
        shape = labels.shape
        logps, num_tokens = logps.view(shape), num_tokens.view(shape)
        if return_stats:
            logits_sum, entropy_sum = logits_sum.view(shape), entropy_sum.view(shape)
            top1, lss = top1.view(shape), lss.view(shape)
    if not return_stats:
        return logps
    return LogProbStats(
        logps, num_tokens, logits_sum.detach(), entropy_sum.detach(), top1, lss.detach()
    )
