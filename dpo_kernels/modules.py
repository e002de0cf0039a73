"""Fused LM-head + preference-loss modules, drop-in for Liger-Kernel's ``LigerFusedLinear*Loss``.

Each module takes the LM head and the final hidden states, runs :func:`linear_logprobs` once for the
policy (with its statistics, so the metrics cost no second pass) and once without autograd for the
reference model, and applies a loss from :mod:`dpo_kernels.losses`. Constructor arguments, call
signatures and return tuples are Liger-Kernel 0.8's, so a Liger user changes one import;
``compiled`` and ``chunk_size`` are accepted and ignored (the kernels need neither
``torch.compile`` nor chunking). Everything a module adds over Liger is keyword-only and comes
after Liger's arguments; every module takes ``backend`` and ``softcap`` (Gemma-2's final-logit
softcapping, applied as :func:`linear_logprobs` does).

The paired modules (DPO, SimPO, CPO, ORPO) run the policy pass through the loss-level path of
:mod:`dpo_kernels.loss_path` where it applies (the reference first, then chunks of pairs scored
with their logits kept and their gradients formed at once: no recompute), else through
:func:`linear_logprobs`; the results are the same.

Each module checks its options when it is built, without running a loss: the loss's options go
into one frozen object from :mod:`dpo_kernels.losses` (``self.options``, e.g.
``PreferenceOptions``) whose construction is the check, and Liger's attribute names (``beta``,
``loss_type`` …) read from it; the module's own options (``ignore_index``, ``backend`` …) are
plain attributes.

The returned tuple also carries ``.metrics``: a dict of detached 0-d tensors under TRL's names
(``rewards/chosen`` … ``nll_loss``), built from the same pass (no ``.item()``, no host sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import loss_path
from .logprobs import LogProbStats, linear_logprobs
from .losses import (
    CPOOptions,
    KTOOptions,
    ORPOOptions,
    PreferenceOptions,
    SimPOOptions,
    _check_ld_alpha,
    _cpo_loss,
    _kto_loss,
    _ld_sequence_stats,
    _orpo_loss,
    _preference_loss,
    _simpo_loss,
    kto_kl,
    mean_nll,
    wpo_weights,
)

__all__ = [
    "FusedLinearDPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearCPOLoss",
    "FusedLinearKTOLoss",
    "PreferenceOutputs",
    "ORPOOutputs",
    "KTOOutputs",
]


# ----------------------------------------------------------------------------- return types


class _PreferenceFields(NamedTuple):
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits_mean: Tensor
    rejected_logits_mean: Tensor
    nll_loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class PreferenceOutputs(_PreferenceFields):
    """Liger's 7-tuple (unpacks as Liger's does) plus ``.metrics`` (TRL names, detached)."""

    metrics: dict[str, Tensor]


class _ORPOFields(NamedTuple):
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits_mean: Tensor
    rejected_logits_mean: Tensor
    nll_loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor


class ORPOOutputs(_ORPOFields):
    """Liger ORPO's 9-tuple plus ``.metrics``."""

    metrics: dict[str, Tensor]


class _KTOFields(NamedTuple):
    chosen_logps_sum: Tensor
    rejected_logps_sum: Tensor
    chosen_logits_sum: Tensor
    rejected_logits_sum: Tensor
    chosen_rewards_sum: Tensor
    rejected_rewards_sum: Tensor


class KTOOutputs(_KTOFields):
    """Liger KTO's 6-tuple plus ``.metrics``."""

    metrics: dict[str, Tensor]


def _with_metrics(cls, fields, metrics):
    out = cls(*fields)
    out.metrics = metrics
    return out


# ----------------------------------------------------------------------------- shared passes


class _Pass(NamedTuple):
    """One ``linear_logprobs`` pass over ``(n, T)`` sequences: ``logps`` as the loss uses them
    (sum, mean or LD-weighted), ``sums`` the plain sums (for NLL and WPO) and the statistics."""

    logps: Tensor
    sums: Tensor
    num_tokens: Tensor
    logits_sum: Tensor
    entropy_sum: Tensor
    top1: Tensor
    lss: Tensor


