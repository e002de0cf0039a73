"""The methods a benchmark compares: ours and every peer, on the same inputs.

Each method is a function ``build(inputs) -> step`` where ``step()`` runs one workload and returns
the loss (a 0-d tensor, detached). Workloads:

- ``logprobs_fwd_bwd``: the policy's per-sequence log-probs, forward + backward (of their sum);
- ``dpo_step``: policy forward + backward, reference forward (no autograd), sigmoid DPO loss
  (ours and Liger's through their ``FusedLinearDPOLoss`` modules, as a user runs them);
  ``dpo_kernels_recompute`` is ours with the loss-level fast path off
  (``DPO_KERNELS_LOSS_PATH=recompute``: the plain op, recompute in the backward), so a table shows
  the fast path, that path and the peers side by side;
- ``trainer_step``: one optimizer step of a whole DPO trainer (ours padded, packed, recompute;
  stock TRL's) on a small Llama with a real-size head: :mod:`dpo_kernels.bench.trainer_step`.

Peers compute per-token log-probs their own way; the sum over a sequence's valid tokens and the
loss on top are the same plain torch for all of them, so only the LM-head part differs.

Work per step (:func:`work`), the same for every method so that rates compare: with ``Nv`` scored
(non-ignored) tokens, hidden size ``D``, vocab ``V`` and ``s`` bytes per element of the input
dtype, a step is ``k`` passes of the ``[Nv × D]·[D × V]`` logits GEMM's size — ``k = 3`` for
``logprobs_fwd_bwd`` (forward, backward dH, backward dW), ``k = 4`` for ``dpo_step`` and
``trainer_step`` (that plus the reference forward; for ``trainer_step`` the LM head's share only:
the backbone, embedding and optimizer are not counted):

    flops = 2·k·Nv·D·V            (6·Nv·D·V and 8·Nv·D·V)
    bytes = k·s·D·(V + Nv)        (each pass reads or writes the head once and the hidden rows once)

The byte count is the least memory traffic any implementation needs: the forward reads W and H,
the backward reads W and H again (the log-sum-exp must be known before any gradient) and writes dW
and dH, the reference forward reads its own W and H. Labels, per-token outputs and everything of
size ``Nv`` alone are left out; recomputation, logits and fp32 gradient buffers are the methods'
own overhead and not counted. Unused rows (prompt, padding) cost nothing in either count.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

#: The LM-head workloads (the default ones); ``trainer_step`` is :data:`TRAINER_WORKLOAD`.
WORKLOADS = ("logprobs_fwd_bwd", "dpo_step")
TRAINER_WORKLOAD = "trainer_step"
ALL_WORKLOADS = (*WORKLOADS, TRAINER_WORKLOAD)
#: The LM-head methods: what runs on WORKLOADS unless --methods says.
METHODS = ("dpo_kernels", "naive", "trl_chunked", "torch_lce", "liger", "cce")
#: The methods of trainer_step (what runs there unless --methods says);
#: ``dpo_kernels_recompute`` also runs on ``dpo_step`` when named.
TRAINER_METHODS = ("dpo_kernels", "dpo_kernels_recompute", "dpo_kernels_packed", "trl")
ALL_METHODS = tuple(dict.fromkeys(METHODS + TRAINER_METHODS))
#: Each workload's methods when --methods is not given. ``dpo_kernels_recompute`` is not in
#: dpo_step's: the default CPU job (dpo_step at llama3-8b) keeps its six runs and its time.
DEFAULT_METHODS = {
    "logprobs_fwd_bwd": METHODS,
    "dpo_step": METHODS,
    TRAINER_WORKLOAD: TRAINER_METHODS,
}
BETA = 0.1
IGNORE = -100
#: Passes of the [Nv × D]·[D × V] GEMM's size per step (see the module docstring).
GEMM_PASSES = {"logprobs_fwd_bwd": 3, "dpo_step": 4, TRAINER_WORKLOAD: 4}

#: The package each peer needs (None: torch itself).
REQUIRES = {
    "dpo_kernels": None,
    "dpo_kernels_recompute": None,
    "naive": None,
    "trl_chunked": "trl",
    "torch_lce": None,
    "liger": "liger_kernel",
    "cce": "cut_cross_entropy",
}
#: What trainer_step needs, for every method.
TRAINER_REQUIRES = ("trl", "transformers", "datasets", "tokenizers")
#: Methods with no logit softcap (Gemma 2): their rows say so instead of timing another problem.
NO_SOFTCAP = {
    "torch_lce": "F.linear_cross_entropy has no softcap",
    "liger": "LigerFusedLinearDPOLoss has no softcap",
}
#: Methods that compute only one of the LM-head workloads.
ONLY_WORKLOAD = {
    "liger": ("dpo_step", "LigerFusedLinearDPOLoss computes a DPO loss, not log-probs alone"),
    "dpo_kernels_recompute": (
        "dpo_step",
        "the plain op always recomputes: dpo_kernels' logprobs_fwd_bwd row is that path",
    ),
}


# ----------------------------------------------------------------------------- inputs and work


def prompt_len(seq_len: int, prompt_frac: float = 0.25) -> int:
    """Ignored (prompt) positions at the start of each sequence."""
    return int(seq_len * prompt_frac)


def scored_tokens(pairs: int, seq_len: int, prompt_frac: float = 0.25) -> int:
    """``Nv``: the tokens a workload scores (both sequences of each pair, prompt excluded)."""
    return 2 * pairs * (seq_len - prompt_len(seq_len, prompt_frac))


def work(workload: str, scored: int, hidden: int, vocab: int, dtype: str) -> tuple[int, int]:
    """(flops, bytes) of one step: useful FLOPs and least memory traffic (module docstring)."""
    k = GEMM_PASSES[workload]
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return 2 * k * scored * hidden * vocab, k * size * hidden * (vocab + scored)


@dataclass
class Inputs:
    """One workload's tensors: ``hidden (2P, T, D)`` (chosen rows first), ``weight (V, D)``,
    ``labels (2P, T)`` with the prompt ignored, and the reference model's ``ref_hidden``,
    ``ref_weight``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    workload: str
    softcap: Optional[float] = None


