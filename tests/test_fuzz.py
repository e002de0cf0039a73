"""Property-based fuzzing of ``linear_logprobs`` against the float64 oracle (issue 17, item 2).

Hypothesis draws whole configurations — shapes around tile boundaries, dtype, layout, bias
(with ``-inf`` or ``-3e38`` lanes), temperature / logit_scale / softcap, logit magnitudes from
1e-3 to 1e36, ignore patterns and ignore_index, tied vocabulary rows, upstream gradients,
reduction, stats, a frozen head, and the backends' knobs (chunk budget, C++ split, Triton
sync-free) — as one frozen :class:`Case`; the tensors are made from ``Case.seed`` with a torch
generator (drawing every element through Hypothesis would be slow and shrink badly). Every value,
every statistic and the gradients of hidden / weight / bias are checked against
``helpers.naive_logprobs`` in float64 on the very same (rounded) inputs, with DESIGN.md's rule
``|ours − oracle| <= |torch_same_dtype − oracle| + tol`` and the non-finite rules of
:func:`check_close`.

The input space is cut into three regimes, each its own test per backend, so that a bug in one
(say, ``-inf`` bias lanes) cannot hide the others from the fuzzer:

- ``ordinary``: finite bias, logits of magnitude 1e-3 .. 10 (language-model logits);
- ``masked``: the same, with part of the vocabulary masked by a bias of ``-inf`` (or ``-3e38``);
- ``large``: logits of magnitude 30 .. 1e36.

The default run is deterministic (``derandomize``) and bounded (under a minute on 2 cores).
``DPO_KERNELS_FUZZ_LONG=1`` draws fresh examples every run, 13-20x as many, and prints a
``@reproduce_failure`` blob with a failure (no example database is kept; Hypothesis' own cache
in ``.hypothesis/`` ignores itself in git). A failure prints its ``Case(...)``: pin it,
minimised, in ``REGRESSIONS`` below (a parametrized test, not ``@example``: a failing explicit
example stops Hypothesis before it generates anything, so one open bug would blind the whole
fuzz test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dpo_kernels as dk  # noqa: E402

from .helpers import (  # noqa: E402
    FP32_GRAD_TOL,
    HALF_GRAD_ULPS,
    HAS_CUDA,
    HAS_TRITON,
    IGNORE,
    INTERPRET,
    VALUE_TOL,
    naive_logprobs,
)

LONG = os.environ.get("DPO_KERNELS_FUZZ_LONG", "0") == "1"
NO_CPP = os.environ.get("DPO_KERNELS_NO_CPP", "0") == "1"

# ----------------------------------------------------------------------------- the cases

# Token counts: 1, primes and tile boundaries ±1 (the C++ backend's packed row blocks are 16 and
# 64 wide, Triton's row blocks 16..64).
TOKENS = [1, 2, 3, 5, 7, 11, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65]
# Hidden sizes: odd, prime, powers of two ±1 (odd D also sends bf16 off brgemm's VNNI path).
DIMS = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 32, 33, 47, 63, 64, 65, 70]
# Vocabulary sizes: 1, primes and the 64k±1 pattern scaled down (the C++ backend's chunks are at
# most 512 columns, Triton's vocab tiles 32..256).
VOCABS = [1, 2, 3, 7, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300]
VOCABS += [509, 511, 512, 513, 600]
TINY = dict(tokens=20, dim=32, vocab=300)  # Triton under the interpreter


@dataclass(frozen=True)
class Case:
    """One fuzzed call. ``repr`` is valid Python: paste a failing one into ``REGRESSIONS``."""

    backend: str
    dtype: str = "float32"  # float32 | bfloat16 | float64 (torch only)
    layout: str = "padded"  # padded (B, T, D) | packed (N, D) + cu_seqlens | flat (N, D)
    shape: tuple = (1, 1)  # padded: (B, T); packed: the sequence lengths; flat: (N,)
    d: int = 8
    v: int = 17
    seed: int = 0  # the tensors' generator
    log10_mag: float = 0.0  # standard deviation of the raw logits h·w is 10**log10_mag
    split: float = 0.5  # hidden carries mag**split of it, weight the rest
    bias: str = "none"  # none | normal | offset (all lanes ~ +4 mag) | neg_inf | neg_huge (masked)
    mask: str = "random"  # which lanes: random | head | tail | all_but_one | one
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    ignore: str = "none"  # none | all | alternating | random
    ignore_index: int = IGNORE  # or -1, or 0 (a real token id: every target 0 is skipped too)
    junk_ignored: bool = False  # ignored rows' hidden states NaN / inf (padding may hold anything)
    labels: str = "random"  # random | argmax (half the targets the top logit) | masked lanes
    ties: bool = False  # some vocabulary rows copies of one row (untrained tokens): tied logits
    grad: str = "random"  # upstream gradient: random | zeros | sparse
    reduction: str = "sum"
    stats: bool = True
    frozen_head: bool = False  # only hidden needs a gradient (DPO_KERNELS_FROZEN_PATH=jacobian)
    chunk_mb: Optional[float] = None  # DPO_KERNELS_CHUNK_MB (tiny: many vocab chunks)
    cpu_split: Optional[str] = None  # DPO_KERNELS_CPU_SPLIT (cpp)
    sync_free: bool = False  # DPO_KERNELS_SYNC_FREE=1 (triton: all N rows, a device-side count)


def _size(sizes, limit, lo=1):
    """A size from the list of interesting ones (up to ``limit``) or any in ``[lo, limit]``."""
    return st.one_of(
        st.sampled_from([s for s in sizes if lo <= s <= limit]), st.integers(lo, limit)
    )


NICE_TEMPERATURES = [1.0, 0.5, 2.0, 0.05, 7.3]
NICE_SCALES = [1.0, 0.0, -1.0, 0.37, -2.5, 3.0]
NICE_SOFTCAPS = [None, 0.05, 1.0, 30.0, 1e6]


@st.composite
def cases(draw, backend: str, regime: str):
    """A :class:`Case` for ``backend`` in one of the three regimes (see the module docstring)."""
    tiny = backend == "triton"
    lim = TINY if tiny else dict(tokens=65, dim=70, vocab=600)
    dtypes = ["float32", "bfloat16"] + (["float64"] if backend == "torch" else [])
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["padded", "packed", "flat"]))
    if layout == "padded":
        b = draw(st.integers(1, 2 if tiny else 4))
        shape = (b, draw(_size(TOKENS, lim["tokens"] // b)))
    elif layout == "packed":
        n_seq = draw(st.integers(1, 5))
        lens = st.one_of(st.just(0), _size(TOKENS, lim["tokens"] // n_seq))
        shape = tuple(draw(st.lists(lens, min_size=n_seq, max_size=n_seq)))
    else:
        shape = (draw(_size(TOKENS, lim["tokens"])),)
    d = draw(_size(DIMS, lim["dim"]))
    v = draw(_size(VOCABS, lim["vocab"]))

    temperature = draw(st.one_of(st.sampled_from(NICE_TEMPERATURES), st.floats(0.05, 20.0)))
    # (not below 1e-6 in size: a scale that float32 flushes to 0 is an input-dtype limit)
    logit_scale = draw(
        st.one_of(
            st.sampled_from(NICE_SCALES),
            st.floats(-3.0, 3.0).filter(lambda s: s == 0.0 or abs(s) >= 1e-6),
        )
    )
    softcap = draw(st.one_of(st.sampled_from(NICE_SOFTCAPS), st.floats(0.05, 100.0)))
    if regime == "masked" and v > 1:
        bias = draw(st.sampled_from(["neg_inf", "neg_huge"]))
        mask = draw(st.sampled_from(["random", "head", "tail", "all_but_one", "one"]))
        if bias == "neg_huge":
            # A negative scale would turn the -3e38 lanes into tied logits of +3e38 at the top:
            # the "large" regime's business, not this one's.
            logit_scale = abs(logit_scale)
    else:
        # offset: every logit shifted up alike, so their plain sum runs to V·|z| (overflows at 1e36)
        biases = ["none", "normal"] + (["offset"] if regime == "large" else [])
        bias, mask = draw(st.sampled_from(biases)), "random"

    # The size of the logits z = (s/T)·x: up to ~10 (what language models produce) in the
    # ordinary and masked regimes, 30 .. 1e36 in the large one (a few sigma and V of them stay
    # inside float32 one by one, not summed). The raw logits x = h·w get what that asks of them
    # (at most 1e36: D = 70 products of that size stay inside float32 too).
    if regime == "large":
        log10_z = draw(
            st.one_of(
                st.sampled_from([30.0, 36.0, 2.0, 4.0, 8.0, 15.0, 20.0]), st.floats(1.5, 36.0)
            )
        )
    else:
        log10_z = draw(
            st.one_of(st.sampled_from([0.0, -3.0, -1.0, 0.5, 1.0]), st.floats(-3.0, 1.0))
        )
    pre = abs(logit_scale / temperature)
    log10_mag = min(36.0, log10_z - math.log10(pre)) if pre > 0 else log10_z
    split = draw(st.sampled_from([0.5, 0.0, 1.0, 0.25]))
    ignore = draw(st.sampled_from(["none", "all", "alternating", "random"]))
    ignore_index = draw(st.sampled_from([IGNORE, -1, 0]))
    junk_ignored = ignore != "none" and draw(st.integers(0, 3)) == 0
    labels = draw(st.sampled_from(["random", "argmax"] + (["masked"] if bias != "none" else [])))
    grad = draw(st.sampled_from(["random", "zeros", "sparse"]))
    ties = v > 1 and draw(st.integers(0, 3)) == 0
    reduction = draw(st.sampled_from(["sum", "mean", "none"]))
    stats = draw(st.booleans())
    frozen_head = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False
    chunk_mb = cpu_split = None
    if backend in ("cpp", "torch") and draw(st.integers(0, 3)) == 0:
        chunk_mb = draw(st.sampled_from([0.01, 0.05]))
    if backend == "cpp" and draw(st.booleans()):
        cpu_split = draw(st.sampled_from(["rows", "vocab"]))
    sync_free = backend == "triton" and draw(st.booleans())
    return Case(
        backend=backend,
        dtype=dtype,
        layout=layout,
        shape=shape,
        d=d,
        v=v,
        seed=draw(st.integers(0, 2**16)),
        log10_mag=log10_mag,
        split=split,
        bias=bias,
        mask=mask,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore=ignore,
        ignore_index=ignore_index,
        junk_ignored=junk_ignored,
        labels=labels,
        ties=ties,
        grad=grad,
        reduction=reduction,
        stats=stats,
        frozen_head=frozen_head,
        chunk_mb=chunk_mb,
        cpu_split=cpu_split,
        sync_free=sync_free,
    )


# ----------------------------------------------------------------------------- the tensors


@dataclass
class Built:
    hidden: torch.Tensor  # (B, T, D) or (N, D), leaf in the case's dtype
    weight: torch.Tensor
    labels: torch.Tensor
    bias: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    masked: torch.Tensor  # (V,) bool: the lanes whose bias is -inf / -3e38
    seq_of_row: torch.Tensor  # (N,) which output sequence each flat row belongs to
    grad_out: torch.Tensor  # upstream gradient, shaped like the output


def device_of(case: Case) -> str:
    return "cuda" if case.backend == "triton" and HAS_CUDA else "cpu"


def pre_scale(case: Case) -> float:
    return case.logit_scale / case.temperature


def _mask(case: Case, g: torch.Generator) -> torch.Tensor:
    v = case.v
    masked = torch.zeros(v, dtype=torch.bool)
    if case.bias not in ("neg_inf", "neg_huge") or v == 1:
        return masked
    k = int(torch.randint(1, v, (1,), generator=g))  # 1 .. V-1 lanes: never all of them
    if case.mask == "random":
        masked[torch.randperm(v, generator=g)[:k]] = True
    elif case.mask == "head":
        masked[:k] = True
    elif case.mask == "tail":
        masked[v - k :] = True
    elif case.mask == "all_but_one":
        masked[:] = True
        masked[int(torch.randint(0, v, (1,), generator=g))] = False
    else:  # one
        masked[int(torch.randint(0, v, (1,), generator=g))] = True
    return masked


def build(case: Case) -> Built:
    g = torch.Generator().manual_seed(case.seed)
    dtype, device = getattr(torch, case.dtype), device_of(case)
    if case.layout == "padded":
        lead = tuple(case.shape)
        n, cu = lead[0] * lead[1], None
        seq_of_row = torch.arange(n) // max(lead[1], 1)
    elif case.layout == "packed":
        lens = torch.tensor(case.shape, dtype=torch.int64)
        n = int(lens.sum())
        lead = (n,)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        seq_of_row = torch.repeat_interleave(torch.arange(len(case.shape)), lens)
    else:
        n = case.shape[0]
        lead, cu, seq_of_row = (n,), None, torch.zeros(n, dtype=torch.int64)

    # Raw logits h·w with standard deviation mag: hidden mag**split, weight the rest (/ sqrt D).
    mag = 10.0**case.log10_mag
    h_scale = mag**case.split
    w_scale = mag ** (1.0 - case.split) / math.sqrt(case.d)
    hidden = torch.randn(*lead, case.d, generator=g, dtype=torch.float64) * h_scale
    weight = torch.randn(case.v, case.d, generator=g, dtype=torch.float64) * w_scale
    masked = _mask(case, g)
    bias = None
    if case.bias != "none":
        bias = torch.randn(case.v, generator=g, dtype=torch.float64) * mag
        if case.bias == "offset":
            bias = bias / 4 + 4 * mag
    if case.ties:  # up to 8 vocabulary rows copy one strong row (and its bias)
        # (not more: k identical terms summed one after another in float32 carry up to k/4 ulps
        # of their sum — a legitimate GEMM rounding that GRAD_ULPS does not cover for k ~ 100)
        src = int(torch.randint(0, case.v, (1,), generator=g))
        k = int(torch.randint(1, min(8, case.v - 1) + 1, (1,), generator=g))
        dups = torch.zeros(case.v, dtype=torch.bool)
        dups[torch.randperm(case.v, generator=g)[:k]] = True
        weight[src] *= 3.0  # the top logit of many rows: ties at the top, where they matter
        weight[dups] = weight[src].clone()
        if bias is not None:
            bias[dups] = bias[src].clone()
    if bias is not None:
        if case.bias == "neg_inf":
            bias[masked] = -math.inf
        elif case.bias == "neg_huge":
            # Near the float32 limit, but logits z = pre_scale · x must stay inside it (a
            # logit beyond it is an overflow of the input dtype itself, not of the op).
            bias[masked] = -3.0e38 / max(1.0, abs(pre_scale(case))) * 0.99

    flat_n = n
    labels = torch.randint(0, case.v, (flat_n,), generator=g)
    if case.labels == "argmax":  # half the targets the top raw logit (exercises top1_correct)
        with torch.no_grad():
            x = hidden.reshape(-1, case.d).to(dtype).double() @ weight.to(dtype).double().T
            if bias is not None:
                x = x + bias.to(dtype).double()
            top = (x * pre_scale(case)).argmax(-1)
        pick = torch.rand(flat_n, generator=g) < 0.5
        labels = torch.where(pick, top, labels)
    elif case.labels == "masked" and bool(masked.any()):  # targets on the masked lanes
        lanes = masked.nonzero().squeeze(1)
        on = lanes[torch.randint(0, lanes.numel(), (flat_n,), generator=g)]
        labels = torch.where(torch.rand(flat_n, generator=g) < 0.6, on, labels)
    if case.ignore == "all":
        labels[:] = case.ignore_index
    elif case.ignore == "alternating":
        labels[::2] = case.ignore_index
    elif case.ignore == "random":
        labels[torch.rand(flat_n, generator=g) < 0.3] = case.ignore_index
    if case.junk_ignored:  # what an ignored row holds must not matter: NaN, +inf, -inf in turn
        junk = (labels == case.ignore_index).nonzero().squeeze(1)
        rows = hidden.view(-1, case.d)
        for i, r in enumerate(junk.tolist()):
            rows[r] = (math.nan, math.inf, -math.inf)[i % 3]

    if case.reduction == "none":
        out_shape = lead
    elif case.layout == "padded":
        out_shape = (lead[0],)
    elif case.layout == "packed":
        out_shape = (len(case.shape),)
    else:
        out_shape = (1,)
    if case.grad == "zeros":
        grad_out = torch.zeros(out_shape, dtype=torch.float64)
    else:
        grad_out = torch.randn(out_shape, generator=g, dtype=torch.float64)
        if case.grad == "sparse":
            grad_out[torch.rand(out_shape, generator=g) < 0.5] = 0.0

    def leaf(t, trainable=True):
        return t.to(device=device, dtype=dtype).requires_grad_(trainable)

    return Built(
        hidden=leaf(hidden),
        weight=leaf(weight, not case.frozen_head),
        labels=labels.reshape(lead).to(device),
        bias=None if bias is None else leaf(bias, not case.frozen_head),
        cu_seqlens=None if cu is None else cu.to(device),
        masked=masked,
        seq_of_row=seq_of_row,
        grad_out=grad_out,
    )


@contextlib.contextmanager
def knobs(case: Case):
    """The environment a case runs under (restored afterwards)."""
    env = {
        "DPO_KERNELS_CHUNK_MB": None if case.chunk_mb is None else str(case.chunk_mb),
        "DPO_KERNELS_CPU_SPLIT": case.cpu_split,
        "DPO_KERNELS_FROZEN_PATH": "jacobian" if case.frozen_head else None,
        "DPO_KERNELS_SYNC_FREE": "1" if case.sync_free else None,
    }
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, val in env.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
        yield
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


# ----------------------------------------------------------------------------- the oracle


def oracle_logits(case: Case, x: Built):
    """Per row (flat, all rows) in float64: logits ``z (N, V)``, ``dz/dx (N, V)`` and the
    absolute size ``A = |h|·|W|ᵀ + |b|`` of the terms each raw logit sums (finite lanes)."""
    h = x.hidden.detach().reshape(-1, case.d).double().cpu()
    w = x.weight.detach().double().cpu()
    raw = h @ w.T
    size = h.abs() @ w.abs().T
    if x.bias is not None:
        b = x.bias.detach().double().cpu()
        raw = raw + b
        size = size + torch.where(torch.isfinite(b), b.abs(), 0.0)
    s = pre_scale(case)
    if case.softcap is None:
        z = raw * s
        dzdx = torch.full_like(z, abs(s))
    else:
        t = torch.tanh(raw * (case.logit_scale / case.softcap))
        z = case.softcap * t / case.temperature
        dzdx = abs(s) * (1.0 - t * t)
    return z, dzdx, size


def reduce_rows(case: Case, x: Built, per_row: torch.Tensor) -> torch.Tensor:
    """Per-row values (0 at ignored rows) summed as the op sums them (or shaped per token)."""
    if case.reduction == "none":
        return per_row.reshape(x.labels.shape)
    n_out = {"padded": case.shape[0], "packed": len(case.shape), "flat": 1}[case.layout]
    out = torch.zeros(n_out, dtype=per_row.dtype)
    return out.index_add_(0, x.seq_of_row, per_row)


# Log-probs and stats of fp32 logits carry the logits' own rounding: each raw logit is a float32
# sum of D products (and the bias), correct to a few ulps of the sizes of its terms,
# u·A = u·Σ|h_d w_d| (+|b|), and the transform adds an ulp of z. At ordinary magnitudes that is
# far below VALUE_TOL·|value|; at logits of 1e30 it is ~1e23 — while a log-prob of a target with
# the top logit is ~0 and its entropy ~0, so a tolerance relative to the *values* alone would
# demand more accuracy than the fp32 logits themselves have. So every per-token value also gets
# LOGIT_ULPS such rounding units of its row's largest relevant logit (the lanes with p > 0: a lane
# of probability 0 moves neither lse nor the stats; its own log-prob is covered by the relative
# term since it is then as large as the logit). The same allowance decides which top-1 calls are
# ties (check_top1). Measured worst use over ~6500 passing fuzz cases (torch, cpp: 800 per regime;
# triton: 200 per regime): 0.28 units (logps, stats); 4 leaves 14x headroom.
LOGIT_ULPS = 4.0


def logit_error(case: Case, x: Built):
    """Per row: the rounding scale of its fp32 (float64 for float64 input) logits, ``e (N, V)``
    per lane and ``E (N,)`` over the lanes with p > 0."""
    z, dzdx, size = oracle_logits(case, x)
    acc = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32)
    e = acc.eps * (
        torch.where(dzdx > 0, dzdx * size, 0.0) + torch.where(torch.isfinite(z), z.abs(), 0)
    )
    e = e + acc.tiny  # underflow (a logit_scale of 1e-231 flushes every logit to 0)
    logp = torch.log_softmax(z, dim=-1)
    relevant = logp.exp() > 0
    err = torch.where(relevant & torch.isfinite(e), e, 0.0).amax(-1)
    return z, e, err


def oracle_values(case: Case, x: Built, dtype):
    """``naive_logprobs`` (``dtype``: float64, or None for torch in the input dtype) on the valid
    rows only, per token, then summed per sequence as the op sums (index_add). Ignored rows never
    enter it — as they never enter the op — so they get exactly zero gradient even where the
    logits are NaN (through ``torch.where`` a NaN row would leak NaN into the gradient)."""
    flat = x.labels.reshape(-1)
    rows = (flat != case.ignore_index).nonzero().squeeze(1)
    per = naive_logprobs(
        x.hidden.reshape(-1, case.d).index_select(0, rows),
        x.weight,
        flat.index_select(0, rows),
        x.bias,
        reduction="none",
        temperature=case.temperature,
        logit_scale=case.logit_scale,
        softcap=case.softcap,
        ignore_index=case.ignore_index,
        dtype=dtype,
    )
    n = flat.shape[0]
    out = {}
    for key, val in per.items():
        if case.reduction == "none":
            out[key] = val.new_zeros(n).index_copy(0, rows, val).reshape(x.labels.shape)
        else:
            seqs = x.seq_of_row.to(rows.device).index_select(0, rows)
            n_out = {"padded": case.shape[0], "packed": len(case.shape), "flat": 1}[case.layout]
            out[key] = val.new_zeros(n_out).index_add(0, seqs, val)
    if case.reduction == "mean":
        out["logps"] = out["logps"] / out["num_tokens"].clamp(min=1)
    return out


def entropy_oracle(z: torch.Tensor) -> torch.Tensor:
    """Per-row entropy with 0·log 0 = 0 (``naive_logprobs`` takes ``p·log p`` literally, which is
    NaN on a -inf lane whose p is exactly 0; a NaN p — an undefined row — stays NaN)."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -torch.where(p == 0, 0.0, p * logp).sum(-1)


