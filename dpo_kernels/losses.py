"""The DPO loss family on per-sequence log-probs (plain torch, any device, any float dtype).

Every objective here is cheap arithmetic on what :func:`dpo_kernels.linear_logprobs` returns
(per-sequence sums of log-probs, token counts and the same-pass statistics), so the expensive part —
the LM head — is always the fused kernel. Names and formulas follow TRL 1.16 (``DPOConfig``,
``CPOTrainer``, ``ORPOTrainer``, ``KTOTrainer``) and the papers they cite; where TRL and
Liger-Kernel disagree, the docstring says which one is followed.

Each loss returns per-example losses (the trainer's loss is their mean) and detached rewards.
The loss family is data: :data:`LOSS_SPECS` holds one :class:`LossSpec` per DPO ``loss_type``
(its function and what it requires), and each objective's scalar options live in one frozen
dataclass (:class:`PreferenceOptions`, :class:`SimPOOptions`, :class:`CPOOptions`,
:class:`ORPOOptions`, :class:`KTOOptions`) whose construction is the only option check, shared by
the functions here, the modules and the TRL drop-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "LOSS_SPECS",
    "F_DIVERGENCES",
    "LossSpec",
    "PreferenceOptions",
    "PreferenceLossOutput",
    "preference_loss",
    "wpo_weights",
    "mean_nll",
    "ld_logps",
    "SimPOOptions",
    "simpo_loss",
    "CPOOptions",
    "cpo_loss",
    "ORPOOptions",
    "orpo_loss",
    "KTOOptions",
    "kto_loss",
    "kto_kl",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "ORPOLossOutput",
    "KTOLossOutput",
]

#: Every ``loss_type`` TRL 1.16's ``DPOConfig`` accepts (:data:`LOSS_SPECS` has one entry each).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
#: f-divergence regularisers (f-DPO, arXiv 2309.16240).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class PreferenceLossOutput(NamedTuple):
    """``losses (P,)`` per pair (their mean is the loss), ``chosen_rewards (P,)`` and
    ``rejected_rewards (P,)`` = β·(policy − reference log-prob), detached."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# ----------------------------------------------------------------------------- checks


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one value per pair), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape "
            "(one chosen and one rejected completion per pair)"
        )


def _check_same(name: str, t: Optional[Tensor], like: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} (one value per pair), got {tuple(t.shape)}"
        )


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_label_smoothing(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1), got {eps!r}")


def _check_ld_alpha(ld_alpha: float) -> None:
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha!r}")


def _check_loss_type(loss_type: str, known: Sequence[str], name: str = "loss_type") -> None:
    if loss_type not in known:
        raise ValueError(f"unknown {name} {loss_type!r}; expected one of {', '.join(known)}")


# ----------------------------------------------------------------------------- helpers


def _f_divergence_scores(logratios: Tensor, kind: str, alpha_coef: float) -> Tensor:
    """f'(t) at t = π/π_ref, from log t (f-DPO, Table 1). The exponential scores (forward KL, α)
    are float64: e^|log t| of two log-ratios of a few hundred overflows float32 even where their
    difference Δ, what the losses read, is small (two infinite float32 scores would make it
    NaN); the loss is rounded to the input dtype at the end."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios.double())
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(α−1) − 1) / (α − 1); α → 1 is log t (reverse KL)
    if abs(alpha_coef - 1.0) < 1e-6:
        return logratios
    # Clamp the exponent as TRL does (for it, so exp() stays finite in the input dtype; kept for
    # parity: the values past the clamp are TRL's) ...
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0
    t = (alpha_coef - 1.0) * logratios.double()
    # ... but not an infinite one: a log-ratio of ±inf (a log-prob of -inf) has an infinite score,
    # and clamping it would turn it into a finite (wrong) loss.
    t = torch.where(torch.isposinf(t), t, t.clamp(max=clamp_max))
    return (torch.exp(t) - 1.0) / (alpha_coef - 1.0)


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the DPO sigmoid loss with conservative label smoothing."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = loss * (1 - eps) - eps * F.logsigmoid(-x)
    return loss


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and for very negative x.

    Each branch sees only the inputs it is picked for, so neither back-propagates 0·∞ = NaN into
    the result's gradient (log1p(−e^x) has an infinite slope where e^x rounds to 1). At x = 0 the
    value is −inf (log 0) and the gradient 0: the odds of a log-prob of exactly 0 are infinite
    and do not move with it, where 0·∞ would otherwise give NaN."""
    near = x > -math.log(2)
    zero = x == 0
    a = torch.log(-torch.expm1(torch.where(near & ~zero, x, -1.0)))
    b = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(zero, -math.inf, torch.where(near, a, b))