def _check_inputs(name_input, _input, name_weight, weight, target, paired: bool) -> None:
    if not isinstance(_input, Tensor) or _input.dim() != 3:
        shape = tuple(_input.shape) if isinstance(_input, Tensor) else type(_input).__name__
        raise ValueError(f"{name_input} must be (batch, T, D) hidden states, got {shape}")
    if not isinstance(target, Tensor) or tuple(target.shape) != tuple(_input.shape[:2]):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target must be (batch, T) = {tuple(_input.shape[:2])} like {name_input}, got {shape}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != _input.shape[2]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{name_weight} must be (V, D) with D = {_input.shape[2]}, got {shape}")
    if paired and _input.shape[0] % 2:
        raise ValueError(
            f"{name_input} must stack the chosen and rejected halves on dim 0 (batch 2B, chosen "
            f"first): got an odd batch of {_input.shape[0]}"
        )


def _sequence_pass(
    hidden,
    weight,
    target,
    bias,
    *,
    ignore_index,
    average_log_prob,
    ld_alpha=None,
    backend="auto",
    softcap=None,
) -> _Pass:
    if ld_alpha is None:
        st = linear_logprobs(
            hidden,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            return_stats=True,
            backend=backend,
            softcap=softcap,
        )
        logps, stats = st.logps, st
    else:  # LD-DPO needs per-token log-probs to split shared and tail tokens
        st = linear_logprobs(
            hidden,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            reduction="none",
            return_stats=True,
            backend=backend,
            softcap=softcap,
        )
        logps, stats = _ld_sequence_stats(st, ld_alpha)
    return _pass_from(stats, average_log_prob, logps)


def _pass_from(stats: LogProbStats, average_log_prob: bool, logps: Optional[Tensor] = None):
    """A :class:`_Pass` from per-sequence statistics (``logps`` their sums, unless given)."""
    sums, num = stats.logps, stats.num_tokens
    logps = sums if logps is None else logps
    if average_log_prob:
        logps = logps / num.clamp(min=1).to(logps.dtype)
    return _Pass(
        logps,
        sums,
        num,
        stats.logits_sum,
        stats.entropy_sum,
        stats.top1_correct,
        stats.log_sum_sq_probs_sum,
    )


def _sum_f32(t: Tensor, dim: int, chunk_bytes: int = 4 << 20) -> Tensor:
    """``t.sum(dim)`` accumulated in fp32, without an fp32 copy of ``t``: torch's
    ``sum(dtype=torch.float32)`` first widens all of a bf16/fp16 tensor (2 GB for a Llama-3 head),
    so a low-precision ``t`` is summed in slices of ``chunk_bytes`` of fp32 along ``dim``."""
    if t.dtype == torch.float32:
        return t.sum(dim=dim)
    n = t.shape[dim]
    step = max(1, chunk_bytes // (4 * max(1, t.numel() // max(1, n))))
    out = t.narrow(dim, 0, min(step, n)).sum(dim=dim, dtype=torch.float32)
    for i in range(step, n, step):
        out += t.narrow(dim, i, min(step, n - i)).sum(dim=dim, dtype=torch.float32)
    return out


def _all_positions_logits_sum(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], seq_weights: Optional[Tensor] = None
) -> Tensor:
    """Σ over every position and vocab entry of h·Wᵀ + b, ignored positions included (what Liger
    reports), in O((N + V)·D) by linearity: (Σ_rows h)·(Σ_v W_v) + rows·Σ_v b_v, accumulated in
    fp32 without an fp32 copy of ``weight``. ``seq_weights (B,)`` weights each sequence (0/1
    selects sequences without a host sync). Returns ``(len(seq_weights or [1]),)`` sums."""
    with torch.no_grad():
        per_seq = _sum_f32(hidden, 1)  # (B, D)
        w_sum = _sum_f32(weight, 0)  # (D,)
        b_sum = bias.sum(dtype=torch.float32) if bias is not None else 0.0
        weights = (
            torch.ones(1, hidden.shape[0], device=hidden.device)
            if seq_weights is None
            else seq_weights.float().reshape(-1, hidden.shape[0])
        )
        return (weights @ per_seq) @ w_sum + weights.sum(dim=1) * hidden.shape[1] * b_sum


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num.sum().float() / den.sum().clamp(min=1).float()


