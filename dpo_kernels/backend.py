"""The contract every backend of :func:`dpo_kernels.linear_logprobs` implements.

A backend computes, for the *compacted* valid rows of one call (prompt and padding rows are
dropped before it is called), per-token log-probs and statistics (:meth:`Backend.forward`) and the
gradients of ``Σ_i grad_i · logp_i`` (:meth:`Backend.backward`). Everything around that — argument
checks, compaction, the one per-sequence reduction (:func:`segment_sum`), scattering per-token
values back, autograd — lives in :mod:`dpo_kernels.logprobs` and is the same for every backend.

The backends: ``"torch"`` (:mod:`dpo_kernels.reference`, the oracle and last-resort fallback),
``"cpp"`` (:mod:`dpo_kernels.cpu`, the C++ CPU extension) and ``"triton"``
(:mod:`dpo_kernels.triton`, CUDA, or CPU tensors under ``TRITON_INTERPRET=1``). Each module
makes its backend object ``BACKEND = register(...)`` when imported (``dpo_kernels`` imports all
three; none of them imports a compiler or kernel at that point), so this module imports none of
them; :func:`resolve` picks one for ``backend="auto"``, and :func:`available` says which can run
here, and why not.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_MB",
    "STAT_FIELDS",
    "Backend",
    "BackendUnavailable",
    "Grads",
    "LogitOptions",
    "Needs",
    "Rows",
    "TokenResult",
    "available",
    "check_cu_seqlens",
    "check_labels",
    "chunk_budget_bytes",
    "compact",
    "compute_dtype",
    "get",
    "register",
    "resolve",
    "scatter_rows",
    "segment_sum",
    "sequence_offsets",
    "validate_data",
]

#: Backend names ``linear_logprobs(backend=...)`` accepts, besides ``"auto"``.
BACKENDS = ("triton", "cpp", "torch")
_REGISTRY: dict[str, Backend] = {}

#: Default memory budget for one chunk of ``[tokens × vocab]`` work (logits or logit gradients).
DEFAULT_CHUNK_MB = 256.0


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def chunk_budget_bytes() -> int:
    """Bytes one chunk of ``[tokens × vocab]`` work may take: ``DPO_KERNELS_CHUNK_MB`` MiB."""
    raw = os.environ.get("DPO_KERNELS_CHUNK_MB")
    if raw is None:
        return int(DEFAULT_CHUNK_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"DPO_KERNELS_CHUNK_MB must be a number of MiB, got {raw!r}") from None
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"DPO_KERNELS_CHUNK_MB must be positive and finite, got {raw!r}")
    return max(1, int(mb * 2**20))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 inputs stay float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- the data


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
    #: fp32 matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32`` when the call was
    #: made); saved with the call, so the backward recomputes with the forward's precision.
    allow_tf32: bool = False
    #: tune the Triton tiles for this shape (``DPO_KERNELS_AUTOTUNE=1`` when the call was made).
    autotune: bool = False

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def pre_scale(self) -> float:
        if self.softcap is None:
            return self.logit_scale / self.temperature
        return self.logit_scale / self.softcap

    @property
    def post_scale(self) -> float:
        return 1.0 if self.softcap is None else self.softcap / self.temperature

    def op_args(self) -> tuple[int, float, float, float, bool, bool]:
        """The options as the custom ops' scalar arguments (no softcap travels as 0.0)."""
        return (
            self.ignore_index,
            self.temperature,
            self.logit_scale,
            self.softcap or 0.0,
            self.allow_tf32,
            self.autotune,
        )

    @classmethod
    def from_op_args(
        cls,
        ignore_index: int,
        temperature: float,
        logit_scale: float,
        softcap: float,
        allow_tf32: bool,
        autotune: bool,
    ) -> LogitOptions:
        cap = softcap if softcap > 0 else None
        return cls(ignore_index, temperature, logit_scale, cap, allow_tf32, autotune)

    def transform(self, x: Tensor) -> Tensor:
        """Raw logits ``x`` -> the logits ``z`` the log-softmax is taken over."""
        if self.softcap is None:
            return x * self.pre_scale
        return torch.tanh(x * self.pre_scale) * self.post_scale

    def transform_grad(self, z: Tensor) -> Tensor:
        """``dz/dx`` written in terms of ``z`` (for softcap ``tanh = z / post_scale``)."""
        if self.softcap is None:
            return torch.full_like(z, self.pre_scale)
        t = z / self.post_scale
        return (1.0 - t * t) * (self.pre_scale * self.post_scale)