def _per_token(score: Tensor, n: Tensor) -> Tensor:
    return score / n.clamp(min=1).to(score.dtype)


def mean_nll(logps: Tensor, num_tokens: Tensor) -> Tensor:
    """Mean negative log-likelihood per token over a batch: ``−Σ logps / Σ num_tokens``, from
    per-sequence *sums* of token log-probs and their token counts (0 when there is no token)."""
    return -logps.sum() / num_tokens.sum().clamp(min=1).to(logps.dtype)


def wpo_weights(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_log_sum_sq_probs: Tensor,
    rejected_log_sum_sq_probs: Tensor,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
) -> Tensor:
    """WPO pair weights (arXiv 2406.11827, Eq. 2, as TRL's ``use_weighting``), detached, ``(P,)``.

        w = exp(mean_t [log p(y_t) − log Σ_v p_v²]) for chosen × the same for rejected

    ``*_logps`` are per-sequence *sums* of token log-probs and ``*_log_sum_sq_probs`` the sums of
    ``log Σ_v p_v²`` (``LogProbStats.log_sum_sq_probs_sum``) over the same tokens.
    """
    with torch.no_grad():

        def one(logps, lss, n):
            return torch.exp((logps - lss) / n.clamp(min=1).to(logps.dtype))

        return one(chosen_logps, chosen_log_sum_sq_probs, chosen_num_tokens) * one(
            rejected_logps, rejected_log_sum_sq_probs, rejected_num_tokens
        )