def make_inputs(
    pairs: int,
    seq_len: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    device: str,
    workload: str,
    prompt_frac: float = 0.25,
    seed: int = 0,
    softcap: Optional[float] = None,
) -> Inputs:
    # On CUDA the inputs are drawn on the device: a real head's two [V × D] fp32 draws take ~15 s
    # of one CPU core, paid by every run's process (same distributions; other values than CPU).
    gen = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen).manual_seed(seed)
    n = 2 * pairs
    h = torch.randn(n, seq_len, hidden, generator=g, device=gen)
    w = torch.randn(vocab, hidden, generator=g, device=gen).div_(hidden**0.5)
    labels = torch.randint(0, vocab, (n, seq_len), generator=g, device=gen)
    labels[:, : prompt_len(seq_len, prompt_frac)] = IGNORE
    ref_h = h + 0.05 * torch.randn(h.shape, generator=g, device=gen)
    # The reference head: the policy's plus a perturbation of 4,096 rows repeated down the vocab,
    # formed in place (a second [V x D] draw and fresh temporaries took ~6 s of every CPU run's
    # start at a real head: fresh pages cost more than the arithmetic there).
    block = torch.randn(min(vocab, 4096), hidden, generator=g, device=gen)
    ref_w = block.repeat(-(-vocab // block.shape[0]), 1)[:vocab]
    ref_w = ref_w.mul_(0.01 / hidden**0.5).add_(w)

    def put(t, grad=False):
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return Inputs(
        put(h, True), put(w, True), labels.to(device), put(ref_h), put(ref_w), workload, softcap
    )


# ----------------------------------------------------------------------------- the naive baseline


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Per-token log-probs the naive way (TRL <= 0.28, the DPO paper's code): ``hidden (..., D)``,
    ``weight (V, D)``, ``labels (...)`` -> ``(...)`` float32, 0 where ``labels == ignore_index``.

        logp = log_softmax(float32(hidden · Wᵀ))[label]    (logits → softcap·tanh(logits/softcap))

    Materialises the full float32 logits ``(..., V)``: the baseline every fused method avoids."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    tok = logits.log_softmax(dim=-1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1))
    return torch.where(valid, tok.squeeze(-1), 0.0)


# ----------------------------------------------------------------------------- shared step code


def _dpo_loss(pol: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    half = pol.shape[0] // 2
    logits = (pol[:half] - ref[:half]) - (pol[half:] - ref[half:])
    return -F.logsigmoid(BETA * logits).mean()


def _step(x: Inputs, seq_logps: Callable) -> Callable:
    def step():
        x.hidden.grad = x.weight.grad = None
        pol = seq_logps(x.hidden, x.weight)
        if x.workload == "logprobs_fwd_bwd":
            loss = pol.sum()
        else:
            with torch.no_grad():
                ref = seq_logps(x.ref_hidden, x.ref_weight)
            loss = _dpo_loss(pol, ref)
        loss.backward()
        return loss.detach()

    return step


def _module_step(x: Inputs, loss_fn) -> Callable:
    """A ``dpo_step`` through a Liger-style fused DPO loss module (``loss_fn(weight, input,
    target, ref_input=, ref_weight=)``)."""

    def step():
        x.hidden.grad = x.weight.grad = None
        loss, _ = loss_fn(
            x.weight, x.hidden, x.labels, ref_input=x.ref_hidden, ref_weight=x.ref_weight
        )
        loss.backward()
        return loss.detach()

    return step


def _per_token_method(per_token: Callable) -> Callable:
    """A method from a per-token log-prob function ``per_token(hidden2d, weight, labels1d,
    softcap)`` returning ``(N,)`` log-probs (anything at ignored positions; they are masked
    here)."""

    def build(x: Inputs):
        n, t, d = x.hidden.shape
        mask = x.labels != IGNORE

        def seq_logps(hidden, weight):
            tok = per_token(hidden.reshape(-1, d), weight, x.labels.reshape(-1), x.softcap)
            tok = tok.view(n, t)
            return torch.where(mask, tok.float(), 0.0).sum(dim=1)

        return _step(x, seq_logps)

    return build


# ----------------------------------------------------------------------------- the methods


def build_dpo_kernels(x: Inputs, loss_path: Optional[str] = None):
    """``logprobs_fwd_bwd``: :func:`dpo_kernels.linear_logprobs`; ``dpo_step``: what a user gets
    from :class:`dpo_kernels.FusedLinearDPOLoss` (the loss-level path where it applies), with
    ``DPO_KERNELS_LOSS_PATH=loss_path`` during each step where given. A ``dpo_step``'s
    ``step.info["loss_path"]`` says which path the module takes on these inputs: ``"fast (k
    chunks)"`` or ``"recompute: <why>"``."""
    import dpo_kernels as dk

    if x.workload != "dpo_step":
        return _step(x, lambda h, w: dk.linear_logprobs(h, w, x.labels, softcap=x.softcap))
    loss_fn = dk.FusedLinearDPOLoss(beta=BETA, use_ref_model=True, softcap=x.softcap)
    inner = _module_step(x, loss_fn)

    def step():
        with loss_path_env(loss_path):
            return inner()

    with loss_path_env(loss_path):
        step.info = {"loss_path": _planned_path(x, loss_fn)}
    return step


def build_dpo_kernels_recompute(x: Inputs):
    """``dpo_step`` through :class:`dpo_kernels.FusedLinearDPOLoss` with the loss-level fast path
    off (``DPO_KERNELS_LOSS_PATH=recompute``): today's path, the plain op with recompute."""
    return build_dpo_kernels(x, loss_path="recompute")


@contextlib.contextmanager
def loss_path_env(mode: Optional[str]):
    """``DPO_KERNELS_LOSS_PATH=mode`` inside the block (each call reads it), restored after;
    nothing changes where ``mode`` is None."""
    if mode is None:
        yield
        return
    old = os.environ.get("DPO_KERNELS_LOSS_PATH")
    os.environ["DPO_KERNELS_LOSS_PATH"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DPO_KERNELS_LOSS_PATH", None)
        else:
            os.environ["DPO_KERNELS_LOSS_PATH"] = old


def _planned_path(x: Inputs, loss_fn) -> str:
    """The path :class:`~dpo_kernels.FusedLinearDPOLoss` takes on ``x`` (its own planner, its
    own arguments)."""
    from dpo_kernels import loss_path

    chunks = loss_path.plan(
        x.hidden,
        x.weight,
        None,
        x.labels,
        ignore_index=loss_fn.ignore_index,
        backend=loss_fn.backend,
        separable=loss_fn.options.separable,
    )
    if isinstance(chunks, str):
        return f"recompute: {chunks}"
    return f"fast ({len(chunks)} chunk{'s' if len(chunks) != 1 else ''})"


def _trl_tok(h, w, labels, softcap):
    from trl.kernels import ChunkedLogProbFunction

    # As TRL's fused LM head does off Triton devices: every position scored, labels clamped.
    out = ChunkedLogProbFunction.apply(
        h, w, None, labels.clamp(min=0), 1.0, 32768, softcap, 1.0, ()
    )
    return out[0]


def _torch_lce_tok(h, w, labels, softcap):
    if softcap is not None:
        raise NotImplementedError(NO_SOFTCAP["torch_lce"])
    ce = F.linear_cross_entropy(
        h,
        w,
        labels,
        reduction="none",
        ignore_index=IGNORE,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return -ce


def _cce_tok(h, w, labels, softcap):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.is_cuda else "torch_compile"
    return -linear_cross_entropy(
        h, w, labels, ignore_index=IGNORE, reduction="none", impl=impl, softcap=softcap
    )


def build_liger(x: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    if x.workload != "dpo_step":
        raise NotImplementedError(ONLY_WORKLOAD["liger"][1])
    if x.softcap is not None:
        raise NotImplementedError(NO_SOFTCAP["liger"])
    return _module_step(x, LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True))


BUILDERS = {
    "dpo_kernels": build_dpo_kernels,
    "dpo_kernels_recompute": build_dpo_kernels_recompute,
    "naive": _per_token_method(naive_token_logprobs),
    "trl_chunked": _per_token_method(_trl_tok),
    "torch_lce": _per_token_method(_torch_lce_tok),
    "liger": build_liger,
    "cce": _per_token_method(_cce_tok),
}


def unavailable_reason(
    method: str, softcap: Optional[float] = None, workload: Optional[str] = None
) -> Optional[str]:
    """Why ``method`` cannot run here (a missing package or API, or a feature it lacks, or a
    workload it has no part in), or None."""
    if method not in ALL_METHODS:
        return f"unknown method {method!r}; expected one of {', '.join(ALL_METHODS)}"
    if workload == TRAINER_WORKLOAD:
        if method not in TRAINER_METHODS:
            return (
                f"{method} is an LM-head method; trainer_step runs whole trainers "
                f"({', '.join(TRAINER_METHODS)})"
            )
        if softcap is not None:
            return "trainer_step builds a Llama, which has no final-logit softcap"
        for pkg in TRAINER_REQUIRES:
            if importlib.util.find_spec(pkg) is None:
                return f"{pkg} is not installed"
        return None
    if method not in BUILDERS:
        return f"{method} runs a whole trainer: trainer_step only"
    if softcap is not None and method in NO_SOFTCAP:
        return NO_SOFTCAP[method]
    if workload is not None and method in ONLY_WORKLOAD and workload != ONLY_WORKLOAD[method][0]:
        return ONLY_WORKLOAD[method][1]
    pkg = REQUIRES[method]
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        return f"{pkg} is not installed"
    if method == "torch_lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no LinearCrossEntropyOptions (needs >= 2.13)"
    return None