def _pair_metrics(
    chosen: _Pass, rejected: _Pass, chosen_rewards, rejected_rewards, nll
) -> dict[str, Tensor]:
    """TRL's DPOTrainer metrics for one batch, from the policy pass's statistics."""
    with torch.no_grad():
        return {
            "rewards/chosen": chosen_rewards.float().mean(),
            "rewards/rejected": rejected_rewards.float().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).float().mean(),
            "logps/chosen": chosen.logps.detach().float().mean(),
            "logps/rejected": rejected.logps.detach().float().mean(),
            "logits/chosen": _ratio(chosen.logits_sum, chosen.num_tokens),
            "logits/rejected": _ratio(rejected.logits_sum, rejected.num_tokens),
            "entropy": (chosen.entropy_sum.sum() + rejected.entropy_sum.sum()).float()
            / (chosen.num_tokens.sum() + rejected.num_tokens.sum()).clamp(min=1).float(),
            "mean_token_accuracy": _ratio(chosen.top1, chosen.num_tokens),
            "nll_loss": nll.detach().float(),
        }


def _from_options(name: str) -> property:
    """A read-only attribute that reads ``self.options.<name>`` (Liger's attribute names)."""
    return property(
        lambda self: getattr(self.options, name),
        doc=f"``options.{name}`` (read-only: build a new module to change it)",
    )


def _split(p: _Pass):
    half = p.logps.shape[0] // 2
    return _Pass(*(t[:half] for t in p)), _Pass(*(t[half:] for t in p))


class _PairedBase(nn.Module):
    """What the paired modules share: the policy pass and the loss on it (the loss-level fast
    path of :mod:`dpo_kernels.loss_path` where it applies), the chosen NLL, Liger's logits
    means."""

    def _policy(
        self,
        weight,
        _input,
        target,
        bias,
        average_log_prob,
        pair_loss,
        separable,
        ld_alpha=None,
        fused=True,
    ):
        """The policy pass and its loss. ``pair_loss(chosen, rejected, pairs)`` is the module's
        loss on the pairs ``pairs`` (a slice) from their :class:`_Pass` halves; its ``.losses``
        are per pair. Returns ``(out, loss, chosen, rejected, nll, c_mean, r_mean)``: ``out`` the
        loss's output on the whole batch, ``loss`` its mean (plus ``alpha · nll`` with
        ``compute_nll_loss``), differentiable."""
        _check_inputs("_input", _input, "lin_weight", weight, target, paired=True)
        half = _input.shape[0] // 2
        chunks = (
            "LD-DPO weighs tokens, or the caller's loss needs the plain op"
            if ld_alpha is not None or not fused
            else loss_path.plan(
                _input,
                weight,
                bias,
                target,
                ignore_index=self.ignore_index,
                backend=self.backend,
                separable=separable,
            )
        )
        carrier = None
        if isinstance(chunks, list):
            n_chosen = (target[:half] != self.ignore_index).sum().clamp(min=1)

            def chunk_loss(stats: LogProbStats, pairs: slice) -> Tensor:
                c, r = _split(_pass_from(stats, average_log_prob))
                loss = pair_loss(c, r, pairs).losses.sum() / half
                if self.compute_nll_loss:  # the batch's mean NLL, a sum over chunks
                    loss = loss - self.alpha * c.sums.sum() / n_chosen.to(c.sums.dtype)
                return loss

            carrier, stats = loss_path.fused_pair_loss(
                _input,
                weight,
                target,
                bias,
                chunk_loss,
                chunks,
                ignore_index=self.ignore_index,
                backend=self.backend,
                softcap=self.softcap,
            )
            p = _pass_from(stats, average_log_prob)
        else:
            p = _sequence_pass(
                _input,
                weight,
                target,
                bias,
                ignore_index=self.ignore_index,
                average_log_prob=average_log_prob,
                ld_alpha=ld_alpha,
                backend=self.backend,
                softcap=self.softcap,
            )
        chosen, rejected = _split(p)
        nll = mean_nll(chosen.sums, chosen.num_tokens)
        out = pair_loss(chosen, rejected, slice(0, half))
        loss = out.losses.mean()
        if self.compute_nll_loss:
            loss = loss + self.alpha * nll
        if carrier is not None:  # values from the detached statistics, gradients from the path
            loss = loss + carrier
        scale = half * _input.shape[1] * weight.shape[0]
        halves = torch.zeros(2, _input.shape[0], device=_input.device)
        halves[0, :half] = 1
        halves[1, half:] = 1
        c_mean, r_mean = (_all_positions_logits_sum(_input, weight, bias, halves) / scale).unbind()
        return out, loss, chosen, rejected, nll, c_mean, r_mean

    def _finish(self, out, loss, chosen, rejected, nll, c_mean, r_mean, cls=None, extra=()):
        """Liger's output tuple (plus ``.metrics``) from a loss's output."""
        metrics = _pair_metrics(chosen, rejected, out.chosen_rewards, out.rejected_rewards, nll)
        # Liger reports 0 when the NLL term is off; the metrics always have the real value.
        reported_nll = nll.detach() if self.compute_nll_loss else torch.zeros_like(nll).detach()
        fields = (
            chosen.logps.detach(),
            rejected.logps.detach(),
            c_mean,
            r_mean,
            reported_nll,
            out.chosen_rewards,
            out.rejected_rewards,
            *extra,
        )
        return loss, _with_metrics(cls or PreferenceOutputs, fields, metrics)