def ld_logps(per_token_logps: Tensor, mask: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO sequence log-probs (arXiv 2409.06411, as TRL's ``ld_alpha``), ``(2P,)``.

    ``per_token_logps (2P, T)`` with the chosen half first, ``mask (2P, T)`` true on completion
    tokens. Each pair's first ``min(len_chosen, len_rejected)`` completion tokens count fully, the
    rest ("verbose" tail) with weight ``ld_alpha``::

        logps = Σ_shared log p + ld_alpha · Σ_tail log p
    """
    _check_ld_alpha(ld_alpha)
    if per_token_logps.dim() != 2 or per_token_logps.shape[0] % 2:
        raise ValueError(
            "per_token_logps must be (2P, T) with the chosen half first, got shape "
            f"{tuple(per_token_logps.shape)}"
        )
    mask = mask.to(torch.int64)
    pos = mask.cumsum(dim=1)  # 1-based position of each completion token
    lens = mask.sum(dim=1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2).unsqueeze(1)
    shared_mask = (pos <= shared) & (mask > 0)
    tail_mask = (pos > shared) & (mask > 0)
    zero = per_token_logps.new_zeros(())
    return torch.where(shared_mask, per_token_logps, zero).sum(dim=1) + ld_alpha * torch.where(
        tail_mask, per_token_logps, zero
    ).sum(dim=1)


def _ld_sequence_stats(per_token, ld_alpha: float):
    """LD-DPO from one per-token pass: ``per_token`` a ``LogProbStats`` of ``(2P, T)`` tensors
    (``num_tokens`` is 1 exactly where a token is scored). Returns the ``(2P,)`` LD log-probs and
    the same stats summed per sequence (plain sums, for the NLL, WPO and the metrics)::

        (ld_logps(logps, num_tokens > 0, ld_alpha), Σ_t stats)
    """
    logps = ld_logps(per_token.logps, per_token.num_tokens.bool(), ld_alpha)
    return logps, type(per_token)(*(t.sum(dim=1) for t in per_token))


# ----------------------------------------------------------------------------- DPO family


class _Pair(NamedTuple):
    """What a DPO loss type reads, for ``P`` pairs: ``(P,)`` tensors and the scalar options.
    ``c``/``r`` are the log-ratios policy − reference, ``c_score``/``r_score`` their f-divergence
    scores f'(·) and ``delta`` = ``c_score − r_score`` (Δ below)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    c: Tensor
    r: Tensor
    c_score: Tensor
    r_score: Tensor
    delta: Tensor
    chosen_num_tokens: Optional[Tensor]
    rejected_num_tokens: Optional[Tensor]
    sft_loss: Optional[Tensor]
    beta: float
    label_smoothing: float
    discopop_tau: float


def _sigmoid(p: _Pair) -> Tensor:
    """−(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)   (ε = label_smoothing: conservative DPO)"""
    return _smoothed_sigmoid(p.beta * p.delta, p.label_smoothing)


def _hinge(p: _Pair) -> Tensor:
    """relu(1 − β·Δ)"""
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: _Pair) -> Tensor:
    """(f'(c)/n_c − f'(r)/n_r − 1/(2β))²   (per-token scores: TRL's length normalisation)"""
    d = _per_token(p.c_score, p.chosen_num_tokens) - _per_token(p.r_score, p.rejected_num_tokens)
    return (d - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pair) -> Tensor:
    """σ(x)·(log σ(x) − log(1−ε)) + σ(−x)·(log σ(−x) − log ε), x = β·Δ: KL to [1−ε, ε] (EXO)"""
    x, eps = p.beta * p.delta, p.label_smoothing
    return _plogp_term(x, math.log1p(-eps)) + _plogp_term(-x, math.log(eps))


def _plogp_term(y: Tensor, c: float) -> Tensor:
    """σ(y)·(log σ(y) − c), 0 where σ(y) = 0 (its limit at y → −∞, also when y = −∞ itself or a
    float32 margin overflowed to it: never 0·(−∞) = NaN, in the value or the gradient)."""
    gone = torch.sigmoid(y) == 0
    y = torch.where(gone, torch.zeros_like(y), y)
    return torch.where(gone, 0.0, torch.sigmoid(y) * (F.logsigmoid(y) - c))


def _nca_pair(p: _Pair) -> Tensor:
    """−log σ(β·c) − ½·log σ(−β·c) − ½·log σ(−β·r)"""
    return (
        -F.logsigmoid(p.beta * p.c)
        - 0.5 * F.logsigmoid(-p.beta * p.c)
        - 0.5 * F.logsigmoid(-p.beta * p.r)
    )


def _robust(p: _Pair) -> Tensor:
    """(−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε)   (unbiased under label-flip rate ε: rDPO)"""
    x, eps = p.beta * p.delta, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _bco_pair(p: _Pair) -> Tensor:
    """−log σ(β·c) − log σ(−β·r)"""
    return -F.logsigmoid(p.beta * p.c) - F.logsigmoid(-p.beta * p.r)


def _sppo_hard(p: _Pair) -> Tensor:
    """(c − 1/(2β))² + (r + 1/(2β))²"""
    return (p.c - 0.5 / p.beta) ** 2 + (p.r + 0.5 / p.beta) ** 2


def _aot(p: _Pair) -> Tensor:
    """sigmoid loss of β·(sort(chosen − rejected) − sort(ref_chosen − ref_rejected)), over P"""
    pol = torch.sort(p.chosen - p.rejected).values
    ref = torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_sigmoid(p.beta * (pol - ref), p.label_smoothing)


def _aot_unpaired(p: _Pair) -> Tensor:
    """sigmoid loss of β·(sort(c) − sort(r)), sorted over the batch"""
    x = p.beta * (torch.sort(p.c).values - torch.sort(p.r).values)
    return _smoothed_sigmoid(x, p.label_smoothing)


def _apo_zero(p: _Pair) -> Tensor:
    """1 − σ(β·c) + σ(β·r)"""
    return 1 - torch.sigmoid(p.beta * p.c) + torch.sigmoid(p.beta * p.r)


def _apo_down(p: _Pair) -> Tensor:
    """σ(β·c) + 1 − σ(β·(c − r))"""
    return torch.sigmoid(p.beta * p.c) + 1 - torch.sigmoid(p.beta * (p.c - p.r))


def _discopop(p: _Pair) -> Tensor:
    """−log σ(x)·(1 − m) + e^(−x)·m with x = β·Δ, m = σ(x/τ): logistic/exponential blend"""
    x = p.beta * p.delta
    mix = torch.sigmoid(x / p.discopop_tau)
    # e^(−x)·m as exp(−x + log m): for x ≪ 0, e^(−x) overflows while m underflows to 0 (NaN).
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(F.logsigmoid(x / p.discopop_tau) - x)


def _sft(p: _Pair) -> Tensor:
    """mean NLL of the chosen tokens (sft_loss, else −Σ chosen / Σ n_c), the same for every pair"""
    nll = p.sft_loss if p.sft_loss is not None else mean_nll(p.chosen, p.chosen_num_tokens)
    return nll.expand(p.chosen.shape)


def _sigmoid_norm(p: _Pair) -> Tensor:
    """−log σ(β·(f'(c)/n_c − f'(r)/n_r))   (the sigmoid loss on per-token scores)"""
    d = _per_token(p.c_score, p.chosen_num_tokens) - _per_token(p.r_score, p.rejected_num_tokens)
    return -F.logsigmoid(p.beta * d)


class _Range(NamedTuple):
    """A stricter range of ``label_smoothing`` than [0, 1): as written, its test, and why."""

    text: str
    ok: Callable[[float], bool]
    why: str


@dataclass(frozen=True)
class LossSpec:
    """One DPO ``loss_type``: its per-pair loss and what it needs of the options and inputs.

    ``fn`` maps the pair terms to ``losses (P,)``. ``needs_reference``: uses reference log-probs
    (else 0 may stand in for them). ``needs_num_tokens``: length-normalised, needs both token
    counts; ``needs_chosen_nll``: needs ``sft_loss`` or ``chosen_num_tokens``.
    ``f_divergence_ok``: built on Δ = f'(c) − f'(r), so an f-divergence generalises it.
    ``smoothing``: a stricter range for ``label_smoothing``; ``uses_discopop_tau``: τ must be
    > 0. ``couples_pairs``: a pair's loss depends on the other pairs (a sort or a mean over the
    batch), so the loss-level path scores the batch in one chunk or not at all.
    ``trl_overrides``: ``(option, value)`` pairs TRL 1.16 uses for this type whatever the config
    says, applied with ``PreferenceOptions(trl=True)``.
    """

    fn: Callable[[_Pair], Tensor]
    needs_reference: bool = True
    needs_num_tokens: bool = False
    needs_chosen_nll: bool = False
    f_divergence_ok: bool = False
    smoothing: Optional[_Range] = None
    uses_discopop_tau: bool = False
    couples_pairs: bool = False
    trl_overrides: tuple[tuple[str, float], ...] = ()


#: The DPO loss family: one :class:`LossSpec` per name in :data:`LOSS_TYPES`, same order.
LOSS_SPECS: dict[str, LossSpec] = {
    # TRL 1.16 ignores label_smoothing here (it smooths robust, exo_pair and aot*); we apply it.
    "sigmoid": LossSpec(_sigmoid, f_divergence_ok=True, trl_overrides=(("label_smoothing", 0.0),)),
    "hinge": LossSpec(_hinge, f_divergence_ok=True),
    "ipo": LossSpec(_ipo, needs_num_tokens=True, f_divergence_ok=True),
    "exo_pair": LossSpec(
        _exo_pair,
        f_divergence_ok=True,
        smoothing=_Range(
            "(0, 1)",
            lambda eps: eps > 0.0,
            "log ε appears in the loss; the EXO paper recommends 1e-3",
        ),
    ),
    "nca_pair": LossSpec(_nca_pair),
    "robust": LossSpec(
        _robust,
        f_divergence_ok=True,
        smoothing=_Range(
            "[0, 0.5)",
            lambda eps: eps < 0.5,
            "it is the probability that a preference label is flipped",
        ),
    ),
    "bco_pair": LossSpec(_bco_pair),
    "sppo_hard": LossSpec(_sppo_hard),
    "aot": LossSpec(_aot, couples_pairs=True),
    "aot_unpaired": LossSpec(_aot_unpaired, couples_pairs=True),
    "apo_zero": LossSpec(_apo_zero),
    "apo_down": LossSpec(_apo_down),
    "discopop": LossSpec(_discopop, f_divergence_ok=True, uses_discopop_tau=True),
    "sft": LossSpec(
        _sft,
        needs_reference=False,
        needs_chosen_nll=True,
        f_divergence_ok=True,
        couples_pairs=True,
    ),
    "sigmoid_norm": LossSpec(_sigmoid_norm, needs_num_tokens=True, f_divergence_ok=True),
}


@dataclass(frozen=True)
class PreferenceOptions:
    """The scalar options of :func:`preference_loss`; constructing one checks them all.

    ``loss_type``: a name in :data:`LOSS_TYPES` or several (kept as a tuple; MPO), combined as
    ``Σ_k loss_weights[k] · loss_k``; ``loss_weights`` is a tuple of one weight per type (None:
    all 1). ``trl=True`` follows TRL 1.16's quirks (each type's ``LossSpec.trl_overrides``, e.g.
    no label smoothing for ``sigmoid``), for the TRL drop-in.
    """

    loss_type: Union[str, tuple[str, ...]] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_weights: Optional[tuple[float, ...]] = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    trl: bool = False

    def __post_init__(self):
        # Normalise lists to tuples (frozen: hashable, and nobody can edit them afterwards).
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        types = self.loss_types
        if not types:
            raise ValueError("loss_type must name at least one loss type")
        for t in types:
            _check_loss_type(t, LOSS_TYPES)
        if self.loss_weights is None:
            weights = (1.0,) * len(types)
        else:
            weights = tuple(float(w) for w in self.loss_weights)
            if len(weights) != len(types):
                raise ValueError(
                    f"loss_weights must have one weight per loss type: got {len(weights)} weights "
                    f"for {len(types)} loss types {list(types)}"
                )
        object.__setattr__(self, "loss_weights", weights)
        _check_beta(self.beta)
        eps = self.label_smoothing
        _check_label_smoothing(eps)
        specs = [(t, LOSS_SPECS[t]) for t in types]
        for t, spec in specs:
            if spec.smoothing is not None and not spec.smoothing.ok(eps):
                raise ValueError(
                    f"label_smoothing must lie in {spec.smoothing.text} for loss_type={t!r} "
                    f"({spec.smoothing.why}), got {eps!r}"
                )
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"unknown f_divergence_type {self.f_divergence_type!r}; expected one of "
                f"{', '.join(F_DIVERGENCES)}"
            )
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t, spec in specs if not spec.f_divergence_ok]
            if bad:
                ok = [t for t, spec in LOSS_SPECS.items() if spec.f_divergence_ok]
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} has no generalisation for "
                    f"loss_type {bad}; it applies to {', '.join(ok)}"
                )
        if any(spec.uses_discopop_tau for _, spec in specs) and not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau!r}")

    @property
    def loss_types(self) -> tuple[str, ...]:
        """``loss_type`` as a tuple of names."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def separable(self) -> bool:
        """The loss is a sum of per-pair terms (no type couples the pairs)."""
        return not any(LOSS_SPECS[t].couples_pairs for t in self.loss_types)


def _preference_loss(
    options: PreferenceOptions,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    reference_free: bool = False,
    chosen_num_tokens: Optional[Tensor] = None,
    rejected_num_tokens: Optional[Tensor] = None,
    sft_loss: Optional[Tensor] = None,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: Optional[Tensor] = None,
    rejected_log_sum_sq_probs: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
) -> PreferenceLossOutput:
    """:func:`preference_loss` with its scalar options already checked in ``options``: every
    type of ``options.loss_types`` from :data:`LOSS_SPECS` in one call (shapes as there)::

        losses = Σ_k loss_weights[k] · w · LOSS_SPECS[type_k].fn(pair)   (w: WPO weights or 1)
    """
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    specs = [(t, LOSS_SPECS[t]) for t in options.loss_types]
    if reference_free:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("reference_free=True takes no ref_chosen_logps/ref_rejected_logps")
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        if any(spec.needs_reference for _, spec in specs):
            raise ValueError(
                "pass ref_chosen_logps and ref_rejected_logps (the reference model's log-probs), "
                "or reference_free=True to use 0 for both"
            )
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    _check_same("ref_chosen_logps", ref_chosen_logps, chosen_logps)
    _check_same("ref_rejected_logps", ref_rejected_logps, chosen_logps)
    for name, t in (
        ("chosen_num_tokens", chosen_num_tokens),
        ("rejected_num_tokens", rejected_num_tokens),
        ("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs),
        ("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs),
        ("weights", weights),
    ):
        _check_same(name, t, chosen_logps)
    have_counts = chosen_num_tokens is not None and rejected_num_tokens is not None
    need_counts = [t for t, spec in specs if spec.needs_num_tokens]
    if need_counts and not have_counts:
        raise ValueError(
            f"loss_type {need_counts} is length-normalised: pass chosen_num_tokens and "
            "rejected_num_tokens (completion tokens per sequence)"
        )
    for t, spec in specs:
        if spec.needs_chosen_nll and sft_loss is None and chosen_num_tokens is None:
            raise ValueError(f"loss_type {t!r} needs sft_loss or chosen_num_tokens")
    if use_weighting:
        if weights is not None:
            raise ValueError("pass either use_weighting=True or weights, not both")
        if not have_counts or chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError(
                "use_weighting=True (WPO) needs chosen_num_tokens, rejected_num_tokens, "
                "chosen_log_sum_sq_probs and rejected_log_sum_sq_probs"
            )
        weights = wpo_weights(
            chosen_logps,
            rejected_logps,
            chosen_log_sum_sq_probs,
            rejected_log_sum_sq_probs,
            chosen_num_tokens,
            rejected_num_tokens,
        )

    beta = options.beta
    c = chosen_logps - ref_chosen_logps
    r = rejected_logps - ref_rejected_logps
    c_score = _f_divergence_scores(c, options.f_divergence_type, options.f_alpha_divergence_coef)
    r_score = _f_divergence_scores(r, options.f_divergence_type, options.f_alpha_divergence_coef)
    pair = _Pair(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        c,
        r,
        c_score,
        r_score,
        c_score - r_score,
        chosen_num_tokens,
        rejected_num_tokens,
        sft_loss,
        beta,
        float(options.label_smoothing),
        options.discopop_tau,
    )
    total = None
    for (_, spec), w in zip(specs, options.loss_weights):
        quirks = options.trl and spec.trl_overrides
        loss = spec.fn(pair._replace(**dict(spec.trl_overrides)) if quirks else pair)
        if weights is not None:
            loss = loss * weights
        total = loss * w if total is None else total + loss * w
    total = total.to(c.dtype)  # (float64 from the exponential f-divergence scores)
    return PreferenceLossOutput(total, (beta * c).detach(), (beta * r).detach())


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    chosen_num_tokens: Optional[Tensor] = None,
    rejected_num_tokens: Optional[Tensor] = None,
    sft_loss: Optional[Tensor] = None,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: Optional[Tensor] = None,
    rejected_log_sum_sq_probs: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
) -> PreferenceLossOutput:
    """The DPO loss family of TRL 1.16's ``DPOTrainer`` on per-sequence log-probs.

    Shapes: every tensor argument is ``(P,)``, one value per pair. With the log-ratios
    ``c = chosen − ref_chosen``, ``r = rejected − ref_rejected`` and the f-divergence scores
    ``Δ = f'(c) − f'(r)`` (``Δ = c − r`` for the default reverse KL), ``sigmoid`` is

        loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)      (ε = label_smoothing: conservative DPO)

    and the other ``loss_type`` values follow TRL (see :data:`LOSS_SPECS`, one function with its
    formula per type, and the README table). A list of loss types is combined as
    ``Σ_k loss_weights[k] · loss_k`` (MPO). The scalar options are checked by
    :class:`PreferenceOptions`. Needs:

    - ``ref_*_logps``, or ``reference_free=True`` (reference log-probs taken as 0);
    - ``chosen_num_tokens``/``rejected_num_tokens`` for ``ipo`` and ``sigmoid_norm`` (TRL
      length-normalises both), for ``sft`` without ``sft_loss`` and for ``use_weighting``;
    - ``sft_loss`` (mean NLL of the chosen tokens) for ``sft``; by default
      ``−Σ chosen_logps / Σ chosen_num_tokens``;
    - ``chosen_log_sum_sq_probs``/``rejected_log_sum_sq_probs`` (sums of ``log Σ_v p²``) for
      ``use_weighting`` (WPO), or precomputed per-pair ``weights`` (see :func:`wpo_weights`).

    Returns :class:`PreferenceLossOutput` ``(losses, chosen_rewards, rejected_rewards)``; rewards
    are ``β·c`` and ``β·r``, detached. For ``aot``/``aot_unpaired`` (which sort across the batch)
    and ``sft`` (a batch mean) a pair's loss depends on the other pairs; the mean is what TRL
    uses.
    """
    options = PreferenceOptions(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
    )
    return _preference_loss(
        options,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reference_free=reference_free,
        chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens,
        sft_loss=sft_loss,
        use_weighting=use_weighting,
        chosen_log_sum_sq_probs=chosen_log_sum_sq_probs,
        rejected_log_sum_sq_probs=rejected_log_sum_sq_probs,
        weights=weights,
    )


# ----------------------------------------------------------------------------- SimPO


@dataclass(frozen=True)
class SimPOOptions:
    """The options of :func:`simpo_loss`; constructing one checks them."""

    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self):
        _check_beta(self.beta)
        _check_label_smoothing(self.label_smoothing)


def _simpo_loss(
    options: SimPOOptions, chosen_avg_logps: Tensor, rejected_avg_logps: Tensor
) -> PreferenceLossOutput:
    _check_pair("chosen_avg_logps", chosen_avg_logps, "rejected_avg_logps", rejected_avg_logps)
    beta = options.beta
    x = beta * (chosen_avg_logps - rejected_avg_logps) - options.gamma
    return PreferenceLossOutput(
        _smoothed_sigmoid(x, options.label_smoothing),
        (beta * chosen_avg_logps).detach(),
        (beta * rejected_avg_logps).detach(),
    )


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO (arXiv 2405.14734): reference-free, on *average* log-probs ``(P,)``.

        loss = −(1−ε)·log σ(β·(c̄ − r̄) − γ) − ε·log σ(−β·(c̄ − r̄) + γ)

    Rewards are ``β·c̄`` and ``β·r̄`` (detached). Note Liger's ``gamma`` is the margin itself; TRL's
    CPO ``simpo_gamma`` is the same margin (it subtracts ``simpo_gamma/β`` before scaling by β).
    """
    options = SimPOOptions(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    return _simpo_loss(options, chosen_avg_logps, rejected_avg_logps)


# ----------------------------------------------------------------------------- CPO


def _cpo_sigmoid(d: Tensor, o: CPOOptions) -> Tensor:
    """−(1−ε)·log σ(β·d) − ε·log σ(−β·d)"""
    return _smoothed_sigmoid(o.beta * d, o.label_smoothing)


def _cpo_hinge(d: Tensor, o: CPOOptions) -> Tensor:
    """relu(1 − β·d)"""
    return torch.relu(1 - o.beta * d)


def _cpo_ipo(d: Tensor, o: CPOOptions) -> Tensor:
    """(d − 1/(2β))²"""
    return (d - 1 / (2 * o.beta)) ** 2


def _cpo_simpo(d: Tensor, o: CPOOptions) -> Tensor:
    """−(1−ε)·log σ(β·d − γ) − ε·log σ(−β·d + γ), γ = simpo_gamma (CPO-SimPO)"""
    return _smoothed_sigmoid(o.beta * d - o.simpo_gamma, o.label_smoothing)


# CPO's loss types on d = chosen − rejected (policy only), as TRL's CPOTrainer.cpo_loss.
_CPO_LOSSES: dict[str, Callable[[Tensor, CPOOptions], Tensor]] = {
    "sigmoid": _cpo_sigmoid,
    "hinge": _cpo_hinge,
    "ipo": _cpo_ipo,
    "simpo": _cpo_simpo,
}
CPO_LOSS_TYPES = tuple(_CPO_LOSSES)


@dataclass(frozen=True)
class CPOOptions:
    """The options of :func:`cpo_loss`; constructing one checks them."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    simpo_gamma: float = 0.5

    def __post_init__(self):
        _check_loss_type(self.loss_type, CPO_LOSS_TYPES, "CPO loss_type")
        _check_beta(self.beta)
        _check_label_smoothing(self.label_smoothing)


def _cpo_loss(
    options: CPOOptions, chosen_logps: Tensor, rejected_logps: Tensor
) -> PreferenceLossOutput:
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    losses = _CPO_LOSSES[options.loss_type](chosen_logps - rejected_logps, options)
    return PreferenceLossOutput(
        losses, (options.beta * chosen_logps).detach(), (options.beta * rejected_logps).detach()
    )


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    simpo_gamma: float = 0.5,
) -> PreferenceLossOutput:
    """CPO (arXiv 2401.08417) preference term, as TRL's ``CPOTrainer.cpo_loss``, ``(P,)``.

    With ``d = chosen − rejected`` (policy only; no reference model):
    ``sigmoid``: −(1−ε)·log σ(β·d) − ε·log σ(−β·d); ``hinge``: relu(1 − β·d);
    ``ipo``: (d − 1/(2β))²; ``simpo`` (CPO-SimPO): the sigmoid loss on ``β·d − simpo_gamma``.
    The full CPO loss adds ``alpha ·`` NLL of the chosen completion (see the module).
    """
    options = CPOOptions(
        beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=simpo_gamma
    )
    return _cpo_loss(options, chosen_logps, rejected_logps)


# ----------------------------------------------------------------------------- ORPO


class ORPOLossOutput(NamedTuple):
    """ORPO's odds-ratio term: ``losses (P,)`` = −β·log σ(log-odds), rewards ``β·logps``
    (detached), and the two logged means ``log_odds_ratio`` = mean log σ(log-odds) and
    ``log_odds_chosen`` = mean log-odds."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor


@dataclass(frozen=True)
class ORPOOptions:
    """The options of :func:`orpo_loss`; constructing one checks them."""

    beta: float = 0.1

    def __post_init__(self):
        _check_beta(self.beta)


def _orpo_loss(
    options: ORPOOptions, chosen_logps: Tensor, rejected_logps: Tensor
) -> ORPOLossOutput:
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    beta = options.beta
    log_odds = (chosen_logps - rejected_logps) - (
        _log1mexp(chosen_logps) - _log1mexp(rejected_logps)
    )
    ratio = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        -beta * ratio,
        (beta * chosen_logps).detach(),
        (beta * rejected_logps).detach(),
        ratio.detach().mean(),
        log_odds.detach().mean(),
    )


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1) -> ORPOLossOutput:
    """ORPO (arXiv 2403.07691) odds-ratio term on average log-probs ``(P,)``.

        log-odds = (c̄ − r̄) − (log(1 − e^c̄) − log(1 − e^r̄));   loss = −β·log σ(log-odds)

    ``log(1 − e^x)`` is evaluated stably (as TRL's ``log1mexp``; Liger uses ``log1p(−e^x)``, which
    loses precision when an average log-prob is close to 0). The full ORPO loss adds the NLL of the
    chosen completion (see the module).
    """
    return _orpo_loss(ORPOOptions(beta=beta), chosen_logps, rejected_logps)