class Rows(NamedTuple):
    """The valid rows of one call: what every backend method receives.

    ``hidden (N, D)`` all rows (ignored ones included: backends read only ``rows``),
    ``weight (V, D)`` contiguous, ``bias (V,)`` contiguous or None, ``rows (Nv,)`` int64 indices of
    the valid rows of ``hidden`` in increasing order, ``labels (Nv,)`` int64 their targets.

    ``count``: None, or a ``(1,)`` int64 device tensor holding the number of valid rows. Only a
    backend with :attr:`Backend.sync_free` gets the sync-free layout, where ``rows`` and
    ``labels`` are ``(N,)``, the valid rows first (in increasing order) and ``count`` says how
    many there are, so no host ever reads the count; results past ``count`` are ignored.
    """

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    rows: Tensor
    labels: Tensor
    count: Optional[Tensor] = None


#: The statistics a forward computes with ``with_stats=True``: the names of
#: :class:`dpo_kernels.LogProbStats`, per token here and per sequence there.
STAT_FIELDS = ("logits_sum", "entropy_sum", "top1_correct", "log_sum_sq_probs_sum")


class TokenResult(NamedTuple):
    """Per-token forward results on the compacted rows, each ``(Nv,)`` in the compute dtype.

    With ``z`` a token's logits and ``p = softmax(z)``: ``max_logit = m = max_v z_v`` and
    ``log_s = log Σ_v exp(z_v − m)``, so ``logsumexp(z) = m + log_s``, kept apart: the softmax
    normaliser the backward needs (:attr:`norm`). One rounded ``lse`` would carry an error of
    ``u·|lse|`` into every ``p = exp(z − lse)`` (at ``|z| ≥ 1e8`` in float32 the whole ``log k``
    of k tied top logits); ``(z − m) − log_s`` is as accurate as ``log_softmax``.
    ``logps = (z[label] − m) − log_s`` (NaN for a label outside ``[0, V)``, never a plausible
    number); with stats, ``logits_sum = mean_v z_v``, ``entropy_sum = −Σ_v p_v log p_v``,
    ``top1_correct`` 1.0 if the label has the largest logit else 0.0 and
    ``log_sum_sq_probs_sum = log Σ_v p_v²``; None without stats. Those names are the fields of
    :class:`dpo_kernels.LogProbStats`, whose per-sequence values are their sums; ``max_logit``
    also lets a vocabulary-parallel call (:mod:`dpo_kernels.distributed`) merge the shards and
    decide ``top1_correct`` across them. A row of NaN (or +inf) logits has ``max_logit`` NaN
    (or +inf); a row of -inf logits ``max_logit = log_s = -inf``.
    """

    logps: Tensor
    max_logit: Tensor
    log_s: Tensor
    logits_sum: Optional[Tensor] = None
    entropy_sum: Optional[Tensor] = None
    top1_correct: Optional[Tensor] = None
    log_sum_sq_probs_sum: Optional[Tensor] = None

    @property
    def norm(self) -> Tensor:
        """``(2, Nv)``: ``max_logit`` and ``log_s``, what :meth:`Backend.backward` takes."""
        return torch.stack((self.max_logit, self.log_s))


class Needs(NamedTuple):
    """Which gradients a backward must compute."""

    hidden: bool
    weight: bool
    bias: bool