# ----------------------------------------------------------------------------- the comparison


def check_close(ours, oracle, *, what, tol, atol=0.0, same=None, out_dtype=None):
    """DESIGN.md's rule elementwise, with non-finite values:

    - where the float64 oracle is NaN, ours must not be finite (an undefined result must not look
      like a number);
    - where the oracle, rounded to the output dtype, is ±inf, ours must be that same infinity;
    - where it is finite, ours must be finite (never NaN, never an overflow) and
      ``|ours − oracle| <= max|same − oracle| + tol·max|oracle| + atol`` (maxima over the finite
      elements; ``atol`` may be per element).
    """
    ours = ours.detach().cpu().double()
    oracle = oracle.detach().cpu().double()
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    if ours.numel() == 0:
        return
    rounded = oracle.to(out_dtype).double() if out_dtype is not None else oracle
    nan = torch.isnan(oracle)
    inf = torch.isinf(rounded) & ~nan
    fin = ~nan & ~inf
    bad = nan & torch.isfinite(ours)
    assert not bad.any(), (
        f"{what}: finite {ours[bad][:4].tolist()} where the oracle is NaN "
        f"(at {bad.nonzero()[:4].tolist()})"
    )
    bad = inf & (ours != rounded)
    assert not bad.any(), (
        f"{what}: {ours[bad][:4].tolist()} where the oracle is {rounded[bad][:4].tolist()} "
        f"(at {bad.nonzero()[:4].tolist()})"
    )
    bad = fin & ~torch.isfinite(ours)
    assert not bad.any(), (
        f"{what}: {ours[bad][:4].tolist()} where the oracle is finite, {oracle[bad][:4].tolist()} "
        f"(at {bad.nonzero()[:4].tolist()})"
    )
    if not fin.any():
        return
    err = (ours - oracle).abs()
    base = 0.0
    if same is not None:
        same = same.detach().cpu().double()
        ok = fin & torch.isfinite(same)
        base = (same - oracle)[ok].abs().max().item() if ok.any() else 0.0
    scale = oracle[fin].abs().max().item()
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(err)
    limit = base + tol * scale + atol
    bad = fin & (err > limit)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: |ours − oracle| = {err[i].item():.4g} at {list(i)} "
            f"(ours {ours[i].item():.9g}, oracle {oracle[i].item():.9g}) "
            f"> torch-in-dtype error {base:.3g} + {tol:g} x "
            f"{scale:.3g} + atol {atol[i].item():.3g}; {int(bad.sum())} elements out"
        )