# ----------------------------------------------------------------------------- KTO


class KTOLossOutput(NamedTuple):
    """``losses (N,)`` per example (weighted), ``rewards (N,)`` = β·(policy − reference)
    (detached), and ``kl`` the (detached, clamped) KL estimate used."""

    losses: Tensor
    rewards: Tensor
    kl: Tensor


def _kto(x: Tensor, z: Tensor, desirable: Tensor, beta: float) -> Tensor:
    """desirable: 1 − σ(β·(x − z)); undesirable: 1 − σ(β·(z − x))"""
    return torch.where(
        desirable, 1 - torch.sigmoid(beta * (x - z)), 1 - torch.sigmoid(beta * (z - x))
    )


def _apo_zero_unpaired(x: Tensor, z: Tensor, desirable: Tensor, beta: float) -> Tensor:
    """desirable: 1 − σ(β·x); undesirable: σ(β·x)   (no KL term)"""
    return torch.where(desirable, 1 - torch.sigmoid(beta * x), torch.sigmoid(beta * x))


# KTO's loss types on x = policy − reference log-probs and the KL estimate z, as TRL's KTOTrainer.
_KTO_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "kto": _kto,
    "apo_zero_unpaired": _apo_zero_unpaired,
}
KTO_LOSS_TYPES = tuple(_KTO_LOSSES)


