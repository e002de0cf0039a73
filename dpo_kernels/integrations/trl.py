"""A drop-in ``trl.DPOTrainer`` whose log-probs and loss run through dpo_kernels.

Change one import::

    from dpo_kernels.integrations.trl import DPOTrainer   # was: from trl import DPOTrainer

Same constructor, same ``trl.DPOConfig``, same logged metrics (names and meaning). What changes:
the policy and reference log-probs are per-sequence sums from the fused LM-head op (no logits,
no per-token log-prob tensors), and the loss is :func:`dpo_kernels.preference_loss`.
Supported: every ``loss_type`` (and lists with ``loss_weights``), ``beta``, ``label_smoothing``,
``f_divergence_type``, ``use_weighting``, ``ld_alpha``, ``discopop_tau``,
``precompute_ref_log_probs``, a separate ``ref_model`` or PEFT adapters (reference = adapters
disabled, or the ``"ref"`` adapter when present, as TRL does), and Mixture-of-Experts models'
router load-balancing loss (``router_aux_loss_coef`` with ``output_router_logits`` in the
config): as in TRL, ``router_aux_loss_coef · aux_loss`` is added to the policy's loss and logged
as ``aux_loss``, the loss computed from the backbone's router logits as the model's forward does.

``DPOConfig(padding_free=True)`` is honoured (TRL 1.16 turns it off with a warning and pads):
each batch's chosen and rejected sequences are packed into one row without padding (position
ids restarting at 0 per sequence, attention kept inside each sequence), the backbone runs once
on it and the fused head scores it with ``cu_seqlens``. That holds for the policy, the reference
(a separate ``ref_model``, or the policy with its PEFT adapters disabled) and
``precompute_ref_log_probs``, and gives the loss, metrics and gradients of padded batches.
Batches come from TRL's collator (or yours) as usual and are packed inside the passes, so
everything that reads a batch (token counts, evaluation weights) sees what it sees with TRL. The
attention implementations packing supports are those of
:func:`dpo_kernels.integrations.transformers.sequence_logprobs` (``eager``, ``sdpa``, flash
attention); anything else, vision batches and extra per-token model inputs are an error, never a
silent fallback to padding. Packed policy passes take the loss-level path of
:mod:`dpo_kernels.loss_path` (no recompute) where it applies, as padded ones do.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

from ..losses import (
    LOSS_SPECS,
    PreferenceOptions,
    _ld_sequence_stats,
    _preference_loss,
    mean_nll,
    wpo_weights,
)
from .transformers import (
    pack_padded,
    packed_attention_implementation,
    sequence_logprobs,
    sequence_pair_loss,
)

SUPPORTED_TRL = (">=1.16", "<1.17")

try:
    import trl
    from accelerate.utils import is_peft_model
    from packaging.specifiers import SpecifierSet
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as e:
    raise ImportError(
        f"dpo_kernels.integrations.trl needs TRL: pip install 'trl{','.join(SUPPORTED_TRL)}'"
    ) from e

# prereleases=True lets a 1.16.x dev build in; PEP 440's "<1.17" still keeps 1.17 rcs out.
if not SpecifierSet(",".join(SUPPORTED_TRL)).contains(trl.__version__, prereleases=True):
    raise ImportError(
        f"dpo_kernels.integrations.trl supports trl{','.join(SUPPORTED_TRL)} (it overrides "
        f"DPOTrainer internals that change between releases); found trl {trl.__version__}. "
        f"Install a supported TRL, or use trl.DPOTrainer itself."
    )

__all__ = ["DPOTrainer", "SUPPORTED_TRL"]

_NON_MODEL_KEYS = frozenset(
    {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
)


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with fused per-sequence log-probs (see the module docstring).

    ``logprobs_backend`` (class attribute, ``"auto"``) picks the :func:`linear_logprobs` backend.
    ``loss_options`` is the :class:`~dpo_kernels.losses.PreferenceOptions` built once from the
    ``DPOConfig`` in ``__init__``, with TRL's per-type quirks (``trl=True``). ``padding_free``
    is ``DPOConfig.padding_free``, fixed at construction (packed passes, see the module
    docstring).
    """

    logprobs_backend = "auto"

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(trl.DPOTrainer.__init__).bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        # Read by compute_ref_log_probs, which TRL's __init__ calls (precompute_ref_log_probs).
        self._padding_free = bool(getattr(config, "padding_free", False))
        if self._padding_free:  # else TRL 1.16 warns that it falls back to padding: we do not
            config.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self._padding_free:
                config.padding_free = True
        self.padding_free = self._padding_free
        if self._padding_free:
            if self._is_vision_dataset:
                raise ValueError(
                    "padding_free=True is not supported for vision datasets (their image "
                    "inputs cannot be packed); set padding_free=False"
                )
            for m in (self.model, self.ref_model):
                if m is not None:
                    packed_attention_implementation(m)  # NotImplementedError if unsupported
        # TRL's __init__ has set aux_loss_enabled (config.output_router_logits exists and
        # router_aux_loss_coef != 0) and router_aux_loss_coef: the policy pass then also returns
        # the MoE router load-balancing loss (see _compute_loss).
        self.loss_options = PreferenceOptions(
            loss_type=self.loss_types,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            loss_weights=self.loss_weights,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
            trl=True,
        )
        ignored = [
            t
            for t in self.loss_options.loss_types
            if "label_smoothing" in dict(LOSS_SPECS[t].trl_overrides)
        ]
        if ignored and self.label_smoothing > 0:
            warnings.warn(
                f"TRL 1.16 ignores label_smoothing for loss_type {', '.join(map(repr, ignored))} "
                "(it is used by robust, exo_pair and aot*); this drop-in does the same so results "
                "match TRL. For conservative DPO, use dpo_kernels.preference_loss("
                "loss_type='sigmoid', label_smoothing=...) or FusedLinearDPOLoss.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ log-probs

    def _pack(self, inputs):
        """``(cu_seqlens, input_ids (1, N), completion_mask (1, N))`` of a padded batch with
        padding_free, else None."""
        if not self._padding_free:
            return None
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs["input_ids"])
        return pack_padded(attention_mask, inputs["input_ids"], inputs["completion_mask"])

    def _sequence_pass(self, model, inputs, router_aux_loss=False, packed=None):
        """Per-sequence (logps as the loss uses them, stats), chosen half first; with
        ``router_aux_loss``, the MoE router load-balancing loss is appended. With padding_free,
        one packed row (``packed``: :meth:`_pack` of ``inputs``, computed here if None)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        ld = self.ld_alpha is not None
        common = dict(
            reduction="none" if ld else "sum",
            backend=self.logprobs_backend,
            router_aux_loss=router_aux_loss,
            **model_kwargs,
        )
        packed = self._pack(inputs) if packed is None else packed
        with self._autocast():
            if packed is None:
                out = sequence_logprobs(
                    model,
                    inputs["input_ids"],
                    inputs.get("attention_mask"),
                    inputs["completion_mask"],
                    **common,
                )
            else:
                cu, ids, completion = packed
                out = sequence_logprobs(model, ids, None, completion, cu_seqlens=cu, **common)
        stats, aux = out if router_aux_loss else (out, None)
        if ld and packed is not None:  # per packed token → the padded (2P, T − 1) layout
            stats = _unpack_scored(stats, inputs)
        logps, stats = (stats.logps, stats) if not ld else _ld_sequence_stats(stats, self.ld_alpha)
        return (logps, stats, aux) if router_aux_loss else (logps, stats)

    def _pair_pass(self, model, inputs, chunk_loss, router_aux_loss=False, packed=None):
        """The policy pass with its loss known (the loss-level path where it applies):
        ``(carrier or None, stats)`` of :func:`.transformers.sequence_pair_loss`, and the MoE
        router load-balancing loss appended with ``router_aux_loss``; with padding_free, on the
        packed row ``packed`` (:meth:`_pack`)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        common = dict(
            separable=self.loss_options.separable,
            backend=self.logprobs_backend,
            router_aux_loss=router_aux_loss,
            **model_kwargs,
        )
        with self._autocast():
            if packed is not None:
                cu, ids, completion = packed
                return sequence_pair_loss(
                    model, ids, None, completion, chunk_loss, cu_seqlens=cu, **common
                )
            return sequence_pair_loss(
                model,
                inputs["input_ids"],
                inputs.get("attention_mask"),
                inputs["completion_mask"],
                chunk_loss,
                **common,
            )

    def _autocast(self):
        """The mixed-precision autocast (``bf16=True`` / ``fp16=True``) that accelerate wraps
        around a prepared model's ``forward``: the passes call the backbone and the head inside
        that forward's place (``_call_through`` redirects it), so they enter it themselves, as
        stock TRL's model call does. Without mixed precision it does nothing."""
        return self.accelerator.autocast()

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(
                unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
            )
        return contextlib.nullcontext()

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch: ``(chosen (P,), rejected (P,))``."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            logps, _ = self._sequence_pass(model, inputs)
        return logps.chunk(2, dim=0)

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # The reference first: with it known, the policy's loss (and so its gradient) is known
        # as soon as its log-probs are, and the loss-level path needs no recompute.
        packed = self._pack(inputs)  # one packed row for both passes (padding_free)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                self._reference_context(),
            ):
                reference = self.ref_model if self.ref_model is not None else self.model
                ref_logps, _ = self._sequence_pass(reference, inputs, packed=packed)
            ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)

        # TRL length-normalises ipo / sigmoid_norm by the (unshifted) completion-mask sums, and
        # averages the sft NLL and the WPO weights over the scored (shifted) tokens.
        completion_len = inputs["completion_mask"].sum(dim=1)
        chosen_len, rejected_len = completion_len.chunk(2, dim=0)

        def pair_losses(logps, stats, pairs: slice):
            """TRL's loss terms of the pairs ``pairs`` (every loss type in one call; the options
            carry TRL's per-type quirks, e.g. no label_smoothing for sigmoid)."""
            chosen, rejected = logps.chunk(2, dim=0)
            raw, num = stats.logps.chunk(2, dim=0), stats.num_tokens.chunk(2, dim=0)
            sft = mean_nll(raw[0], num[0]) if "sft" in self.loss_options.loss_types else None
            weights = None
            if self.use_weighting:
                lssp = stats.log_sum_sq_probs_sum.chunk(2, dim=0)
                weights = wpo_weights(raw[0], raw[1], lssp[0], lssp[1], num[0], num[1])
            return _preference_loss(
                self.loss_options,
                chosen,
                rejected,
                ref_chosen[pairs].to(chosen),
                ref_rejected[pairs].to(chosen),
                chosen_num_tokens=chosen_len[pairs],
                rejected_num_tokens=rejected_len[pairs],
                sft_loss=sft,
                weights=weights,
            )

        # MoE: the policy pass also returns the router load-balancing loss (from the backbone's
        # router logits, as the model's forward computes it; the reference pass never does).
        aux = self.aux_loss_enabled
        carrier = aux_loss = None
        if self.ld_alpha is None:
            n_pairs = inputs["input_ids"].shape[0] // 2

            def chunk_loss(stats, pairs: slice):
                return pair_losses(stats.logps, stats, pairs).losses.sum() / n_pairs

            carrier, stats, *rest = self._pair_pass(model, inputs, chunk_loss, aux, packed)
            logps = stats.logps
        else:
            logps, stats, *rest = self._sequence_pass(model, inputs, aux, packed=packed)
        if aux:
            (aux_loss,) = rest
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        losses, chosen_rewards, rejected_rewards = pair_losses(logps, stats, slice(None))
        loss = losses.mean()
        if carrier is not None:  # the value from the detached log-probs, the gradient from the path
            loss = loss + carrier.to(loss.dtype)
        if aux:  # as TRL 1.16: loss + coef · aux_loss, logged as "aux_loss" (before the rest)
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
            )

        self._log_metrics(
            mode, inputs, stats, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards
        )
        if return_outputs:
            warnings.warn(
                "return_outputs=True recomputes the full logits with an extra forward pass "
                "(deprecated in TRL as well)",
                FutureWarning,
                stacklevel=2,
            )
            model_kwargs = {
                k: v
                for k, v in inputs.items()
                if k not in _NON_MODEL_KEYS - {"input_ids", "attention_mask"}
            }
            with torch.no_grad():
                outputs = model(**model_kwargs, use_cache=False)
            return loss, outputs
        return loss

    def _log_metrics(
        self, mode, inputs, stats, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards
    ):
        """TRL 1.16's DPOTrainer metrics, token-weighted across processes as TRL does."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]

        def ratio(num, den):
            num, den = gather(num.detach().sum()).sum(), gather(den.sum()).sum()
            return (num / den).item() if den.item() > 0 else 0.0

        metrics["entropy"].append(ratio(stats.entropy_sum, stats.num_tokens))
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        logits_sum = stats.logits_sum.chunk(2, dim=0)
        num = stats.num_tokens.chunk(2, dim=0)
        metrics["logits/chosen"].append(ratio(logits_sum[0], num[0]))
        metrics["logits/rejected"].append(ratio(logits_sum[1], num[1]))
        metrics["mean_token_accuracy"].append(ratio(stats.top1_correct.chunk(2, dim=0)[0], num[0]))

        chosen_rewards = self.accelerator.gather(chosen_rewards.detach())
        rejected_rewards = self.accelerator.gather(rejected_rewards.detach())
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(accuracies.mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(
            self.accelerator.gather(rejected_logps.detach()).mean().item()
        )


def _unpack_scored(per_token, inputs):
    """Per-token stats of a packed row (shaped ``(1, N)``, entry ``t`` for token ``t``) laid out
    as a padded pass gives them: ``(2P, T − 1)``, entry ``[b, t]`` for token ``t + 1`` of row
    ``b`` (LD-DPO reads the completion tokens' order within each sequence)."""
    mask = inputs.get("attention_mask")
    keep = (torch.ones_like(inputs["input_ids"]) if mask is None else mask).bool()
    return type(per_token)(
        *(f.new_zeros(keep.shape).masked_scatter(keep, f.reshape(-1))[:, 1:] for f in per_token)
    )
