"""``linear_logprobs``: per-sequence log-probs of target tokens under a linear LM head.

Validation and layout handling happen here, in plain (traceable) torch; the work is two
``torch.library`` custom ops, ``dpo_kernels::linear_logprobs_fwd`` and ``..._bwd``, tied by
``register_autograd`` so ``torch.compile(fullgraph=True)`` sees one opaque op with a known
backward. Inside the ops, the valid (non-ignored) rows are compacted once and handed to a
backend (:mod:`dpo_kernels.reference` documents the backend interface).
"""

import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import cpu, reference
from .reference import LogitOptions, compute_dtype

REDUCTIONS = ("sum", "mean", "none")
BACKENDS = ("auto", "triton", "cpp", "torch")
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
    """

    logps: Tensor
    num_tokens: Tensor
    logits_sum: Tensor
    entropy_sum: Tensor
    top1_correct: Tensor
    log_sum_sq_probs_sum: Tensor


# ----------------------------------------------------------------------------- backends

_warned_fallback = False


def _triton_unusable_reason(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "backend='triton' needs the triton package, which is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (
        f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
        f"got tensors on {device.type!r}"
    )


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    global _warned_fallback
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"  # float64 is for checking and debugging: the exact reference serves it
        if device.type == "cuda":
            reason = _triton_unusable_reason(device)
            if reason is None:
                return "triton"
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    f"dpo_kernels: falling back to the torch reference backend ({reason})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        elif device.type == "cpu":
            reason = cpu.unavailable_reason()
            if reason is None:
                return "cpp"
            if not _warned_fallback and os.environ.get("DPO_KERNELS_NO_CPP", "0") != "1":
                _warned_fallback = True
                warnings.warn(
                    f"dpo_kernels: falling back to the torch reference backend on CPU ({reason})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return "torch"
    if backend == "triton":
        reason = _triton_unusable_reason(device)
        if reason is not None:
            raise RuntimeError(reason)
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32, bfloat16 or float16; float64 runs "
                            "on backend='torch' (or 'auto')")
    elif backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; got tensors on {device.type!r}")
        if dtype == torch.float64:
            raise TypeError("backend='cpp' takes float32, bfloat16 or float16; float64 runs "
                            "on backend='torch' (or 'auto')")
        cpu.load()
    return backend


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


def _backend_module(name: str):
    if name == "triton":
        from . import triton as module  # lazy: Triton picks compile vs interpret at import

        return module
    if name == "cpp":
        return cpu.load()
    return reference


# ----------------------------------------------------------------------------- op bodies


def _validate_data() -> bool:
    return os.environ.get("DPO_KERNELS_VALIDATE", "0") == "1"


def _check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocab size of weight) or equal "
            f"ignore_index={ignore_index}; found {int(labels[pos])} at flat position {pos}"
        )


def _check_cu_seqlens(cu_seqlens: Tensor, n: int) -> None:
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if cu_seqlens.shape[0] > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    if int(cu_seqlens[-1]) != n:
        raise ValueError(
            f"cu_seqlens must end at the number of rows N={n} of hidden, got {int(cu_seqlens[-1])}"
        )


def _options(ignore_index, temperature, logit_scale, softcap) -> LogitOptions:
    # The op schema carries "no softcap" as 0.0 (validated positive otherwise).
    return LogitOptions(ignore_index, temperature, logit_scale, softcap if softcap > 0 else None)


def _prepare(hidden, weight, labels, cu_seqlens, ignore_index, check):
    """Checks data where that is free (if ``check``), compacts the valid rows, maps sequences.

    Returns ``(rows, seg, cu_ok)``: valid row indices, per-sequence offsets into ``rows``, and a
    device-side flag (or None) that is False when ``cu_seqlens`` was malformed but unchecked.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    validate = _validate_data()
    if check and (labels.device.type == "cpu" or validate):
        _check_labels(labels, vocab, ignore_index)
    cu_checked = cu_seqlens.device.type == "cpu" or validate
    if check and cu_checked:
        _check_cu_seqlens(cu_seqlens, n)
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
    valid = labels != ignore_index
    # The device->host sync of each pass: the number of valid rows sizes every launch.
    rows = valid.nonzero().squeeze(1)
    prefix = torch.zeros(n + 1, dtype=torch.int64, device=hidden.device)
    torch.cumsum(valid, 0, out=prefix[1:])
    seg = prefix[cu.clamp(0, n)]
    cu_ok = None
    if not cu_checked:
        # No sync on CUDA: a malformed cu_seqlens turns the outputs into NaN instead.
        cu_ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
    return rows, seg, cu_ok


