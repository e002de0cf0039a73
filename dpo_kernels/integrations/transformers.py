"""Per-sequence log-probs of a Hugging Face causal LM through the fused op, without its logits.

``lm_head_spec(model)`` reads the LM head (weight, bias, tied or not) and the logit transforms the
model's own forward applies; ``sequence_logprobs(model, ...)`` runs the backbone, shifts, and calls
:func:`dpo_kernels.linear_logprobs` on the final hidden states, so the result equals
``log_softmax(model(...).logits)`` gathered at the next tokens and summed per sequence.

Wrappers are handled without bypassing them: DDP / FSDP / DeepSpeed engines and the model itself
are *called*, with the wrapped module's ``forward`` redirected to the fused computation for that
one call, and so is the LM head (with its forward redirected to the fused op), so every engine
hook fires as in a plain forward: FSDP2 / FSDP1 unshard the head and reduce its gradient, ZeRO-3
fetches it and reduces its gradient. The head is read inside its own forward, never before. PEFT
(LoRA-style) models run their adapted backbone.

Padding-free (packed) rows: ``sequence_logprobs(model, ids (1, N), None, completion_mask (1, N),
cu_seqlens=cu)`` runs the backbone once on sequences laid back to back (``pack_padded`` builds
them from a padded batch), with position ids restarting at 0 for each sequence and no attention
mask, which is how transformers marks packed sequences; its mask utilities then keep attention
inside each sequence for ``eager`` and ``sdpa`` (a block-diagonal causal mask, sliding windows
included) and flash attention gets each sequence's offsets (``cu_seq_lens_q/k``). Any other
attention implementation (``flex_attention``, paged or custom kernels), and layers that are not
attention (linear-attention / state-space layers carry state from one sequence into the next),
are refused with an error naming them. The first packed call of each model and attention
implementation also checks, inside every attention layer, that the mask it receives never joins
two sequences (for flash attention: that the sequence offsets reach it), so a model whose code
ignores the packing is an error, never wrong numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import loss_path
from ..logprobs import LogProbStats, linear_logprobs

__all__ = [
    "LMHeadSpec",
    "lm_head_spec",
    "pack_padded",
    "packed_attention_implementation",
    "sequence_logprobs",
    "sequence_pair_loss",
    "unwrap_model",
]


@dataclasses.dataclass(frozen=True)
class LMHeadSpec:
    """The LM head of a model and the transforms its forward applies to the logits::

        z = softcap · tanh(logit_scale · (hidden_scale · h · Wᵀ + b) / softcap)

    ``weight (V, D)`` and ``bias (V,)`` are the head's own parameters (with tied embeddings,
    the embedding matrix itself); ``softcap`` is ``None`` when the model has none; with
    ``vocab_size`` set, only the first ``vocab_size`` rows are real tokens.
    """

    weight: Tensor
    bias: Optional[Tensor] = None
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    hidden_scale: float = 1.0
    vocab_size: Optional[int] = None  # score only the first rows (models with a padded head)


# ----------------------------------------------------------------------------- the head


def _text_config(model: nn.Module):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _attr(config, name, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


def _softcap(name="final_logit_softcapping"):
    return lambda c: {"softcap": _attr(c, name)}


def _divide_by_logits_scaling(c):
    return {"logit_scale": 1.0 / _attr(c, "logits_scaling", 1.0)}


# model_type (of the model that is run, i.e. model.config) → the transforms its forward applies,
# read from its text config (transformers 5.23; each entry checked against the modeling code).
# z = softcap·tanh(logit_scale·(hidden_scale·h·Wᵀ + b)/softcap) over the first vocab_size rows.
_TRANSFORMS: dict[str, Callable[[Any], dict]] = {
    **dict.fromkeys(
        (
            "gemma2",
            "gemma3_text",
            "gemma3n",
            "gemma3n_text",
            "gemma4",
            "gemma4_text",
            "gemma4_unified",
            "vaultgemma",
            "nanochat",
            "beam",
            "paligemma",
            "mistral_large4",
        ),
        _softcap(),
    ),
    "recurrent_gemma": _softcap("logits_soft_cap"),
    "xlstm": _softcap("output_logit_soft_cap"),
    **dict.fromkeys(
        ("inkling2", "inkling2_text"),
        lambda c: {
            "softcap": _attr(c, "final_logit_softcapping"),
            "vocab_size": _attr(c, "unpadded_vocab_size"),
        },
    ),
    **dict.fromkeys(
        ("muse_spark", "muse_glimmer"),
        lambda c: {
            "logit_scale": _attr(c, "output_multiplier", 1.0),
            "softcap": _attr(c, "final_logit_softcapping"),
        },
    ),
    **dict.fromkeys(
        ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
        lambda c: {"logit_scale": _attr(c, "logit_scale", 1.0)},
    ),
    **dict.fromkeys(
        (
            "granite",
            "granite_swa",
            "granitemoe",
            "granitemoe_swa",
            "granitemoehybrid",
            "granitemoeshared",
            "granite4_vision",
            "granite_docling",
        ),
        _divide_by_logits_scaling,
    ),
    **dict.fromkeys(
        ("hyperclovax", "hyperclovax_vision_v2"),
        lambda c: {"logit_scale": _attr(c, "logits_scaling", 1.0)},
    ),
    "falcon_h1": lambda c: {"logit_scale": _attr(c, "lm_head_multiplier", 1.0)},
    "minicpm3": lambda c: {"hidden_scale": 1.0 / c.logits_scaling},
    **dict.fromkeys(
        ("inkling", "inkling_text"),
        lambda c: {
            "hidden_scale": 1.0 / _attr(c, "logits_mup_width_multiplier", 1.0),
            "vocab_size": _attr(c, "unpadded_vocab_size"),
        },
    ),
    # Wrappers whose forward does NOT apply their text backbone's transform (plain head).
    **dict.fromkeys(
        ("gemma3", "aya_vision", "cohere2_vision", "granite_speech", "granite_speech_plus", "mpt"),
        lambda c: {},
    ),
}

# Heads that are not a linear layer on the backbone's last hidden state, or that mask / sparsify
# the logits: their log-probs cannot come from (weight, bias).
_UNSUPPORTED = {
    "modernbert-decoder": "its LM head is a dense + activation + norm prediction head",
    "modernbert_decoder": "its LM head is a dense + activation + norm prediction head",
    "chameleon": "its forward masks the image-token logits",
    "gemma4_assistant": "its forward builds sparse top-k logits",
    "gemma4_unified_assistant": "its forward builds sparse top-k logits",
    "clvp": "its head applies a final norm outside the backbone",
}

# Config fields that mean "the logits are transformed" somewhere in transformers: an unlisted
# model type carrying one with a non-neutral value is refused rather than guessed.
_TRANSFORM_FIELDS = {
    "final_logit_softcapping": None,
    "logits_soft_cap": None,
    "output_logit_soft_cap": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,
    "output_multiplier": 1.0,
    "logits_mup_width_multiplier": 1.0,
    "unpadded_vocab_size": None,
}


def _logit_transforms(model_type: str, config) -> dict:
    """The transforms model_type's forward applies to its logits (see _TRANSFORMS)."""
    if model_type in _UNSUPPORTED:
        raise NotImplementedError(
            f"model type {model_type!r} is not supported by the fused LM head: "
            f"{_UNSUPPORTED[model_type]}"
        )
    rule = _TRANSFORMS.get(model_type)
    if rule is not None:
        return rule(config)
    odd = {
        name: getattr(config, name)
        for name, neutral in _TRANSFORM_FIELDS.items()
        if getattr(config, name, None) not in (None, neutral)
    }
    if odd:
        raise NotImplementedError(
            f"model type {model_type!r} sets {odd}, which may transform its logits, and "
            "dpo_kernels does not know whether its forward applies them; please open an issue "
            "(or build LMHeadSpec yourself and call dpo_kernels.linear_logprobs)"
        )
    return {}


