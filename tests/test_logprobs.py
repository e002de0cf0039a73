"""Values and gradients of linear_logprobs against a float64 oracle, for every backend."""

import pytest
import torch

import dpo_kernels as dk

from .helpers import (
    HAS_CUDA,
    IGNORE,
    INTERPRET,
    VALUE_TOL,
    D,
    V,
    assert_close,
    make_inputs,
    naive_logprobs,
    run_case,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (name, layout, reduction, bias, options): spans reductions, layouts and logit transforms.
VARIANTS = [
    ("plain", "padded", "sum", False, {}),
    ("mean-bias-temp", "padded", "mean", True, {"temperature": 0.7}),
    (
        "none-softcap",
        "padded",
        "none",
        True,
        {"softcap": 5.0, "logit_scale": 1.7, "temperature": 1.3},
    ),
    ("packed-softcap30", "packed", "sum", True, {"softcap": 30.0}),
    ("packed-none-scale", "packed", "none", False, {"logit_scale": 0.5}),
    ("packed-mean", "packed", "mean", False, {"temperature": 2.0}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_values_and_gradients(case, dtype, variant, poison):
    backend, device = case
    _, layout, reduction, bias, opts = variant
    run_case(backend, device, dtype, layout, reduction, bias, opts)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stats(case, dtype, reduction, poison):
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, dtype, device)
    opts = {"softcap": 4.0, "temperature": 0.9}
    got = dk.linear_logprobs(
        hidden,
        weight,
        labels,
        bias,
        reduction=reduction,
        return_stats=True,
        backend=backend,
        **opts,
    )
    ref = naive_logprobs(hidden, weight, labels, bias, reduction=reduction, **opts)
    assert isinstance(got, dk.LogProbStats)
    assert torch.equal(got.num_tokens.cpu(), ref["num_tokens"].long().cpu())
    assert got.num_tokens.dtype == got.top1_correct.dtype == torch.int64
    assert torch.equal(got.top1_correct.cpu(), ref["top1_correct"].long().cpu())
    for key in ("logps", "logits_sum", "entropy_sum", "log_sum_sq_probs_sum"):
        assert_close(getattr(got, key), ref[key], tol=VALUE_TOL, what=key)
    assert got.logps.requires_grad and not got.entropy_sum.requires_grad


def test_stats_top1_counts_correct_tokens(case):
    """Targets set to each row's argmax must all count as top-1 correct."""
    backend, device = case
    hidden, weight, labels, _, _ = make_inputs("padded", False, torch.float32, device)
    with torch.no_grad():
        best = (hidden @ weight.T).argmax(-1)
    labels = torch.where(labels == IGNORE, labels, best)
    got = dk.linear_logprobs(hidden, weight, labels, return_stats=True, backend=backend)
    assert torch.equal(got.top1_correct, got.num_tokens)


def test_many_backward_chunks(case, monkeypatch):
    """A tiny memory budget forces many vocab chunks (backward) and token chunks (torch)."""
    backend, device = case
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", "0.01")  # ~10 KB: < 64 vocab columns per chunk
    run_case(backend, device, torch.float32, "padded", "sum", True, {"softcap": 10.0})


def test_triton_shapes_span_tiles_and_splits():
    """The test shapes above really exercise several vocab tiles, splits and row blocks."""
    pytest.importorskip("triton")
    from dpo_kernels.triton import policy

    cpu = torch.device("cpu")
    t = policy.fused_config(torch.float32, cpu, 26, D, V, allow_tf32=False, autotune=False)
    n_valid = 26  # a lower bound for make_inputs("padded")
    n_splits, split = policy.vocab_splits(n_valid, V, D, 4, t, cpu)
    assert n_splits >= 3 and split // t.block_v >= 2 and V % t.block_v != 0
    assert -(-n_valid // t.block_n) >= 2 and D % t.block_d != 0
    # The logit-grad kernel's grouped order meets a last, partial group of row blocks.
    group = policy.grad_group(t, D, 4, cpu)
    assert group >= 2 and -(-37 // t.block_n) % group != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backends_agree(dtype):
    """Triton (interpreted or CUDA) and the torch reference agree with each other too."""
    pytest.importorskip("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton cannot run on this machine")
    hidden, weight, labels, bias, _ = make_inputs("padded", True, dtype, device)
    a = dk.linear_logprobs(hidden, weight, labels, bias, backend="torch", return_stats=True)
    b = dk.linear_logprobs(hidden, weight, labels, bias, backend="triton", return_stats=True)
    for x, y, name in zip(a, b, a._fields):
        assert_close(y, x, tol=VALUE_TOL, what=name)  # both keep fp32 logits


def test_sequence_sums_are_the_one_reduction(case):
    """Every backend's per-sequence values are ``segment_sum`` of its own per-token values,
    bitwise: one reduction, in one place, for every backend."""
    from dpo_kernels.backend import segment_sum

    backend, device = case
    for layout in ("padded", "packed"):
        hidden, weight, labels, bias, cu = make_inputs(layout, True, torch.float32, device)
        kw = dict(cu_seqlens=cu, backend=backend, return_stats=True, softcap=7.0)
        with torch.no_grad():
            seq = dk.linear_logprobs(hidden, weight, labels, bias, **kw)
            tok = dk.linear_logprobs(hidden, weight, labels, bias, reduction="none", **kw)
        valid = (labels != IGNORE).reshape(-1)
        seg = torch.cat([seq.num_tokens.new_zeros(1), seq.num_tokens.cumsum(0)])
        assert int(seg[-1]) == int(valid.sum()) and (seq.num_tokens > 0).any()
        for field in ("logps", "logits_sum", "entropy_sum", "log_sum_sq_probs_sum"):
            per_token = getattr(tok, field).reshape(-1)[valid]
            assert torch.equal(getattr(seq, field), segment_sum(per_token, seg)), field
        top1 = segment_sum(tok.top1_correct.reshape(-1)[valid].double(), seg).long()
        assert torch.equal(seq.top1_correct, top1)


def test_segment_sum_keeps_sequences_apart():
    """Each segment is summed on its own: a huge or NaN value never reaches a neighbour."""
    from dpo_kernels.backend import segment_sum

    x = torch.tensor([1.5, -2.25, -1e30, 3.0, float("nan"), 0.125, 7.0])
    seg = torch.tensor([0, 2, 2, 3, 4, 5, 7])
    out = segment_sum(x, seg)
    assert out.dtype == x.dtype
    assert out[[0, 1, 2, 3, 5]].tolist() == [-0.75, 0.0, x[2].item(), 3.0, 7.125]
    assert torch.isnan(out[4])
    assert segment_sum(x[:0], torch.zeros(4, dtype=torch.int64)).tolist() == [0.0, 0.0, 0.0]
    # float64 accumulation: a float32 running sum would lose the small terms entirely.
    big = torch.tensor([2.0**24, 1.0, 1.0, -(2.0**24)])
    assert segment_sum(big, torch.tensor([0, 4])).item() == 2.0