def _scatter_rows(values: Tensor, rows: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(n, dtype=dtype, device=values.device)
    return out.index_copy_(0, rows, values.to(dtype))


def _forward_impl(
    hidden, weight, bias, labels, cu_seqlens,
    ignore_index, temperature, logit_scale, softcap, per_token, with_stats, backend,
):
    opts = _options(ignore_index, temperature, logit_scale, softcap)
    n, n_seq = hidden.shape[0], cu_seqlens.shape[0] - 1
    acc = compute_dtype(hidden.dtype)
    device = hidden.device
    rows, seg, cu_ok = _prepare(hidden, weight, labels, cu_seqlens, ignore_index, check=True)
    bias = None if bias is None else bias.contiguous()  # kernels index bias densely
    keys = ("logp",) + (reference.STAT_KEYS if with_stats else ())
    if rows.shape[0] == 0:
        tok = {k: torch.zeros(0, dtype=acc, device=device) for k in keys + ("lse",)}
        seq = {k: torch.zeros(n_seq, dtype=acc, device=device) for k in keys}
    else:
        # Autocast stays on inside a custom op: keep it off the backends' own fp32 math.
        with torch.autocast(device.type, enabled=False):
            tok, seq = _backend_module(backend).forward(
                hidden, weight, bias, labels.index_select(0, rows), rows, seg, opts, with_stats
            )
    lse = _scatter_rows(tok["lse"], rows, n, acc)
    if per_token:
        vals = {k: _scatter_rows(tok[k], rows, n, acc) for k in keys}
        num_tokens = (labels != ignore_index).to(torch.int64)
    else:
        # Copy S values: backends may return views of one buffer; op outputs must not alias.
        vals = {k: seq[k].to(acc, copy=True) for k in keys}
        num_tokens = seg[1:] - seg[:-1]
    if cu_ok is not None:
        vals = {k: torch.where(cu_ok, v, torch.full_like(v, float("nan"))) for k, v in vals.items()}
    if with_stats:
        stats = [vals["logits_mean"], vals["entropy"], vals["top1"].round().to(torch.int64),
                 vals["log_sum_sq_probs"]]
    else:
        stats = [hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc),
                 hidden.new_empty(0, dtype=torch.int64), hidden.new_empty(0, dtype=acc)]
    return (vals["logp"], lse, num_tokens, *stats)