def _head_module(model: nn.Module) -> tuple[Optional[nn.Module], nn.Module]:
    """(wrapper of the LM head or None, the head) of a transformers model: an FSDP1 unit around
    the head alone is looked through (its forward is what unshards the head)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned "
            "None): pass a causal LM (…ForCausalLM / …ForConditionalGeneration)"
        )
    if not any(head is child for child in model.children()):
        raise TypeError(
            f"the LM head of {type(model).__name__} ({type(head).__name__}) is not a direct "
            "submodule: its logits go through other layers, which the fused head cannot apply"
        )
    wrapper = None
    while _is_sync_wrapper(head):
        wrapper = wrapper or head
        head = head.module
    return wrapper, head


def lm_head_spec(model: nn.Module) -> LMHeadSpec:
    """The head and logit transforms of a causal LM, so that ``linear_logprobs`` with them
    reproduces ``model(...).logits`` (wrappers are looked through, see :func:`unwrap_model`).

    The tensors are the head's parameters as they are now: under a sharding engine, read them
    inside the head's forward (as :func:`sequence_logprobs` does), where they are whole.
    Raises ``TypeError`` for a head that is not a floating-point ``nn.Linear``-like layer (for
    example a 4-bit quantised head, whose packed weight the fused op cannot read).
    """
    return _head_spec(model, whole=True)


def _head_spec(model: nn.Module, whole: bool) -> LMHeadSpec:
    """:func:`lm_head_spec`; ``whole=False`` skips the check that the weight is ``(V, D)`` (outside
    its forward, a sharding engine leaves a rank's shard there, possibly empty)."""
    model = unwrap_model(model)
    _, head = _head_module(model)
    weight = getattr(head, "weight", None)
    if (
        not isinstance(weight, Tensor)
        or not weight.dtype.is_floating_point
        or (whole and weight.dim() != 2)
    ):
        raise TypeError(
            f"the LM head {type(head).__name__} must hold a floating-point (V, D) weight; got "
            f"{None if weight is None else (tuple(weight.shape), weight.dtype)} "
            "(quantised heads are not supported: keep lm_head in 16/32-bit)"
        )
    if type(head).forward is not nn.Linear.forward and not isinstance(head, nn.Linear):
        raise TypeError(
            f"the LM head {type(head).__name__} is not a linear layer; its logits cannot be "
            "recomputed from (weight, bias)"
        )
    bias = getattr(head, "bias", None)
    transforms = _logit_transforms(getattr(model.config, "model_type", ""), _text_config(model))
    return LMHeadSpec(weight, bias, **transforms)


# ----------------------------------------------------------------------------- wrappers


@functools.cache
def _sync_wrapper_types() -> tuple[type, ...]:
    """Wrappers whose forward must run for gradients to be synchronised (DDP's reducer is armed
    in its forward; FSDP1 unshards there)."""
    types: list[type] = [nn.parallel.DistributedDataParallel]
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    return tuple(types)


def _is_sync_wrapper(module: nn.Module) -> bool:
    if isinstance(module, _sync_wrapper_types()):
        return True
    return type(module).__name__ == "DeepSpeedEngine" and isinstance(
        getattr(module, "module", None), nn.Module
    )


def _is_peft(module: nn.Module) -> bool:
    return callable(getattr(module, "get_base_model", None)) and hasattr(module, "peft_config")


def _peel(model: nn.Module) -> tuple[Optional[nn.Module], nn.Module]:
    """(outermost synchronising wrapper or None, the transformers model inside)."""
    wrapper = None
    while True:
        if _is_sync_wrapper(model):
            wrapper = wrapper or model
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif _is_peft(model):
            config = getattr(model, "active_peft_config", None)
            if getattr(config, "is_prompt_learning", False):
                raise NotImplementedError(
                    "prompt-learning PEFT methods (prefix/prompt tuning) prepend virtual tokens "
                    "inside PeftModel.forward; dpo_kernels supports adapter methods such as LoRA"
                )
            model = model.get_base_model()  # adapters stay injected in its layers
        else:
            return wrapper, model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / FSDP / DeepSpeed / ``torch.compile`` / PEFT wrappers
    (a PEFT model's base model still runs its adapters)."""
    return _peel(model)[1]


def _call_through(module: nn.Module, wrapper: Optional[nn.Module], fn: Callable[..., Any], *args):
    """Run ``fn(*args)`` as the forward of ``module``: call the outermost wrapper (or the module)
    with ``args`` and its inner module's ``forward`` redirected to ``fn`` for this one call, so
    wrapper logic and module hooks (DDP's reducer, FSDP's unshard / reshard and gradient
    reduction, ZeRO-3's parameter fetch) run as in a normal forward."""
    target = wrapper.module if wrapper is not None else module
    outer = wrapper if wrapper is not None else module
    missing = object()
    saved = target.__dict__.get("forward", missing)  # e.g. TRL's or accelerate's patched forward

    def restore():
        if saved is missing:
            target.__dict__.pop("forward", None)
        else:
            target.forward = saved

    def redirected(*call_args, **kwargs):
        restore()
        return fn(*call_args)

    target.forward = redirected
    try:
        return outer(*args)
    finally:
        restore()


def _whole_head(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The head's tensors as one rank's whole ``(V, D)`` / ``(V,)``, read inside the head's
    forward. Sharding engines have made them whole by then (FSDP2 and FSDP1 unshard, ZeRO-3
    fetches); what is still sharded is a head nobody manages: a ``DTensor`` set by hand is
    gathered as ``full_tensor()`` would (plain torch's semantics), a ZeRO-3 partition that
    the engine did not fetch is an error, not a guess."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and getattr(p, "ds_status", None) is not None:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            if p.ds_status != ZeroParamStatus.AVAILABLE:
                raise RuntimeError(
                    f"the LM head's {name} is a ZeRO-3 partition that was not gathered for the "
                    "call: run the model through the DeepSpeed engine (deepspeed.initialize), "
                    "whose hooks fetch it"
                )
    full = getattr(weight, "full_tensor", None)
    if callable(full):  # torch.distributed.tensor.DTensor
        weight = full()
        if bias is not None and callable(getattr(bias, "full_tensor", None)):
            bias = bias.full_tensor()
    return weight, bias


# ----------------------------------------------------------------------------- log-probs


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "base_model", None)
    if backbone is model:  # Llama4ForCausalLM: its prefix names nothing; the backbone is .model
        backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise TypeError(
            f"cannot find the backbone of {type(model).__name__} (its base_model_prefix "
            f"{getattr(model, 'base_model_prefix', None)!r} names no submodule)"
        )
    return backbone


_LOAD_BALANCING_ARGS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def _router_aux_loss_spec(hf_model: nn.Module) -> tuple[Callable[..., Tensor], int, int]:
    """``(load_balancing_loss_func, num_experts, top_k)`` as ``hf_model``'s forward uses them with
    ``output_router_logits=True``: the function of its own modeling module (the first class of
    its MRO whose module has one; else Mixtral's, which TRL uses for every family), the counts
    from the model (``self.num_experts``) or else its text config (wrappers read them there)."""
    func = None
    for cls in type(hf_model).__mro__:
        func = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if func is not None:
            break
    if func is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as func
    if list(inspect.signature(func).parameters) != _LOAD_BALANCING_ARGS:
        raise NotImplementedError(
            f"the router auxiliary loss of {type(hf_model).__name__} is not the Switch-style "
            "load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask) of the "
            "decoder MoE families (Mixtral, Qwen-MoE, ...); dpo_kernels cannot reproduce it"
        )
    config = _text_config(hf_model)

    def count(names):
        for owner, name in ((hf_model, names[0]), *((config, n) for n in names)):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
        raise TypeError(
            f"router_aux_loss=True, but {type(hf_model).__name__} declares no {names[0]} "
            "(is it a Mixture-of-Experts model?)"
        )

    return func, count(["num_experts", "num_local_experts"]), count(["num_experts_per_tok"])


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    completion_mask: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    reduction: str = "sum",
    temperature: float = 1.0,
    backend: str = "auto",
    router_aux_loss: bool = False,
    **model_kwargs: Any,
) -> LogProbStats:
    """Per-sequence log-probs of a causal LM's own tokens, with the fused op.

    Shapes: ``input_ids (B, T)``; ``attention_mask (B, T)`` 1 on real tokens (default: all);
    ``completion_mask (B, T)`` 1 on the tokens to score (default: every real token). Token
    ``t ≥ 1`` is scored from the hidden state at ``t − 1``::

        logps[b] = Σ_{t ≥ 1, completion_mask[b, t] · attention_mask[b, t]} log p(x_t | x_<t)

    Returns :class:`~dpo_kernels.LogProbStats` over the scored tokens: ``(B,)`` each, or
    ``(B, T − 1)`` per token with ``reduction="none"``. ``model`` is a transformers causal LM,
    possibly inside PEFT / DDP / FSDP / DeepSpeed / ``torch.compile`` wrappers;
    ``model_kwargs`` go to its backbone (e.g. ``pixel_values``, ``position_ids``).

    Mixed precision: the call runs the backbone and head in place of the model's ``forward``, so
    an autocast that ``accelerate`` wrapped around that ``forward`` (``Accelerator(
    mixed_precision="bf16")``, a Trainer's ``bf16=True``) does not apply: call it inside
    ``accelerator.autocast()`` (the TRL drop-in does) or ``torch.autocast``.

    ``router_aux_loss=True`` (Mixture-of-Experts models): the backbone also returns its router
    logits (``output_router_logits=True``) and the result is ``(stats, aux_loss)``, with
    ``aux_loss`` the 0-d load-balancing loss exactly as the model's own forward computes it
    (unscaled: multiply by ``router_aux_loss_coef`` yourself), with its gradient to the routers.

    **Packed rows** (padding-free), with ``cu_seqlens``: ``input_ids (1, N)`` (or ``(N,)``) holds
    ``S`` sequences back to back, sequence ``s`` at ``[cu_seqlens[s], cu_seqlens[s + 1])``
    (``cu_seqlens (S + 1,)`` integer offsets from 0 to N); ``completion_mask`` is shaped like
    ``input_ids``; ``attention_mask`` must be None (there is no padding). The backbone runs once
    with position ids restarting at 0 in each sequence and attention kept inside each sequence
    (see the module docstring for the attention implementations this allows; others raise
    ``NotImplementedError``): on the one row with flash attention, on rows as long as the
    longest sequence with eager / sdpa (their masked attention costs a row's length squared;
    see ``_Packing``). Token ``t`` is scored from the hidden state at ``t − 1`` of
    the same sequence (a sequence's first token never is)::

        logps[s] = Σ_{t in s, t > cu_seqlens[s], completion_mask[t]} log p(x_t | x_{s, <t})

    Returns ``(S,)`` fields, or with ``reduction="none"`` per-token fields shaped like
    ``input_ids`` (entry ``t`` for token ``t``, 0 where it is not scored). The result equals the
    padded call on the same sequences (right-padded, positions from 0). ``model_kwargs`` may
    hold flags only (no per-token tensors, no ``position_ids``: they come from ``cu_seqlens``);
    with ``router_aux_loss``, every packed token counts, as every unpadded token does in a padded
    call.
    """
    return _sequence_call(
        model,
        input_ids,
        attention_mask,
        completion_mask,
        reduction,
        temperature,
        backend,
        model_kwargs,
        None,
        router_aux_loss=router_aux_loss,
        cu_seqlens=cu_seqlens,
    )


def sequence_pair_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    completion_mask: Optional[Tensor],
    chunk_loss: loss_path.ChunkLoss,
    *,
    separable: bool = True,
    temperature: float = 1.0,
    backend: str = "auto",
    router_aux_loss: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    **model_kwargs: Any,
) -> tuple[Optional[Tensor], LogProbStats]:
    """:func:`sequence_logprobs` of a batch of pairs (chosen sequences first) whose loss is known
    to the caller: the loss-level path of :mod:`dpo_kernels.loss_path` where it applies (no
    recompute of the logits in the backward).

    ``chunk_loss(stats, pairs)`` is the loss's contribution of the pairs ``pairs`` (a slice)
    from their statistics (chosen sequences first, ``logps`` the per-sequence sums), normalised
    so that the contributions of disjoint chunks add up to the batch's loss; ``separable``: the
    loss is a sum of per-pair terms. Returns ``(carrier, stats)``: on the path, a 0-d zero whose
    gradient is the loss's (add it to the loss computed from the detached ``stats``); where the
    path does not apply, ``None`` and ``stats`` whose ``logps`` carry the gradient as
    :func:`sequence_logprobs`'s do. ``router_aux_loss=True``: ``(carrier, stats, aux_loss)``, the
    MoE load-balancing loss as in :func:`sequence_logprobs` (not part of ``chunk_loss``: add
    ``router_aux_loss_coef * aux_loss`` to the loss yourself). ``cu_seqlens``: one packed row of
    the batch's sequences (chosen ones first), as :func:`sequence_logprobs` takes it.
    """
    return _sequence_call(
        model,
        input_ids,
        attention_mask,
        completion_mask,
        "sum",
        temperature,
        backend,
        model_kwargs,
        (chunk_loss, separable),
        router_aux_loss=router_aux_loss,
        cu_seqlens=cu_seqlens,
    )


def _sequence_call(
    model,
    input_ids,
    attention_mask,
    completion_mask,
    reduction,
    temperature,
    backend,
    model_kwargs,
    pair,
    *,
    router_aux_loss=False,
    cu_seqlens=None,
):
    """The body of :func:`sequence_logprobs` and :func:`sequence_pair_loss` (``pair``: None, or
    ``(chunk_loss, separable)``; ``router_aux_loss``: also return the MoE load-balancing loss;
    ``cu_seqlens``: one packed row, see :func:`sequence_logprobs`)."""
    if cu_seqlens is not None:
        _check_packed_inputs(input_ids, attention_mask, completion_mask, cu_seqlens, model_kwargs)
    else:
        _check_padded_inputs(input_ids, attention_mask, completion_mask)
    wrapper, hf_model = _peel(model)
    _head_spec(hf_model, whole=False)  # refuse an unsupported head before running the backbone
    backbone = _backbone(hf_model)

    packing = None
    if cu_seqlens is not None:
        packing = _Packing.build(hf_model, input_ids, completion_mask, cu_seqlens)
        labels = packing.labels
    else:
        scored = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            scored &= attention_mask.bool()
        if completion_mask is not None:
            scored &= completion_mask.bool()
        labels = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100)
    model_kwargs.setdefault("use_cache", False)
    if router_aux_loss:
        aux_loss_func, num_experts, top_k = _router_aux_loss_spec(hf_model)
        model_kwargs["output_router_logits"] = True

    head_wrapper, head = _head_module(hf_model)

    def head_forward(hidden):
        # Inside the head's own forward: its engine hooks have run, so this reads the head as a
        # plain forward would see it (FSDP2 / FSDP1 unsharded, ZeRO-3 fetched), and its
        # gradient goes where that forward's would (the engine's own reduction).
        live = lm_head_spec(hf_model)
        hidden = hidden.to(live.weight.device)
        logit_scale = live.logit_scale
        if live.hidden_scale != 1.0:
            if live.bias is None:  # (c·h)·Wᵀ = c·(h·Wᵀ): fold into the logit scale, no copy
                logit_scale *= live.hidden_scale
            else:
                hidden = hidden * live.hidden_scale
        weight, bias = _whole_head(live.weight, live.bias)
        if live.vocab_size is not None:
            weight = weight[: live.vocab_size]
            bias = bias[: live.vocab_size] if bias is not None else None
        labels_w = labels.to(weight.device)
        chunks = None
        cu = None if packing is None else packing.cu_seqlens.to(weight.device)
        if pair is not None:
            chunks = loss_path.plan(
                hidden,
                weight,
                bias,
                labels_w,
                ignore_index=-100,
                backend=backend,
                separable=pair[1],
                cu_seqlens=cu,
            )
        if isinstance(chunks, list):
            return loss_path.fused_pair_loss(
                hidden,
                weight,
                labels_w,
                bias,
                pair[0],
                chunks,
                backend=backend,
                softcap=live.softcap,
                temperature=temperature,
                logit_scale=logit_scale,
                cu_seqlens=cu,
            )
        stats = linear_logprobs(
            hidden,
            weight,
            labels_w,
            bias,
            reduction=reduction,
            cu_seqlens=cu,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=live.softcap,
            return_stats=True,
            backend=backend,
        )
        if packing is not None and reduction == "none":
            stats = packing.per_input_token(stats, input_ids.shape)
        return stats if pair is None else (None, stats)

    def fused_forward():
        if packing is None:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        else:
            with packing.attention_check(hf_model):
                out = backbone(
                    input_ids=packing.input_ids, **packing.backbone_kwargs, **model_kwargs
                )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # padded: position t predicts t + 1; packed: every row of the (1, N) row is scored
        # against its own label (ignored at each sequence's last token)
        hidden = hidden[:, :-1] if packing is None else hidden.reshape(-1, hidden.shape[-1])
        result = _call_through(head, head_wrapper, head_forward, hidden)
        if not router_aux_loss:
            return result
        router_logits = getattr(out, "router_logits", None)
        if isinstance(router_logits, list):
            router_logits = tuple(router_logits)
        if not isinstance(router_logits, tuple) or not router_logits:
            raise ValueError(
                f"router_aux_loss=True, but the backbone of {type(hf_model).__name__} returned no "
                "router logits with output_router_logits=True"
            )
        # As the model's own forward: the attention mask it was given (None: every token counts,
        # as in a packed row, where every token is real).
        mask = attention_mask if packing is None else packing.real.long()  # not rows' tails
        aux_loss = aux_loss_func(router_logits, num_experts, top_k, mask)
        return (result, aux_loss) if pair is None else (*result, aux_loss)

    return _call_through(model, wrapper, fused_forward)