# A gradient element is a float32 sum of many terms that largely cancel — dH_t = Σ_v G_tv W_v with
# Σ_v (onehot − p)_v = 0 — so, like a logit, it is accurate to a few ulps of the sizes of its
# *terms*, not of its value: with a large weight and a small hidden state FP32_GRAD_TOL x max|dH|
# asks for more than float32 holds. Each element therefore also gets the rounding of its terms:
# - GRAD_ULPS ulps of |grad_t| (|onehot − p| + p)_tv ((dz/dx)_tv + |s/T||t_tv|): the terms, and
#   with softcap the factor dz/dx = (s/T)(1 − t²), computed from a rounded t = tanh(...), whose
#   absolute error is ulps of (s/T)|t| however small 1 − t² is (a saturated softcap); p, a
#   normalised exponential, is good to ulps of p (with V = 1, where onehot − p = 0, the gradient
#   is ulps of the weight, not exactly 0);
# - with softcap, dz/dx taken at the float32 raw logit, which is off by LOGIT_ULPS·u·A (see
#   LOGIT_ULPS): |d(dz/dx)/dx| = |s/T| 2|t| (1 − t²) |s/softcap| times that — a small softcap
#   amplifies it (|s/softcap| = 60 for softcap 0.05);
# times |W_v| for dH, |H_t| for dW, 1 for db; plus the smallest normal float, as a result below it
# may be flushed to zero (the C++ backend flushes denormals). The error p inherits from the
# logits' rounding is left to the torch-in-dtype allowance (its logits are rounded alike): a
# first-order bound would allow anything at logits of 1e20, where exact ties still have an exact
# answer.
# Measured worst use over the same ~6500 passing cases: 1.3 units; 8 leaves 6x headroom. (Without
# it, a saturated softcap with a small hidden state failed ~1 case in 300 on every backend, torch
# included, by 2-7x FP32_GRAD_TOL.)
GRAD_ULPS = 8.0