@dataclass(frozen=True)
class KTOOptions:
    """The options of :func:`kto_loss`; constructing one checks them."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    def __post_init__(self):
        _check_loss_type(self.loss_type, KTO_LOSS_TYPES, "KTO loss_type")
        _check_beta(self.beta)


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's KL estimate (TRL): mean of policy − reference log-probs of mismatched completions
    (each prompt with another example's completion), detached and clamped at 0."""
    _check_pair("policy_kl_logps", policy_kl_logps, "ref_kl_logps", ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def _kto_loss(
    options: KTOOptions,
    logps: Tensor,
    ref_logps: Optional[Tensor],
    preference_labels: Tensor,
    kl: Optional[Tensor] = None,
) -> KTOLossOutput:
    if not isinstance(logps, Tensor) or logps.dim() != 1:
        raise ValueError("logps must be a 1-D tensor (one value per example)")
    _check_same("ref_logps", ref_logps, logps)
    if not isinstance(preference_labels, Tensor) or preference_labels.shape != logps.shape:
        raise ValueError(
            f"preference_labels must be a tensor of shape {tuple(logps.shape)} (true = desirable)"
        )
    desirable = preference_labels.to(torch.bool)
    x = logps if ref_logps is None else logps - ref_logps
    z = torch.zeros((), dtype=x.dtype, device=x.device) if kl is None else kl.detach().to(x.dtype)
    losses = _KTO_LOSSES[options.loss_type](x, z, desirable, options.beta)
    scale = torch.where(
        desirable,
        losses.new_tensor(options.desirable_weight),
        losses.new_tensor(options.undesirable_weight),
    )  # in the loss dtype
    return KTOLossOutput(losses * scale, (options.beta * x).detach(), z)


def kto_loss(
    logps: Tensor,
    ref_logps: Optional[Tensor],
    preference_labels: Tensor,
    *,
    beta: float = 0.1,
    kl: Optional[Tensor] = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    """KTO (arXiv 2402.01306) on unpaired examples, as TRL's ``KTOTrainer``. Shapes ``(N,)``.

    With ``x = logps − ref_logps`` (``ref_logps=None``: reference-free) and ``z = kl`` (0 if None):
    desirable (label true) ``λ_D·(1 − σ(β·(x − z)))``, undesirable ``λ_U·(1 − σ(β·(z − x)))``.
    ``apo_zero_unpaired``: ``1 − σ(β·x)`` and ``σ(β·x)`` (no KL). ``kl`` may be a tensor (e.g.
    from :func:`kto_kl`) or None.
    """
    options = KTOOptions(
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
    )
    return _kto_loss(options, logps, ref_logps, preference_labels, kl)