def _shape(t) -> Any:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check_padded_inputs(input_ids, attention_mask, completion_mask) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, T) tensor, got {_shape(input_ids)}")
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids needs at least 2 positions to score one, got T={input_ids.shape[1]}"
        )
    for name, mask in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != input_ids.shape):
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{_shape(mask)}"
            )


# ----------------------------------------------------------------------------- packed rows

# Model inputs a packed call derives itself (from cu_seqlens), so a caller must not pass them.
_PACKING_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Layer types (config.layer_types) whose only coupling of tokens is attention under a mask.
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Implementations whose 4D mask transformers' masking utilities build from packed position ids.
_MASKED_ATTENTION = ("eager", "sdpa")
# hf model → the attention implementations whose packed masks were seen to keep sequences apart.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def _check_packed_inputs(input_ids, attention_mask, completion_mask, cu_seqlens, model_kwargs):
    if not isinstance(input_ids, Tensor) or not (
        input_ids.dim() == 1 or (input_ids.dim() == 2 and input_ids.shape[0] == 1)
    ):
        raise ValueError(
            f"with cu_seqlens, input_ids must be one packed row (N,) or (1, N), got "
            f"{_shape(input_ids)}"
        )
    if input_ids.shape[-1] < 1:
        raise ValueError("with cu_seqlens, input_ids must hold at least one token")
    if attention_mask is not None:
        raise ValueError(
            "with cu_seqlens, attention_mask must be None: a packed row has no padding, and "
            "its sequences are kept apart by position ids restarting at 0 (an attention mask "
            "would switch that off in transformers)"
        )
    if completion_mask is not None and (
        not isinstance(completion_mask, Tensor) or completion_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"completion_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{_shape(completion_mask)}"
        )
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if (
        cu_seqlens.dtype.is_floating_point
        or cu_seqlens.dtype.is_complex
        or (cu_seqlens.dtype == torch.bool)
    ):
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D (S + 1,) offsets with S >= 1, got {_shape(cu_seqlens)}"
        )
    if cu_seqlens.device.type == "cpu":  # free to read here; on a GPU the op checks on device
        n, cu = input_ids.shape[-1], cu_seqlens
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            shown = cu.tolist()
            shown = f"{shown[:8]}..." if len(shown) > 8 else f"{shown}"
            raise ValueError(
                f"cu_seqlens must rise from 0 to the row's length N={n} without decreasing, "
                f"got {shown} (ending at {int(cu[-1])})"
            )
    derived = [k for k in _PACKING_KWARGS if k in model_kwargs]
    if derived:
        raise ValueError(
            f"with cu_seqlens, {', '.join(derived)} must not be passed: packed calls derive "
            "them from cu_seqlens"
        )
    if model_kwargs.get("use_cache"):
        raise ValueError(
            "use_cache=True cannot be used with packed rows (transformers only separates "
            "packed sequences without a cache)"
        )
    tensors = sorted(k for k, v in model_kwargs.items() if isinstance(v, Tensor))
    if tensors:
        raise NotImplementedError(
            f"packed rows (cu_seqlens) run the backbone on input_ids and position ids only; "
            f"{', '.join(tensors)} cannot be packed by dpo_kernels (use the padded call)"
        )