def grad_rounding(case: Case, x: Built, z, dzdx, size):
    """The rounding allowance above for each element of dH, dW, db (float64, oracle shapes)."""
    flat = x.labels.reshape(-1).cpu()
    valid = flat != case.ignore_index
    g = x.grad_out.reshape(-1)
    if case.reduction != "none":
        g = g.index_select(0, x.seq_of_row)
        if case.reduction == "mean":
            count = torch.zeros(len(x.grad_out), dtype=torch.float64)
            count.index_add_(0, x.seq_of_row, valid.double())
            g = g / count.clamp(min=1).index_select(0, x.seq_of_row)
    g = (g.abs() * valid)[:, None]
    p = torch.softmax(z, dim=-1)
    onehot = torch.zeros_like(p)
    onehot[valid.nonzero().squeeze(1), flat[valid]] = 1.0
    u = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32).eps
    s = abs(pre_scale(case))
    if case.softcap is None:
        err_g = GRAD_ULPS * u * g * ((onehot - p).abs() + p) * dzdx
    else:
        t = (z * case.temperature / case.softcap).abs()
        curvature = s * 2 * t * (1 - t * t) * abs(case.logit_scale / case.softcap)
        curvature = torch.where(curvature > 0, curvature * size, 0.0)  # 0 · inf = 0: a -inf lane
        err_g = g * (
            GRAD_ULPS * u * ((onehot - p).abs() + p) * (dzdx + s * t)
            + (onehot - p).abs() * curvature * LOGIT_ULPS * u
        )
    err_g = torch.nan_to_num(err_g, nan=0.0, posinf=0.0)
    h = x.hidden.detach().reshape(-1, case.d).double().cpu().abs()
    h = torch.where(valid[:, None], h, 0.0)  # an ignored row may hold NaN (junk_ignored)
    w = x.weight.detach().double().cpu().abs()
    tiny = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32).tiny
    return [a + tiny for a in ((err_g @ w).reshape(x.hidden.shape), err_g.T @ h, err_g.sum(0))]