# ----------------------------------------------------------------------------- DPO


class FusedLinearDPOLoss(_PairedBase):
    """Fused LM head + DPO-family loss; drop-in for ``LigerFusedLinearDPOLoss``.

    Call: ``loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards) = loss_fn(lin_weight, _input, target, bias=None,
    ref_input=None, ref_weight=None, ref_bias=None, ref_chosen_logps=None,
    ref_rejected_logps=None)`` with ``_input (2B, T, D)`` (chosen half first), ``target (2B, T)``
    already aligned with ``_input`` (``ignore_index`` on prompt and padding).

        loss = mean_pairs preference_loss(...) + alpha · NLL(chosen)   (NLL if compute_nll_loss)

    RPO is ``compute_nll_loss=True`` with ``alpha`` its weight. The reference log-probs come from
    ``ref_chosen_logps``/``ref_rejected_logps`` (precomputed), else from ``ref_input``/
    ``ref_weight``/``ref_bias`` through the same kernel without autograd (so identical weights give
    rewards of exactly 0), else — with ``use_ref_model=False`` — are 0 (reference-free).

    Beyond Liger (keyword-only): every TRL loss type (also ``ipo``, ``aot``, ``aot_unpaired``,
    ``sft``, ``sigmoid_norm``) and lists of them with ``loss_weights``, ``f_divergence_type``,
    ``use_weighting`` (WPO), ``ld_alpha`` (LD-DPO), ``backend``. ``label_smoothing`` with
    ``sigmoid`` is conservative DPO (Liger 0.8 and TRL 1.16 ignore it there).
    ``chosen_logits_mean`` follows Liger (mean over every position, ignored ones included);
    ``metrics["logits/chosen"]`` follows TRL (completion tokens only).
    ``options`` is the :class:`~dpo_kernels.losses.PreferenceOptions` built (and so checked) here.
    """

    beta = _from_options("beta")
    loss_type = _from_options("loss_type")
    label_smoothing = _from_options("label_smoothing")
    discopop_tau = _from_options("discopop_tau")
    loss_weights = _from_options("loss_weights")
    f_divergence_type = _from_options("f_divergence_type")
    f_alpha_divergence_coef = _from_options("f_alpha_divergence_coef")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: Union[str, Sequence[str]] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        loss_weights: Optional[Sequence[float]] = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        ld_alpha: Optional[float] = None,
        backend: str = "auto",
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.options = PreferenceOptions(
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            loss_weights=loss_weights,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
        )
        if ld_alpha is not None:
            _check_ld_alpha(ld_alpha)
        self.ignore_index = ignore_index
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.use_weighting = use_weighting
        self.ld_alpha = ld_alpha
        self.backend = backend
        self.softcap = softcap

    def _reference(
        self, target, ref_input, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps, half
    ):
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        if ref_chosen_logps is not None:
            for name, t in (
                ("ref_chosen_logps", ref_chosen_logps),
                ("ref_rejected_logps", ref_rejected_logps),
            ):
                if not isinstance(t, Tensor) or tuple(t.shape) != (half,):
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"{name} must have shape ({half},) (one per pair), got {shape}"
                    )
            return ref_chosen_logps.detach(), ref_rejected_logps.detach()
        if not self.use_ref_model:
            return None, None
        if ref_input is None or ref_weight is None:
            raise ValueError(
                "use_ref_model=True needs ref_input and ref_weight (the reference model's hidden "
                "states and head), or precomputed ref_chosen_logps and ref_rejected_logps; pass "
                "use_ref_model=False for a reference-free loss"
            )
        _check_inputs("ref_input", ref_input, "ref_weight", ref_weight, target, paired=True)
        with torch.no_grad():
            ref = _sequence_pass(
                ref_input,
                ref_weight,
                target,
                ref_bias,
                ignore_index=self.ignore_index,
                average_log_prob=self.average_log_prob,
                ld_alpha=self.ld_alpha,
                backend=self.backend,
                softcap=self.softcap,
            )
        return ref.logps[:half], ref.logps[half:]

    def forward(
        self,
        lin_weight,
        _input,
        target,
        bias=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        ref_chosen_logps=None,
        ref_rejected_logps=None,
    ):
        _check_inputs("_input", _input, "lin_weight", lin_weight, target, paired=True)
        half = _input.shape[0] // 2
        # The reference first: with it known, the policy's loss gradient is known in its forward.
        ref_c, ref_r = self._reference(
            target, ref_input, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps, half
        )

        def pair_loss(chosen: _Pass, rejected: _Pass, pairs: slice):
            weights = None
            if self.use_weighting:  # WPO weights from the plain sums, as TRL
                weights = wpo_weights(
                    chosen.sums,
                    rejected.sums,
                    chosen.lss,
                    rejected.lss,
                    chosen.num_tokens,
                    rejected.num_tokens,
                )
            return _preference_loss(
                self.options,
                chosen.logps,
                rejected.logps,
                None if ref_c is None else ref_c[pairs],
                None if ref_r is None else ref_r[pairs],
                reference_free=ref_c is None,
                chosen_num_tokens=chosen.num_tokens,
                rejected_num_tokens=rejected.num_tokens,
                sft_loss=mean_nll(chosen.sums, chosen.num_tokens),
                weights=weights,
            )

        res = self._policy(
            lin_weight,
            _input,
            target,
            bias,
            self.average_log_prob,
            pair_loss,
            self.options.separable,
            self.ld_alpha,
        )
        return self._finish(*res)