def _is_flash(impl: str) -> bool:
    """``impl`` runs transformers' own flash-attention wrapper, whose varlen path keeps packed
    sequences apart (``flash_attention_2/3/4``, and Hub flash kernels registered with it; a
    kernel registered with its own function may ignore the sequence offsets)."""
    try:
        from transformers.integrations.flash_attention import flash_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    return (
        impl in ALL_ATTENTION_FUNCTIONS and ALL_ATTENTION_FUNCTIONS[impl] is flash_attention_forward
    )


def packed_attention_implementation(model: nn.Module) -> str:
    """The attention implementation ``model`` runs packed rows with, if it keeps attention inside
    each sequence (see the module docstring); else ``NotImplementedError`` naming what is not
    supported. Wrappers are looked through (:func:`unwrap_model`)."""
    hf_model = unwrap_model(model)
    config = _text_config(hf_model)
    name = type(hf_model).__name__
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str) or not (impl in _MASKED_ATTENTION or _is_flash(impl)):
        raise NotImplementedError(
            f"padding-free (packed) sequences are not supported with attn_implementation="
            f"{impl!r} of {name}: dpo_kernels keeps packed sequences apart with 'eager', "
            "'sdpa' or transformers' flash attention ('flash_attention_2' / '_3' / '_4', or a "
            "Hub flash kernel run through it). Load the model with one of those (e.g. "
            "attn_implementation='sdpa'), or use padded batches"
        )
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({str(t) for t in layer_types} - _ATTENTION_LAYERS)
    if other:
        raise NotImplementedError(
            f"padding-free (packed) sequences are not supported for {name}: its layer types "
            f"{other} are not masked attention, and would carry state from one packed "
            "sequence into the next; use padded batches"
        )
    return impl


