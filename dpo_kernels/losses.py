"""The DPO loss family on per-sequence log-probs (plain torch, any device, any float dtype).

Every objective here is cheap arithmetic on what :func:`dpo_kernels.linear_logprobs` returns
(per-sequence sums of log-probs, token counts and the same-pass statistics), so the expensive part —
the LM head — is always the fused kernel. Names and formulas follow TRL 1.16 (``DPOConfig``,
``CPOTrainer``, ``ORPOTrainer``, ``KTOTrainer``) and the papers they cite; where TRL and
Liger-Kernel disagree, the docstring says which one is followed.

Each loss returns per-example losses (the trainer's loss is their mean) and detached rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCES",
    "PreferenceLossOutput",
    "preference_loss",
    "wpo_weights",
    "mean_nll",
    "ld_logps",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "ORPOLossOutput",
    "KTOLossOutput",
]

#: Every ``loss_type`` TRL 1.16's ``DPOConfig`` accepts.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
#: f-divergence regularisers (f-DPO, arXiv 2309.16240).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on the chosen − rejected score difference: the only ones an f-divergence
# generalises (TRL rejects the others with a non-default f_divergence_type).
_F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                        "discopop", "sft")
# Loss types that need the number of completion tokens of each sequence.
_NEEDS_NUM_TOKENS = ("ipo", "sigmoid_norm")


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


def _check_label_smoothing(loss_types: Sequence[str], eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1), got {eps!r}")
    if "robust" in loss_types and not eps < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5) for loss_type='robust' (it is the probability "
            f"that a preference label is flipped), got {eps!r}"
        )
    if "exo_pair" in loss_types and not eps > 0.0:
        raise ValueError(
            f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (log ε appears in the "
            f"loss; the EXO paper recommends 1e-3), got {eps!r}"
        )


def _loss_types(loss_type: Union[str, Sequence[str]], loss_weights) -> tuple:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; expected one of {', '.join(LOSS_TYPES)}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(weights)} weights "
                f"for {len(types)} loss types {list(types)}"
            )
    return types, weights


# ----------------------------------------------------------------------------- helpers


def _f_divergence_scores(logratios: Tensor, kind: str, alpha_coef: float) -> Tensor:
    """f'(t) at t = π/π_ref, from log t (f-DPO, Table 1)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(α−1) − 1) / (α − 1); α → 1 is log t (reverse KL)
    if abs(alpha_coef - 1.0) < 1e-6:
        return logratios
    # Clamp the exponent so exp() stays finite in the input dtype (TRL does the same).
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0
    wide = torch.promote_types(logratios.dtype, torch.float32)  # half inputs: exp() in fp32
    t = ((alpha_coef - 1.0) * logratios).to(wide).clamp(max=clamp_max)
    return (torch.exp(t) - 1.0).to(logratios.dtype) / (alpha_coef - 1.0)


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the DPO sigmoid loss with conservative label smoothing."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = loss * (1 - eps) - eps * F.logsigmoid(-x)
    return loss


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha!r}")
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
    return (
        torch.where(shared_mask, per_token_logps, zero).sum(dim=1)
        + ld_alpha * torch.where(tail_mask, per_token_logps, zero).sum(dim=1)
    )