def grad_tolerance(case: Case, oracle: torch.Tensor):
    """``(tol, atol)`` of a gradient, as ``helpers.check_grad``: float32 relative, half
    precision two ulps of the output at its largest value; float64 relative 1e-12."""
    if case.dtype == "float32":
        return FP32_GRAD_TOL, 0.0
    if case.dtype == "float64":
        return 1e-12, 0.0
    fin = oracle[torch.isfinite(oracle)]
    top = fin.abs().max().item() if fin.numel() else 0.0
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
    return 0.0, HALF_GRAD_ULPS * ulp


def run_and_check(case: Case) -> None:
    """Runs the case's call and its backward; checks every output against the oracle."""
    x = build(case)
    dtype = getattr(torch, case.dtype)
    params = [x.hidden] if case.frozen_head else [x.hidden, x.weight]
    if x.bias is not None and not case.frozen_head:
        params.append(x.bias)
    kw = dict(
        reduction=case.reduction,
        cu_seqlens=x.cu_seqlens,
        temperature=case.temperature,
        logit_scale=case.logit_scale,
        softcap=case.softcap,
        ignore_index=case.ignore_index,
    )
    with knobs(case):
        out = dk.linear_logprobs(
            x.hidden,
            x.weight,
            x.labels,
            x.bias,
            backend=case.backend,
            return_stats=case.stats,
            **kw,
        )
        logps = out.logps if case.stats else out
        grads = torch.autograd.grad(logps, params, x.grad_out.to(logps), allow_unused=True)

    acc = torch.float64 if case.dtype == "float64" else torch.float32
    assert logps.dtype == acc, f"logps dtype {logps.dtype}"
    want_shape = x.grad_out.shape
    assert tuple(logps.shape) == tuple(want_shape), f"logps shape {tuple(logps.shape)}"

    ref = oracle_values(case, x, torch.float64)
    ref_grads = torch.autograd.grad(
        ref["logps"], params, x.grad_out.to(ref["logps"]), allow_unused=True
    )
    same = oracle_values(case, x, None)
    same_grads = torch.autograd.grad(
        same["logps"], params, x.grad_out.to(same["logps"]), allow_unused=True
    )

    z, e, err = logit_error(case, x)
    rounding = grad_rounding(case, x, z, *oracle_logits(case, x)[1:])
    valid = x.labels.reshape(-1).cpu() != case.ignore_index
    mean = case.reduction == "mean"
    count = reduce_rows(case, x, valid.double())
    # Per-token allowance (LOGIT_ULPS rounding units of the row's logits), summed like the values.
    tok_atol = reduce_rows(case, x, torch.where(valid, LOGIT_ULPS * err, 0.0))
    logp_atol = tok_atol / count.clamp(min=1) if mean else tok_atol
    value_tol = 1e-12 if case.dtype == "float64" else VALUE_TOL
    check_close(logps, ref["logps"], what="logps", tol=value_tol, atol=logp_atol, out_dtype=acc)

    names = ["hidden", "weight", "bias"]
    for name, g, rg, sg, rd in zip(names, grads, ref_grads, same_grads, rounding):
        assert g is not None and g.dtype == dtype and g.shape == rg.shape, f"d{name}"
        tol, atol = grad_tolerance(case, rg.detach())
        atol = atol + rd
        check_close(g, rg, what=f"d{name}", tol=tol, atol=atol, same=sg, out_dtype=dtype)

    if not case.stats:
        return
    assert out.num_tokens.dtype == out.top1_correct.dtype == torch.int64
    assert torch.equal(out.num_tokens.cpu(), count.long()), "num_tokens"
    log_v = math.log(max(case.v, 2))
    stat_refs = {
        "logits_sum": (ref["logits_sum"], 1.0),
        # dH/dz_v = -p_v (log p_v + H): an error δ in every logit moves H by at most 2 log V·δ.
        "entropy_sum": (
            reduce_rows(case, x, torch.where(valid, entropy_oracle(z), 0.0)),
            1.0 + 2.0 * log_v,
        ),
        "log_sum_sq_probs_sum": (ref["log_sum_sq_probs_sum"], 4.0),
    }
    for key, (oracle, gain) in stat_refs.items():
        ours = getattr(out, key)
        assert ours.dtype == acc and ours.shape == logps.shape, key
        assert not ours.requires_grad, key
        check_close(ours, oracle, what=key, tol=value_tol, atol=gain * tok_atol, out_dtype=acc)
    check_top1(case, x, out.top1_correct, z, e, valid)