class Grads(NamedTuple):
    """Gradients in the input dtype: ``hidden (N, D)`` (zero on ignored rows), ``weight (V, D)``,
    ``bias (V,)``; None where not needed."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


# ----------------------------------------------------------------------------- the contract


class Backend(abc.ABC):
    """One implementation of the fused linear log-prob op on compacted rows.

    Subclasses set :attr:`name` and implement the three methods. ``forward`` and ``backward`` are
    only called with ``Nv >= 1`` valid rows, inputs of a dtype the backend accepts (see
    :meth:`unavailable_reason`), and autocast off.
    """

    name: str
    #: Takes the sync-free :class:`Rows` layout (``count`` on the device, all N rows).
    sync_free: bool = False
    #: Implements :meth:`forward_jacobian` (the frozen-head 4·N·D·V path).
    jacobian: bool = False
    #: Implements :meth:`forward_kept` and :meth:`backward_kept` (the loss-level path of
    #: :mod:`dpo_kernels.loss_path`: logits kept from the forward, no recompute).
    keeps_logits: bool = False

    @abc.abstractmethod
    def unavailable_reason(
        self, device: torch.device, dtype: Optional[torch.dtype] = None
    ) -> Optional[str]:
        """None if this backend runs on ``device`` tensors of ``dtype`` here, else why not."""

    @abc.abstractmethod
    def forward(self, x: Rows, opts: LogitOptions, with_stats: bool) -> TokenResult:
        """Per-token results of the valid rows (statistics only if ``with_stats``)."""

    @abc.abstractmethod
    def backward(
        self, x: Rows, norm: Tensor, grad: Tensor, opts: LogitOptions, needs: Needs
    ) -> Grads:
        """Gradients of ``Σ_i grad[i] · logp_i``; ``norm (2, Nv)`` is the forward's
        :attr:`TokenResult.norm` (``m``, ``log_s``), ``grad (Nv,)`` the upstream gradient of
        each valid token's log-prob; ``p = exp((z − m) − log_s)`` in that order. Must recompute
        bit-identical logits to the forward's. A label outside ``[0, V)`` contributes no
        one-hot term (its row's logit gradient is ``−grad · softmax``): a vocabulary-parallel
        call passes such a label for rows whose target lives on another shard, with the global
        ``norm``."""

    def forward_jacobian(self, x: Rows, opts: LogitOptions, with_stats: bool):
        """Frozen head: :meth:`forward`'s results and ``J (Nv, D)`` in the compute dtype, the
        gradient of each valid token's log-prob w.r.t. its hidden row, so the backward is
        ``dH = grad · J``."""
        raise NotImplementedError(f"backend {self.name!r} has no frozen-head Jacobian path")

    def forward_kept(self, x: Rows, opts: LogitOptions, with_stats: bool):
        """:meth:`forward`'s results and ``z (Nv, V)``, the valid rows' logits (after the logit
        transform) in the compute dtype, contiguous, for :meth:`backward_kept`. The caller sizes
        the call so ``z`` fits its memory budget."""
        raise NotImplementedError(f"backend {self.name!r} does not keep logits")

    def backward_kept(
        self, x: Rows, kept: Tensor, norm: Tensor, grad: Tensor, opts: LogitOptions, needs: Needs
    ) -> Grads:
        """:meth:`backward` from :meth:`forward_kept`'s logits instead of a recompute (4·N·D·V
        instead of 6). ``kept`` is the call's scratch: it is overwritten."""
        raise NotImplementedError(f"backend {self.name!r} does not keep logits")