def _backward_impl(
    grad, hidden, weight, bias, labels, cu_seqlens, lse,
    ignore_index, temperature, logit_scale, softcap, per_token, backend,
    need_hidden, need_weight, need_bias,
):
    opts = _options(ignore_index, temperature, logit_scale, softcap)
    # The forward checked these very tensors (saved for backward): no second pass over them.
    rows, seg, _ = _prepare(hidden, weight, labels, cu_seqlens, ignore_index, check=False)
    bias = None if bias is None else bias.contiguous()
    n_valid = rows.shape[0]
    needs = (need_hidden, need_weight, need_bias)
    if n_valid == 0:
        d_hidden = torch.zeros_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(weight) if need_weight else None
        d_bias = torch.zeros_like(bias) if need_bias else None
    else:
        if per_token:
            grad_c = grad.index_select(0, rows)
        else:
            token_pos = torch.arange(n_valid, device=hidden.device)
            seq_of = torch.searchsorted(seg[1:], token_pos, right=True)
            grad_c = grad.index_select(0, seq_of.clamp_(max=seg.shape[0] - 2))
        with torch.autocast(hidden.device.type, enabled=False):
            d_hidden, d_weight, d_bias = _backend_module(backend).backward(
                hidden, weight, bias, labels.index_select(0, rows), rows,
                lse.index_select(0, rows), grad_c, opts, needs,
            )
    # Custom-op outputs may not alias: each unneeded gradient is its own empty tensor.
    return (
        d_hidden if need_hidden else hidden.new_empty(0),
        d_weight if need_weight else hidden.new_empty(0),
        d_bias if need_bias else hidden.new_empty(0),
    )


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("dpo_kernels::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, cu_seqlens: Tensor,
    ignore_index: int, temperature: float, logit_scale: float, softcap: float,
    per_token: bool, with_stats: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(
        hidden, weight, bias, labels, cu_seqlens,
        ignore_index, temperature, logit_scale, softcap, per_token, with_stats, backend,
    )


@_fwd_op.register_fake
def _fwd_fake(
    hidden, weight, bias, labels, cu_seqlens,
    ignore_index, temperature, logit_scale, softcap, per_token, with_stats, backend,
):
    acc = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    m = n if per_token else cu_seqlens.shape[0] - 1
    k = m if with_stats else 0
    return (
        hidden.new_empty(m, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(m, dtype=torch.int64),
        hidden.new_empty(k, dtype=acc),
        hidden.new_empty(k, dtype=acc),
        hidden.new_empty(k, dtype=torch.int64),
        hidden.new_empty(k, dtype=acc),
    )


@torch.library.custom_op("dpo_kernels::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    cu_seqlens: Tensor, lse: Tensor,
    ignore_index: int, temperature: float, logit_scale: float, softcap: float,
    per_token: bool, backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(
        grad, hidden, weight, bias, labels, cu_seqlens, lse,
        ignore_index, temperature, logit_scale, softcap, per_token, backend,
        need_hidden, need_weight, need_bias,
    )


@_bwd_op.register_fake
def _bwd_fake(
    grad, hidden, weight, bias, labels, cu_seqlens, lse,
    ignore_index, temperature, logit_scale, softcap, per_token, backend,
    need_hidden, need_weight, need_bias,
):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, cu_seqlens, *scalars = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, cu_seqlens, output[1])
    ignore_index, temperature, logit_scale, softcap, per_token, _with_stats, backend = scalars
    ctx.scalars = (ignore_index, temperature, logit_scale, softcap, per_token, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logps, *_grad_stats):
    hidden, weight, bias, labels, cu_seqlens, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    d_hidden, d_weight, d_bias = _bwd_op(
        grad_logps, hidden, weight, bias, labels, cu_seqlens, lse,
        *ctx.scalars, need_h, need_w, need_b,
    )
    return (
        d_hidden if need_h else None,
        d_weight if need_w else None,
        d_bias if need_b else None,
    ) + (None,) * 9


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

#: The Python bodies behind the custom ops (tests use them to look inside the ops).
OP_BODIES = {_fwd_op._opoverload: _forward_impl, _bwd_op._opoverload: _backward_impl}


# ----------------------------------------------------------------------------- public API


def _check_args(hidden, weight, labels, bias, cu_seqlens, reduction, temperature,
                logit_scale, softcap, ignore_index, backend):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}"
        )
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
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
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_args(hidden, weight, labels, bias, cu_seqlens, reduction, temperature,
                logit_scale, softcap, ignore_index, backend)
    dim = weight.shape[1]
    if cu_seqlens is None and hidden.dim() == 3:
        n_seq, seq_len = hidden.shape[0], hidden.shape[1]
        cu_seqlens = torch.arange(n_seq + 1, device=hidden.device, dtype=torch.int64) * seq_len
    elif cu_seqlens is None:
        cu_seqlens = torch.tensor([0, hidden.shape[0]], device=hidden.device, dtype=torch.int64)
    hidden_2d = hidden.reshape(-1, dim)
    labels_1d = labels.reshape(-1).to(torch.int64)
    per_token = reduction == "none"
    outs = _fwd_op(
        hidden_2d, weight, bias, labels_1d, cu_seqlens,
        int(ignore_index), float(temperature), float(logit_scale),
        float(softcap) if softcap is not None else 0.0,
        per_token, bool(return_stats), _resolve_backend(backend, hidden.device, hidden.dtype),
    )
    logps, _lse, num_tokens, logits_sum, entropy_sum, top1, lss = outs
    if reduction == "mean":
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