# ----------------------------------------------------------------------------- DPO family


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

    and the other ``loss_type`` values follow TRL (see ``LOSS_TYPES`` and the README table). A
    list of loss types is combined as ``Σ_k loss_weights[k] · loss_k`` (MPO). Needs:

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
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    types, lweights = _loss_types(loss_type, loss_weights)
    _check_beta(beta)
    _check_label_smoothing(types, label_smoothing)
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; expected one of "
            f"{', '.join(F_DIVERGENCES)}"
        )
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in _F_DIVERGENCE_LOSSES]
        if bad:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} has no generalisation for loss_type "
                f"{bad}; it applies to {', '.join(_F_DIVERGENCE_LOSSES)}"
            )
    if "discopop" in types and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau!r}")

    if reference_free:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("reference_free=True takes no ref_chosen_logps/ref_rejected_logps")
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        if any(t != "sft" for t in types):
            raise ValueError(
                "pass ref_chosen_logps and ref_rejected_logps (the reference model's log-probs), "
                "or reference_free=True to use 0 for both"
            )
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    _check_same("ref_chosen_logps", ref_chosen_logps, chosen_logps)
    _check_same("ref_rejected_logps", ref_rejected_logps, chosen_logps)
    for name, t in (("chosen_num_tokens", chosen_num_tokens),
                    ("rejected_num_tokens", rejected_num_tokens),
                    ("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs),
                    ("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs),
                    ("weights", weights)):
        _check_same(name, t, chosen_logps)
    have_counts = chosen_num_tokens is not None and rejected_num_tokens is not None
    need_counts = [t for t in types if t in _NEEDS_NUM_TOKENS]
    if need_counts and not have_counts:
        raise ValueError(
            f"loss_type {need_counts} is length-normalised: pass chosen_num_tokens and "
            "rejected_num_tokens (completion tokens per sequence)"
        )
    if "sft" in types and sft_loss is None and chosen_num_tokens is None:
        raise ValueError("loss_type 'sft' needs sft_loss or chosen_num_tokens")
    if use_weighting:
        if weights is not None:
            raise ValueError("pass either use_weighting=True or weights, not both")
        if not have_counts or chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError(
                "use_weighting=True (WPO) needs chosen_num_tokens, rejected_num_tokens, "
                "chosen_log_sum_sq_probs and rejected_log_sum_sq_probs"
            )
        weights = wpo_weights(chosen_logps, rejected_logps, chosen_log_sum_sq_probs,
                              rejected_log_sum_sq_probs, chosen_num_tokens, rejected_num_tokens)

    c = chosen_logps - ref_chosen_logps
    r = rejected_logps - ref_rejected_logps
    c_score = _f_divergence_scores(c, f_divergence_type, f_alpha_divergence_coef)
    r_score = _f_divergence_scores(r, f_divergence_type, f_alpha_divergence_coef)
    delta = c_score - r_score
    eps = float(label_smoothing)

    def per_token(score, n):
        return score / n.clamp(min=1).to(score.dtype)

    total = None
    for kind, w in zip(types, lweights):
        if kind == "sigmoid":
            loss = _smoothed_sigmoid(beta * delta, eps)
        elif kind == "hinge":
            loss = torch.relu(1 - beta * delta)
        elif kind == "ipo":  # squared loss on per-token scores (TRL's length normalisation)
            d = per_token(c_score, chosen_num_tokens) - per_token(r_score, rejected_num_tokens)
            loss = (d - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":  # KL(p_θ ‖ [1−ε, ε]) over {chosen, rejected}, EXO Eq. 16
            x = beta * delta
            loss = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                    + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
        elif kind == "nca_pair":
            loss = (-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c)
                    - 0.5 * F.logsigmoid(-beta * r))
        elif kind == "robust":  # unbiased under a label-flip rate ε (rDPO)
            loss = (-(1 - eps) * F.logsigmoid(beta * delta)
                    + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            loss = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
        elif kind == "sppo_hard":
            loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif kind == "aot":  # sorted policy vs sorted reference log-ratio gaps
            pol = torch.sort(chosen_logps - rejected_logps).values
            ref = torch.sort(ref_chosen_logps - ref_rejected_logps).values
            loss = _smoothed_sigmoid(beta * (pol - ref), eps)
        elif kind == "aot_unpaired":
            loss = _smoothed_sigmoid(beta * (torch.sort(c).values - torch.sort(r).values), eps)
        elif kind == "apo_zero":
            loss = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
        elif kind == "apo_down":
            loss = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
        elif kind == "discopop":  # log-ratio modulated blend of logistic and exponential losses
            x = beta * delta
            mix = torch.sigmoid(x / discopop_tau)
            loss = -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix
        elif kind == "sft":
            nll = sft_loss
            if nll is None:
                nll = mean_nll(chosen_logps, chosen_num_tokens)
            loss = nll.expand(chosen_logps.shape)
        else:  # sigmoid_norm: sigmoid loss on per-token scores
            d = per_token(c_score, chosen_num_tokens) - per_token(r_score, rejected_num_tokens)
            loss = -F.logsigmoid(beta * d)
        if weights is not None:
            loss = loss * weights
        total = loss * w if total is None else total + loss * w
    return PreferenceLossOutput(total, (beta * c).detach(), (beta * r).detach())


# ----------------------------------------------------------------------------- other objectives


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
    _check_pair("chosen_avg_logps", chosen_avg_logps, "rejected_avg_logps", rejected_avg_logps)
    _check_beta(beta)
    _check_label_smoothing((), label_smoothing)
    x = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return PreferenceLossOutput(
        _smoothed_sigmoid(x, label_smoothing),
        (beta * chosen_avg_logps).detach(),
        (beta * rejected_avg_logps).detach(),
    )


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


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
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(
            f"unknown CPO loss_type {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}"
        )
    _check_beta(beta)
    _check_label_smoothing((), label_smoothing)
    d = chosen_logps - rejected_logps
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * d, label_smoothing)
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * d - simpo_gamma, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:
        losses = (d - 1 / (2 * beta)) ** 2
    return PreferenceLossOutput(losses, (beta * chosen_logps).detach(),
                                (beta * rejected_logps).detach())


class ORPOLossOutput(NamedTuple):
    """ORPO's odds-ratio term: ``losses (P,)`` = −β·log σ(log-odds), rewards ``β·logps``
    (detached), and the two logged means ``log_odds_ratio`` = mean log σ(log-odds) and
    ``log_odds_chosen`` = mean log-odds."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1) -> ORPOLossOutput:
    """ORPO (arXiv 2403.07691) odds-ratio term on average log-probs ``(P,)``.

        log-odds = (c̄ − r̄) − (log(1 − e^c̄) − log(1 − e^r̄));   loss = −β·log σ(log-odds)

    ``log(1 − e^x)`` is evaluated stably (as TRL's ``log1mexp``; Liger uses ``log1p(−e^x)``, which
    loses precision when an average log-prob is close to 0). The full ORPO loss adds the NLL of the
    chosen completion (see the module).
    """
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    _check_beta(beta)
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps)
                                                  - _log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        -beta * ratio,
        (beta * chosen_logps).detach(),
        (beta * rejected_logps).detach(),
        ratio.detach().mean(),
        log_odds.detach().mean(),
    )


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    """``losses (N,)`` per example (weighted), ``rewards (N,)`` = β·(policy − reference)
    (detached), and ``kl`` the (detached, clamped) KL estimate used."""

    losses: Tensor
    rewards: Tensor
    kl: Tensor


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's KL estimate (TRL): mean of policy − reference log-probs of mismatched completions
    (each prompt with another example's completion), detached and clamped at 0."""
    _check_pair("policy_kl_logps", policy_kl_logps, "ref_kl_logps", ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


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
    if not isinstance(logps, Tensor) or logps.dim() != 1:
        raise ValueError("logps must be a 1-D tensor (one value per example)")
    _check_same("ref_logps", ref_logps, logps)
    if not isinstance(preference_labels, Tensor) or preference_labels.shape != logps.shape:
        raise ValueError(
            f"preference_labels must be a tensor of shape {tuple(logps.shape)} (true = desirable)"
        )
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(
            f"unknown KTO loss_type {loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}"
        )
    _check_beta(beta)
    desirable = preference_labels.to(torch.bool)
    x = logps if ref_logps is None else logps - ref_logps
    z = torch.zeros((), dtype=x.dtype, device=x.device) if kl is None else kl.detach().to(x.dtype)
    if loss_type == "kto":
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * (x - z)),
                             1 - torch.sigmoid(beta * (z - x)))
    else:
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * x), torch.sigmoid(beta * x))
    scale = torch.where(desirable, losses.new_tensor(desirable_weight),
                        losses.new_tensor(undesirable_weight))  # in the loss dtype, not fp32
    return KTOLossOutput(losses * scale, (beta * x).detach(), z)