def register(backend: Backend) -> Backend:
    """Adds ``backend`` to the table under its name (each backend module calls it once)."""
    if backend.name not in BACKENDS:
        raise ValueError(f"unknown backend name {backend.name!r}; add it to BACKENDS")
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend object called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return _REGISTRY[name]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available(
    device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> dict[str, Optional[str]]:
    """For each backend name, None if it can run on ``device`` (default: CUDA if present, else
    the CPU) tensors of ``dtype`` here, else the reason it cannot. May build the C++ backend."""
    device = _default_device() if device is None else torch.device(device)
    return {name: get(name).unavailable_reason(device, dtype) for name in BACKENDS}


_warned_fallback = False


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs a call: ``backend`` itself (raising :class:`BackendUnavailable`, or
    ``TypeError`` for a dtype it does not take, with the reason), or for ``"auto"``: torch for
    float64, else Triton on CUDA and the C++ backend on the CPU, falling back to torch with one
    warning (none when ``DPO_KERNELS_NO_CPP=1`` turned the C++ backend off on purpose)."""
    global _warned_fallback
    if backend != "auto":
        chosen = get(backend)
        reason = chosen.unavailable_reason(device, dtype)
        if reason is not None:
            if dtype == torch.float64 and chosen.unavailable_reason(device) is None:
                raise TypeError(reason)
            raise BackendUnavailable(reason)
        return chosen
    if dtype == torch.float64:
        return get("torch")  # float64 is for checking and debugging: the exact reference serves it
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred is not None:
        reason = get(preferred).unavailable_reason(device, dtype)
        if reason is None:
            return get(preferred)
        quiet = preferred == "cpp" and os.environ.get("DPO_KERNELS_NO_CPP", "0") == "1"
        if not (_warned_fallback or quiet):
            _warned_fallback = True
            where = " on CPU" if device.type == "cpu" else ""
            warnings.warn(
                f"dpo_kernels: falling back to the torch reference backend{where} ({reason})",
                RuntimeWarning,
                stacklevel=3,
            )
    return get("torch")


# ----------------------------------------------------------------------------- the rows


def validate_data() -> bool:
    return os.environ.get("DPO_KERNELS_VALIDATE", "0") == "1"


def check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocab size of weight) or equal "
            f"ignore_index={ignore_index}; found {int(labels[pos])} at flat position {pos}"
        )


def check_cu_seqlens(cu_seqlens: Tensor, n: int) -> None:
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if cu_seqlens.shape[0] > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    if int(cu_seqlens[-1]) != n:
        raise ValueError(
            f"cu_seqlens must end at the number of rows N={n} of hidden, got {int(cu_seqlens[-1])}"
        )


def sequence_offsets(labels: Tensor, ignore_index: int, cu_seqlens: Tensor):
    """``(valid, prefix, seg)`` of ``labels (N,)``: which rows are scored, the running count of
    scored rows ``(N + 1,)``, and each sequence's offsets into the scored rows ``(S + 1,)``
    (sequence ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s + 1]``)."""
    n = labels.shape[0]
    cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
    valid = labels != ignore_index
    prefix = torch.zeros(n + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(valid, 0, out=prefix[1:])
    return valid, prefix, prefix[cu.clamp(0, n)]


def compact(hidden, weight, bias, labels, cu_seqlens, ignore_index, check, sync_free=False):
    """Checks data where that is free (if ``check``), compacts the valid rows, maps sequences.

    Returns ``(x, seg, cu_ok)``: the backends' :class:`~dpo_kernels.backend.Rows`, each
    sequence's offsets into the compacted rows ``(S+1,)``, and a device-side flag (or None) that
    is False when ``cu_seqlens`` was malformed but unchecked.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    validate = validate_data()
    if check and (labels.device.type == "cpu" or validate):
        check_labels(labels, vocab, ignore_index)
    cu_checked = cu_seqlens.device.type == "cpu" or validate
    if check and cu_checked:
        check_cu_seqlens(cu_seqlens, n)
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
    valid, prefix, seg = sequence_offsets(labels, ignore_index, cu)
    count = prefix[n:]  # (1,) number of valid rows, on the device
    if sync_free:
        # Valid rows first, in order, then the ignored ones: a permutation built on the device.
        idx = torch.arange(n, device=hidden.device)
        pos = torch.where(valid, prefix[:-1], count + idx - prefix[:-1])
        rows = torch.empty_like(idx).scatter_(0, pos, idx)
    else:
        # The device->host sync of each pass: the number of valid rows sizes every launch.
        rows = valid.nonzero().squeeze(1)
    cu_ok = None
    if not cu_checked:
        # No sync on CUDA: a malformed cu_seqlens turns the outputs into NaN instead.
        cu_ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
    bias = None if bias is None else bias.contiguous()  # kernels index bias densely
    labels_c = labels.index_select(0, rows)
    x = Rows(hidden, weight.contiguous(), bias, rows, labels_c, count if sync_free else None)
    return x, seg, cu_ok


def scatter_rows(values: Tensor, x: Rows, n: int, dtype: torch.dtype) -> Tensor:
    """Per-token values of the compacted rows back at their positions, 0 at ignored ones."""
    values = values.to(dtype)
    if x.count is not None:  # sync-free layout: the entries past the count are not results
        keep = torch.arange(values.shape[0], device=values.device) < x.count
        values = torch.where(keep, values, 0.0)
    out = torch.zeros(n, dtype=dtype, device=values.device)
    return out.index_copy_(0, x.rows, values)


# ----------------------------------------------------------------------------- the reduction


def segment_sum(x: Tensor, seg: Tensor, mean: bool = False) -> Tensor:
    """Sums of ``x (Nv,)`` over the segments ``[seg[s], seg[s+1])``, ``(S,)`` in ``x``'s dtype;
    with ``mean``, each sum divided by its segment's length (0 for an empty one) before the
    rounding, so a mean is never the quotient of an overflowed sum.

    The one per-sequence reduction of every backend. Each segment is summed on its own (in
    float64, in a fixed order: deterministic on every device, no atomics, no host sync), so no
    value of one sequence can leak into another's sum, however large; a NaN makes its own
    segment NaN; an empty segment sums to 0.
    """
    if x.shape[0] == 0:
        return torch.zeros(seg.shape[0] - 1, dtype=x.dtype, device=x.device)
    sums = torch.segment_reduce(x.double(), "sum", offsets=seg, unsafe=True)
    if mean:
        sums = sums / (seg[1:] - seg[:-1]).clamp(min=1)
    return sums.to(x.dtype)