def check_top1(case, x, ours, z, e, valid):
    """``top1_correct`` counts the targets with the largest logit. Where the target's logit and
    the best other logit are within the rounding of the fp32 logits of each other (LOGIT_ULPS
    rounding units of each), which one is larger is decided by that rounding, not by the op:
    such a token may count either way. Any other must count exactly as the oracle's."""
    n, v = z.shape
    labels = x.labels.reshape(-1).cpu()
    safe = torch.where(valid, labels, 0)
    rows = torch.arange(n)
    z_t = z[rows, safe]
    others = z.clone()
    others[rows, safe] = -math.inf
    best, where = others.max(-1) if v > 1 else (torch.full((n,), -math.inf), safe)
    slack = LOGIT_ULPS * (e[rows, safe] + (e[rows, where] if v > 1 else 0.0))
    slack = torch.where(torch.isfinite(slack), slack, math.inf)
    undefined = torch.isnan(z).any(-1)
    sure = valid & ~undefined & (z_t > best + slack)
    maybe = valid & (undefined | (z_t >= best - slack))
    lo = reduce_rows(case, x, sure.double()).long()
    hi = reduce_rows(case, x, maybe.double()).long()
    ours = ours.cpu()
    bad = (ours < lo) | (ours > hi)
    assert not bad.any(), (
        f"top1_correct: {ours[bad][:4].tolist()} outside [{lo[bad][:4].tolist()}, "
        f"{hi[bad][:4].tolist()}] (at {bad.nonzero()[:4].tolist()})"
    )