@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self`` (empty if it cannot be read)."""
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return ()
    return tuple(params[1:])


def _attention_layers(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost modules whose forward takes an ``attention_mask``: the attention layers
    (a decoder layer, the backbone and the model take one too, but pass it on)."""
    takes = [
        (name, m)
        for name, m in hf_model.named_modules()
        if "attention_mask" in _forward_parameters(type(m))
    ]
    names = [name for name, _ in takes]
    return [
        (name, m)
        for name, m in takes
        if not any(o != name and o.startswith(f"{name}." if name else "") for o in names)
    ]


def _argument(module: nn.Module, args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    params = _forward_parameters(type(module))
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


@dataclasses.dataclass
class _Packing:
    """A packed batch prepared for the backbone and the head.

    With flash attention (varlen: cost Σ Lᵢ²) the sequences run as the one row given. With
    eager and sdpa the attention is a block-diagonal mask over a whole row, whose cost is the
    row's length squared: one row of N tokens would cost N² per layer where padding costs
    B·T² (8 sequences of 1k packed: 8× padding's attention). So there the sequences are laid,
    in order, into rows of the longest sequence's length T, a new row when the next one does
    not fit: attention at most padding's, linear layers on the real tokens plus the rows' tails.
    A row's tail continues its last sequence (positions counting on, labels ignored), so every
    row is contiguous sequences and the head's segments (``cu_seqlens`` of the flattened rows)
    stay in the caller's order.
    """

    input_ids: Tensor  # (R, C): the rows the backbone runs
    labels: Tensor  # (R·C,): the target of flattened hidden row t (-100: none)
    cu_seqlens: Tensor  # (S + 1,) int64: the sequences' segments of the flattened rows
    seq: Tensor  # (R, C): the sequence of each position (a tail: its row's last sequence)
    position_ids: Tensor  # (R, C), from 0 in each sequence
    real: Tensor  # (R, C) bool: the caller's tokens (not a row's tail)
    dest: Tensor  # (N,): where each of the caller's tokens went in the flattened rows
    impl: str
    backbone_kwargs: dict

    @classmethod
    def build(cls, hf_model, input_ids, completion_mask, cu_seqlens) -> _Packing:
        impl = packed_attention_implementation(hf_model)
        ids = input_ids.reshape(-1)
        n, device = ids.shape[0], ids.device
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        pos = torch.arange(n, device=device)
        seq = torch.searchsorted(cu, pos, right=True) - 1  # empty sequences are skipped over
        # Hidden row t predicts token t + 1 when both lie in one sequence and t + 1 is scored.
        keep = seq[1:] == seq[:-1]
        if completion_mask is not None:
            keep &= completion_mask.reshape(-1)[1:].bool()
        labels = torch.full_like(ids, -100)
        labels[:-1] = ids[1:].masked_fill(~keep, -100)

        flash = _is_flash(impl)
        lengths = (cu[1:] - cu[:-1]).tolist()  # one host read
        width = n if flash else max(max(lengths, default=1), 1)
        starts, row, used = [], 0, 0
        for length in lengths:  # in order: a new row when the next sequence does not fit
            if used and used + length > width:
                row, used = row + 1, 0
            starts.append(row * width + used)
            used += length
        rows = row + 1
        total = rows * width
        cu_flat = torch.tensor(starts + [total], dtype=torch.int64, device=device)
        dest = cu_flat[seq] + (pos - cu[seq])
        flat = torch.arange(total, device=device)
        seq_flat = torch.searchsorted(cu_flat, flat, right=True) - 1
        position_ids = (flat - cu_flat[seq_flat]).view(rows, width)
        ids_flat = torch.zeros(total, dtype=ids.dtype, device=device).index_copy_(0, dest, ids)
        labels_flat = torch.full((total,), -100, dtype=labels.dtype, device=device)
        labels_flat.index_copy_(0, dest, labels)
        real = torch.zeros(total, dtype=torch.bool, device=device)
        real[dest] = True
        kwargs = {"position_ids": position_ids, "attention_mask": None}
        if flash:
            # transformers' varlen path; without these it reads them from the position ids in
            # every layer (a host sync per layer), here once per call
            cu32 = cu_flat.to(torch.int32)
            longest = max(lengths, default=0)
            kwargs.update(
                cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=longest, max_length_k=longest
            )
        return cls(
            ids_flat.view(rows, width),
            labels_flat,
            cu_flat,
            seq_flat.view(rows, width),
            position_ids,
            real.view(rows, width),
            dest,
            impl,
            kwargs,
        )

    def per_input_token(self, stats: LogProbStats, shape) -> LogProbStats:
        """Per-token stats of the flattened hidden rows (row t scores token t + 1) moved onto
        the caller's tokens they score, shaped like ``input_ids`` (0 at each sequence's first
        token)."""
        return LogProbStats(
            *(torch.cat([f.new_zeros(1), f[self.dest][:-1]]).reshape(shape) for f in stats)
        )

    @contextlib.contextmanager
    def attention_check(self, hf_model: nn.Module):
        """Verifies, on the first packed call of ``hf_model`` with this attention implementation
        (and with two sequences or more), that every attention layer gets a mask that never
        joins two sequences (flash attention: the sequence offsets or position ids)."""
        if self.impl in _VERIFIED.get(hf_model, ()):
            yield
            return
        shared = (self.seq[:, 1:] != self.seq[:, :-1]) & self.real[:, 1:]
        if not bool(shared.any()):
            yield  # no row holds two sequences: nothing to keep apart, nothing to learn
            return
        flash = _is_flash(self.impl)
        width = self.seq.shape[1]
        seen, masks = [], []
        name_of = type(hf_model).__name__

        def refuse(layer, why):
            raise NotImplementedError(
                f"padding-free (packed) sequences: attention layer {layer!r} of {name_of} "
                f"(attn_implementation={self.impl!r}) {why}, so it would attend across the "
                "packed sequences; this model's code does not support packed sequences, use "
                "padded batches"
            )

        def hook_for(layer):
            def hook(module, args, kwargs):
                mask = _argument(module, args, kwargs, "attention_mask")
                if flash:
                    if mask is not None:
                        refuse(layer, "got a padding mask instead of the sequence offsets")
                    if not any(
                        _argument(module, args, kwargs, key) is self.backbone_kwargs.get(key)
                        for key in ("position_ids", "cu_seq_lens_q")
                    ):
                        refuse(layer, "did not receive the packed position ids")
                elif not isinstance(mask, Tensor) or mask.dim() != 4:
                    refuse(layer, f"got no 4D attention mask (got {_shape(mask)})")
                elif tuple(mask.shape[-2:]) != (width, width):
                    refuse(layer, f"got a mask of shape {tuple(mask.shape)} for rows of {width}")
                elif not any(mask is m for m in masks):
                    masks.append(mask)
                    allowed = (
                        mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
                    )
                    seq = self.seq.to(mask.device)  # (R, C): pairs of one row
                    apart = (seq[:, :, None] != seq[:, None, :])[:, None]
                    if bool((allowed & apart).any()):
                        refuse(layer, "got a mask that joins tokens of different sequences")
                seen.append(layer)

            return hook

        handles = [
            m.register_forward_pre_hook(hook_for(name), with_kwargs=True)
            for name, m in _attention_layers(hf_model)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if not seen:
            raise NotImplementedError(
                f"padding-free (packed) sequences: no attention layer of {name_of} received an "
                "attention mask, so dpo_kernels cannot check that attention stays inside each "
                "packed sequence; use padded batches"
            )
        _VERIFIED.setdefault(hf_model, set()).add(self.impl)


def pack_padded(attention_mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Packs the real tokens of a padded batch into one row, for :func:`sequence_logprobs`'s
    ``cu_seqlens`` mode.

    ``attention_mask (B, T)`` 1 on real tokens, ``tensors`` ``(B, T)`` each (``input_ids``,
    ``completion_mask``, ...). Returns ``(cu_seqlens (B + 1,) int64, *packed)`` with each packed
    tensor ``(1, N)``, ``N`` the number of real tokens, row ``b``'s tokens in order at
    ``[cu_seqlens[b], cu_seqlens[b + 1])``. (On a GPU, selecting the real tokens reads their
    count on the host once.)
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (B, T) tensor, got {_shape(attention_mask)}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.shape != attention_mask.shape:
            raise ValueError(
                f"tensor {i} must have the shape of attention_mask "
                f"{tuple(attention_mask.shape)}, got {_shape(t)}"
            )
    keep = attention_mask.bool()
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep.sum(dim=1), 0, out=cu[1:])
    return (cu, *(t[keep].unsqueeze(0) for t in tensors))