# ----------------------------------------------------------------------------- SimPO / CPO


class FusedLinearSimPOLoss(_PairedBase):
    """Fused LM head + SimPO loss; drop-in for ``LigerFusedLinearSimPOLoss``.

    ``loss, outputs = loss_fn(lin_weight, _input, target, bias=None)``; average log-probs,
    no reference model: ``loss = mean −log σ(β·(c̄ − r̄) − γ) + alpha·NLL(chosen)`` (with label
    smoothing as Liger). Outputs as :class:`FusedLinearDPOLoss`. ``options``:
    :class:`~dpo_kernels.losses.SimPOOptions`.
    """

    beta = _from_options("beta")
    gamma = _from_options("gamma")
    label_smoothing = _from_options("label_smoothing")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        backend: str = "auto",
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.options = SimPOOptions(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.backend = backend
        self.softcap = softcap

    def forward(self, lin_weight, _input, target, bias=None):
        res = self._policy(
            lin_weight,
            _input,
            target,
            bias,
            True,
            lambda c, r, _pairs: _simpo_loss(self.options, c.logps, r.logps),
            True,
        )
        return self._finish(*res)


class FusedLinearCPOLoss(_PairedBase):
    """Fused LM head + CPO loss; drop-in for ``LigerFusedLinearCPOLoss``.

    ``loss, outputs = loss_fn(lin_weight, _input, target, bias=None)``:
    ``loss = mean cpo_loss(chosen, rejected) + alpha·NLL(chosen)``. Beyond Liger: ``loss_type``
    (``sigmoid``, ``hinge``, ``ipo``, ``simpo`` — CPO-SimPO with margin ``simpo_gamma``), as TRL's
    ``CPOConfig``. Outputs as :class:`FusedLinearDPOLoss`. ``options``:
    :class:`~dpo_kernels.losses.CPOOptions`.
    """

    beta = _from_options("beta")
    label_smoothing = _from_options("label_smoothing")
    loss_type = _from_options("loss_type")
    simpo_gamma = _from_options("simpo_gamma")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        loss_type: str = "sigmoid",
        simpo_gamma: float = 0.5,
        backend: str = "auto",
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.options = CPOOptions(
            beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=simpo_gamma
        )
        self.ignore_index = ignore_index
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.backend = backend
        self.softcap = softcap

    def forward(self, lin_weight, _input, target, bias=None):
        res = self._policy(
            lin_weight,
            _input,
            target,
            bias,
            self.average_log_prob,
            lambda c, r, _pairs: _cpo_loss(self.options, c.logps, r.logps),
            True,
        )
        return self._finish(*res)


# ----------------------------------------------------------------------------- ORPO


class FusedLinearORPOLoss(_PairedBase):
    """Fused LM head + ORPO loss; drop-in for ``LigerFusedLinearORPOLoss``.

    ``loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen) = loss_fn(lin_weight,
    _input, target, bias=None, nll_target=None)``; average log-probs:
    ``loss = NLL(chosen) − β·mean log σ(log-odds)``. ``nll_target (2B, T)``, if given, supplies
    the NLL's labels for the chosen half (one more kernel pass over that half). ``options``:
    :class:`~dpo_kernels.losses.ORPOOptions`.
    """

    beta = _from_options("beta")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        backend: str = "auto",
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.options = ORPOOptions(beta=beta)
        self.ignore_index = ignore_index
        self.alpha = 1.0
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.backend = backend
        self.softcap = softcap

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        out, loss, chosen, rejected, nll, c_mean, r_mean = self._policy(
            lin_weight,
            _input,
            target,
            bias,
            True,
            lambda c, r, _pairs: _orpo_loss(self.options, c.logps, r.logps),
            True,
            fused=nll_target is None,  # that NLL comes from another pass: the plain op
        )
        if nll_target is not None:
            if not isinstance(nll_target, Tensor) or nll_target.shape != target.shape:
                raise ValueError(
                    f"nll_target must have target's shape {tuple(target.shape)}, got "
                    f"{tuple(nll_target.shape) if isinstance(nll_target, Tensor) else nll_target}"
                )
            half = _input.shape[0] // 2
            st = linear_logprobs(
                _input[:half],
                lin_weight,
                nll_target[:half],
                bias,
                ignore_index=self.ignore_index,
                return_stats=True,
                backend=self.backend,
                softcap=self.softcap,
            )
            nll = mean_nll(st.logps, st.num_tokens)
            loss = out.losses.mean() + (self.alpha * nll if self.compute_nll_loss else 0.0)
        loss, outputs = self._finish(
            out,
            loss,
            chosen,
            rejected,
            nll,
            c_mean,
            r_mean,
            ORPOOutputs,
            (out.log_odds_ratio, out.log_odds_chosen),
        )
        outputs.metrics["log_odds_ratio"] = out.log_odds_ratio.float()
        outputs.metrics["log_odds_chosen"] = out.log_odds_chosen.float()
        return loss, outputs


# ----------------------------------------------------------------------------- KTO


class FusedLinearKTOLoss(nn.Module):
    """Fused LM head + KTO loss (unpaired); drop-in for ``LigerFusedLinearKTOLoss``.

    ``loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum) = loss_fn(_input, lin_weight, target, bias=None,
    preference_labels=None, ref_input=None, ref_weight=None, ref_bias=None, kl=None)`` — note
    ``_input`` comes first, as in Liger. ``_input (N, T, D)``, ``target (N, T)``,
    ``preference_labels (N,)`` bool (true = desirable). ``loss`` is the mean of the per-example
    losses (:func:`dpo_kernels.losses.kto_loss`).

    Beyond Liger (keyword-only): precomputed ``ref_logps (N,)``; the KL estimate from mismatched
    completions through the same kernel (``kl_input``/``kl_target`` for the policy and
    ``ref_kl_input`` for the reference, no autograd), as TRL; ``desirable_weight``,
    ``undesirable_weight``, ``loss_type`` (``kto`` or ``apo_zero_unpaired``), ``backend``.
    ``chosen_logits_sum`` follows Liger (every position, ignored ones included). ``options``:
    :class:`~dpo_kernels.losses.KTOOptions`.
    """

    beta = _from_options("beta")
    desirable_weight = _from_options("desirable_weight")
    undesirable_weight = _from_options("undesirable_weight")
    loss_type = _from_options("loss_type")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
        backend: str = "auto",
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.options = KTOOptions(
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            loss_type=loss_type,
        )
        self.ignore_index = ignore_index
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.backend = backend
        self.softcap = softcap

    def _pass(self, _input, weight, target, bias):
        return _sequence_pass(
            _input,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            average_log_prob=self.average_log_prob,
            backend=self.backend,
            softcap=self.softcap,
        )

    def forward(
        self,
        _input,
        lin_weight,
        target,
        bias=None,
        preference_labels=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        kl=None,
        *,
        ref_logps=None,
        kl_input=None,
        kl_target=None,
        ref_kl_input=None,
    ):
        _check_inputs("_input", _input, "lin_weight", lin_weight, target, paired=False)
        n = _input.shape[0]
        if not isinstance(preference_labels, Tensor) or tuple(preference_labels.shape) != (n,):
            raise ValueError(
                f"preference_labels must be a ({n},) tensor (true = desirable), got "
                f"{tuple(preference_labels.shape) if isinstance(preference_labels, Tensor) else preference_labels}"  # noqa: E501
            )
        labels = preference_labels.to(torch.bool)
        # The reference and the KL estimate first (no autograd): with them known, each
        # sequence's loss, and so its gradient, is known as soon as its log-probs are, and the
        # policy pass takes the loss-level path (no recompute) where it applies.
        if ref_logps is not None:
            if not isinstance(ref_logps, Tensor) or tuple(ref_logps.shape) != (n,):
                raise ValueError(f"ref_logps must have shape ({n},)")
            ref = ref_logps.detach()
        elif self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError(
                    "use_ref_model=True needs ref_input and ref_weight, or precomputed ref_logps"
                )
            _check_inputs("ref_input", ref_input, "ref_weight", ref_weight, target, paired=False)
            with torch.no_grad():
                ref = self._pass(ref_input, ref_weight, target, ref_bias).logps
        else:
            ref = None
        if kl is None and kl_input is not None:
            if kl_target is None or ref_kl_input is None or ref_weight is None:
                raise ValueError(
                    "the KL estimate needs kl_input, kl_target, ref_kl_input and ref_weight"
                )
            with torch.no_grad():
                pol_kl = self._pass(kl_input, lin_weight, kl_target, bias).logps
                ref_kl = self._pass(ref_kl_input, ref_weight, kl_target, ref_bias).logps
            kl = kto_kl(pol_kl, ref_kl)
        chunks = loss_path.plan(
            _input,
            lin_weight,
            bias,
            target,
            ignore_index=self.ignore_index,
            backend=self.backend,
            separable=True,  # the KL estimate is detached: the loss is a sum over sequences
            paired=False,
        )
        carrier = None
        if isinstance(chunks, list):
            kl_c = None if kl is None else kl.detach()

            def chunk_loss(stats: LogProbStats, seqs: slice) -> Tensor:
                logps = _pass_from(stats, self.average_log_prob).logps
                ref_c = None if ref is None else ref[seqs]
                losses = _kto_loss(self.options, logps, ref_c, labels[seqs], kl_c).losses
                return losses.sum() / n

            carrier, stats = loss_path.fused_pair_loss(
                _input,
                lin_weight,
                target,
                bias,
                chunk_loss,
                chunks,
                ignore_index=self.ignore_index,
                backend=self.backend,
                softcap=self.softcap,
                paired=False,
            )
            pol = _pass_from(stats, self.average_log_prob)
        else:
            pol = self._pass(_input, lin_weight, target, bias)
        out = _kto_loss(self.options, pol.logps, ref, labels, kl)
        loss = out.losses.mean()
        if carrier is not None:  # values from the detached statistics, gradients from the path
            loss = loss + carrier
        with torch.no_grad():
            d = labels.to(pol.logps.dtype)
            u = 1 - d
            fields = (
                (pol.logps * d).sum(),
                (pol.logps * u).sum(),
                *_all_positions_logits_sum(_input, lin_weight, bias, torch.stack([d, u])),
                (out.rewards * d).sum(),
                (out.rewards * u).sum(),
            )
            nd, nu = d.sum().clamp(min=1), u.sum().clamp(min=1)
            metrics = {
                "kl": out.kl.float(),
                "rewards/chosen": fields[4] / nd,
                "rewards/rejected": fields[5] / nu,
                "rewards/margins": fields[4] / nd - fields[5] / nu,
                "logps/chosen": fields[0] / nd,
                "logps/rejected": fields[1] / nu,
                "logits/chosen": _ratio(pol.logits_sum * d, pol.num_tokens * d),
                "logits/rejected": _ratio(pol.logits_sum * u, pol.num_tokens * u),
                "entropy": _ratio(pol.entropy_sum, pol.num_tokens),
            }
        return loss, _with_metrics(KTOOutputs, fields, metrics)