# ----------------------------------------------------------------------------- the tests


def _backend_marks(backend):
    if backend == "cpp" and NO_CPP:
        return [pytest.mark.skip(reason="DPO_KERNELS_NO_CPP=1")]
    if backend == "triton":
        if not HAS_TRITON:
            return [pytest.mark.skip(reason="triton is not installed")]
        if not (INTERPRET or HAS_CUDA):
            return [pytest.mark.skip(reason="Triton can neither run compiled nor interpreted")]
    return []


# (backend, regime): examples in the default run, in the long run (DPO_KERNELS_FUZZ_LONG=1).
# A torch or C++ example takes 5-30 ms here (2 cores), a Triton one under the interpreter
# 15-350 ms; the default run of the whole file takes ~50 s on an idle machine (open bugs'
# shrinking included; ~4 min once with other test suites loading both cores).
BUDGET = {
    ("torch", "ordinary"): (300, 6000),
    ("torch", "masked"): (200, 4000),
    ("torch", "large"): (200, 4000),
    ("cpp", "ordinary"): (300, 6000),
    ("cpp", "masked"): (200, 4000),
    ("cpp", "large"): (200, 4000),
    ("triton", "ordinary"): (40, 600),
    ("triton", "masked"): (30, 400),
    ("triton", "large"): (30, 400),
}


def _fuzz_test(backend: str, regime: str):
    default, long = BUDGET[(backend, regime)]

    @settings(
        max_examples=long if LONG else default,
        deadline=None,
        derandomize=not LONG,
        database=None,  # no example database; a long run prints reproduce blobs instead
        # Triton under the interpreter: shrinking costs minutes; the default run reports the
        # failing case as drawn (pin a hand-minimised one in REGRESSIONS).
        phases=(
            list(Phase)
            if LONG or backend != "triton"
            else [Phase.explicit, Phase.reuse, Phase.generate]
        ),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=LONG,
    )
    @given(case=cases(backend, regime))
    def test(case):
        run_and_check(case)

    test.__name__ = test.__qualname__ = f"test_fuzz_{backend}_{regime}"
    for mark in _backend_marks(backend):
        test = mark(test)
    return test


for _backend in ("torch", "cpp", "triton"):
    for _regime in ("ordinary", "masked", "large"):
        _t = _fuzz_test(_backend, _regime)
        globals()[_t.__name__] = _t
del _backend, _regime, _t


# ----------------------------------------------------------------------------- regressions


def _on_each_backend(case: Case, name: str):
    return [
        pytest.param(dataclasses.replace(case, backend=b), id=f"{name}-{b}")
        for b in ("torch", "cpp", "triton")
    ]


#: Minimal failing cases the fuzzer found, one per distinct bug, on every backend.
REGRESSIONS = [
    # --- found by this fuzzer, and fixed with it ---
    # The log-sum-exp is handed from forward to backward as one float32 per row, so every
    # backward's p = exp(z − lse) carries a normalisation error of ~u·|lse| (Σ_v p_v ≠ 1):
    # here |z| ~ 550 gives dH 10% off where it is small (2.2e-5 against torch's 1.2e-7), on
    # every backend. torch's log_softmax (z − max − log Σ) has no such term. (test_tied_logits
    # below is the extreme end: at |z| >= 1e8 the error is the whole gradient.)
    *_on_each_backend(
        Case(
            "torch",
            shape=(6,),
            layout="flat",
            d=8,
            v=3,
            seed=1005,
            log10_mag=4.0,
            temperature=7.3,
            logit_scale=0.4,
        ),
        "new-lse-float32-grad",
    ),
    # reduction="mean" divides a per-sequence sum already rounded to float32: two tokens with
    # log-probs of -3e38 (a target on a lane masked by bias -3e38) sum to -inf, though their mean
    # is -3e38 (finite in float32 and in the float64 oracle).
    *_on_each_backend(
        Case(
            "torch",
            shape=(2,),
            layout="flat",
            d=1,
            v=2,
            bias="neg_huge",
            mask="one",
            labels="masked",
            reduction="mean",
        ),
        "new-mean-of-float32-sum",
    ),
    # A -inf bias lane with logit_scale < 0 (no softcap) is a +inf logit, and with logit_scale 0
    # it is 0·(-inf) = NaN (softcap or not): the float64 log_softmax gives NaN there. The op
    # raises OverflowError("logits overflow ... for finite inputs") instead — the inputs are not
    # finite and nothing overflowed.
    *_on_each_backend(
        Case(
            "torch",
            shape=(1,),
            layout="flat",
            d=1,
            v=2,
            bias="neg_inf",
            mask="one",
            logit_scale=-1.0,
        ),
        "new-overflow-error-scale-negative-neg-inf-bias",
    ),
    *_on_each_backend(
        Case(
            "torch",
            shape=(1,),
            layout="flat",
            d=1,
            v=2,
            bias="neg_inf",
            mask="one",
            logit_scale=0.0,
            softcap=1.0,
        ),
        "new-overflow-error-scale-zero-neg-inf-bias",
    ),
    # Triton with DPO_KERNELS_SYNC_FREE=1 (what CUDA-graph capture runs: launches over all N
    # rows): a NaN / inf hidden state on an *ignored* row (padding) makes dW NaN for the whole
    # head — the backward's GEMM multiplies it by its zero logit gradient — and, with a frozen
    # head (the Jacobian path), that row's dH NaN. Ignored rows must not matter.
    *_on_each_backend(
        Case(
            "torch",
            shape=(2,),
            layout="flat",
            d=1,
            v=2,
            ignore="alternating",
            junk_ignored=True,
            sync_free=True,
            stats=False,
        ),
        "new-sync-free-junk-ignored-row-dweight",
    ),
    *_on_each_backend(
        Case(
            "torch",
            shape=(2,),
            layout="flat",
            d=1,
            v=2,
            ignore="alternating",
            junk_ignored=True,
            sync_free=True,
            frozen_head=True,
            stats=False,
        ),
        "new-sync-free-junk-ignored-row-dhidden-frozen-head",
    ),
    # --- the bugs the numerics fix (06f001c) closed; found again by this fuzzer on b395e5f ---
    # -inf bias lanes: C++ gave NaN log-probs where the oracle is -inf (a target on the lane).
    *_on_each_backend(
        Case("torch", shape=(4,), layout="flat", d=1, v=2, bias="neg_inf", stats=False),
        "known-neg-inf-bias",
    ),
    # -3e38 bias lanes: C++ gave NaN log-probs where the oracle is finite.
    *_on_each_backend(
        Case(
            "torch",
            shape=(3,),
            layout="flat",
            d=1,
            v=3,
            bias="neg_huge",
            mask="all_but_one",
            reduction="none",
            stats=False,
        ),
        "known-neg-huge-bias",
    ),
    # Entropy with a -inf lane: p·log p = 0·(-inf) = NaN on every backend.
    *_on_each_backend(
        Case(
            "torch",
            shape=(4,),
            layout="flat",
            d=1,
            v=2,
            bias="neg_inf",
            mask="random",
            reduction="none",
            stats=True,
        ),
        "known-neg-inf-entropy",
    ),
    # All-positive logits of 1e36 over 600 lanes: their plain sum overflows (logits_sum inf on
    # torch and Triton, NaN log-probs on C++).
    *_on_each_backend(
        Case(
            "torch",
            shape=(3,),
            layout="flat",
            d=8,
            v=600,
            log10_mag=36.0,
            bias="offset",
            stats=True,
        ),
        "known-huge-logits",
    ),
]


@pytest.mark.parametrize("case", REGRESSIONS)
def test_regression(case):
    marks = _backend_marks(case.backend)
    if marks:
        pytest.skip(marks[0].kwargs["reason"])
    run_and_check(case)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("z", [1e8, -1e20, 1e30])
@pytest.mark.parametrize("k", [2, 5])
def test_tied_logits(backend, z, k):
    """``k`` identical vocabulary rows (untrained tokens share one initialisation): their logits
    tie exactly, in float32 as in float64, so every answer is exact: log-prob and
    ``log Σ p²`` = −log k, entropy log k, dH = 0, dW = (onehot − 1/k)·h. With the float32 lse
    of a logit of 1e8 or more, log k vanishes into its rounding and the backward's
    p = exp(z − lse) is 1 on every lane instead of 1/k (found by the fuzzer; the fuzz test's
    logit-magnitude tolerance cannot tell an exact tie from rounding, so it is pinned here)."""
    for mark in _backend_marks(backend):
        pytest.skip(mark.kwargs["reason"])
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    a = math.sqrt(abs(z))
    hidden = torch.tensor([[a]], device=device, requires_grad=True)
    weight = torch.full((k, 1), math.copysign(a, z), device=device, requires_grad=True)
    labels = torch.tensor([1], device=device)
    out = dk.linear_logprobs(hidden, weight, labels, backend=backend, return_stats=True)
    d_hidden, d_weight = torch.autograd.grad(out.logps.sum(), [hidden, weight])
    log_k = math.log(k)
    want = {"logps": -log_k, "entropy_sum": log_k, "log_sum_sq_probs_sum": -log_k}
    wrong = [
        f"{key} {getattr(out, key).item():.7g} (want {val:.7g})"
        for key, val in want.items()
        if abs(getattr(out, key).item() - val) > VALUE_TOL * abs(val)
    ]
    u = torch.finfo(torch.float32).eps
    if abs(d_hidden.item()) > 8 * u * k * a:  # Σ_v G_v W_v with equal W_v and Σ_v G_v = 0
        wrong.append(f"dH {d_hidden.item():.4g} (want 0)")
    expected = ((torch.arange(k) == 1).double() - 1.0 / k)[:, None] * a
    if not torch.allclose(d_weight.double().cpu(), expected, rtol=FP32_GRAD_TOL, atol=0):
        wrong.append(f"dW {d_weight.flatten().tolist()} (want {expected.flatten().tolist()})")
    assert not wrong, "; ".join(wrong)
