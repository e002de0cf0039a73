"""Numerics at the edges (issue 17): masked vocabularies (-inf and -3.4e38 bias lanes, whole
tiles of them), logits near the float limit, overflow beyond it, and one sequence's values never
reaching another's sum. Every backend against the float64 oracle."""

import math

import pytest
import torch

import dpo_kernels as dk

from .helpers import (
    IGNORE,
    INTERPRET,
    assert_close,
    check_grad,
    check_logps,
    naive_logprobs,
)

STATS = ("logps", "logits_sum", "entropy_sum", "log_sum_sq_probs_sum")


def _inputs(device, dtype, *, n=21, d=24, v=1001, seed=0, h_scale=1.0, w_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * h_scale
    weight = torch.randn(v, d, generator=g) * w_scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE
    return hidden, weight, labels, g


def _leaf(x, device, dtype):
    return x.to(device=device, dtype=dtype).requires_grad_()


def _check(backend, device, hidden, weight, labels, bias, cu, *, grads=True, value_atol=0.0):
    """Per-sequence values and stats against the float64 oracle; gradients of every input
    against it under DESIGN.md's rule."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    kw = dict(cu_seqlens=cu)
    got = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend, return_stats=True, **kw)
    want = naive_logprobs(hidden, weight, labels, bias, **kw)
    for name in STATS:
        # The outputs are float32: a float64 sum past its range (a sequence's logits_sum with
        # -3.4e38 lanes) is -inf there, as rounding the oracle to float32 gives.
        a, b = getattr(got, name).double(), want[name].float().double()
        inf = torch.isinf(b)
        assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], b[inf]), (name, a, b)
        if name == "logps":
            check_logps(getattr(got, name)[~inf], b[~inf])
        else:  # stats: float32 accuracy relative to their own magnitude
            assert_close(a[~inf], b[~inf], tol=2e-6, atol=value_atol + 1e-6, what=name)
    assert torch.equal(got.top1_correct, want["top1_correct"].round().long())
    if not grads:
        return got
    up = torch.randn(got.logps.shape, generator=torch.Generator().manual_seed(3)).to(device)
    ours = torch.autograd.grad(got.logps, params, up)
    ref = torch.autograd.grad(want["logps"], params, up.double())
    same = naive_logprobs(hidden, weight, labels, bias, dtype=None, **kw)["logps"]
    same_grads = torch.autograd.grad(same, params, up.float())
    for name, a, b, s in zip(("hidden", "weight", "bias"), ours, ref, same_grads):
        assert torch.isfinite(a).all(), name
        check_grad(a, b, s, hidden.dtype, f"d{name}")
    return got


MASKS = {
    "-inf": float("-inf"),
    "-3.4e38": -3.4e38,  # the most negative float32 (and about bfloat16's): finite
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("where", ["scattered", "leading_block", "trailing_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_vocabulary(case, mask, where, dtype):
    """A bias that masks part of the vocabulary (padded lanes, banned tokens): masked lanes add
    nothing, a whole tile or chunk of them (at the start, where the online max begins at -inf,
    and at the end) included. Labels stay on unmasked lanes here."""
    backend, device = case
    if backend == "triton" and dtype == torch.bfloat16 and where != "scattered":
        pytest.skip("one bf16 Triton case is enough under the interpreter")
    hidden, weight, labels, g = _inputs(device, dtype)
    v = weight.shape[0]
    masked = torch.zeros(v, dtype=torch.bool)
    if where == "scattered":
        masked[torch.randperm(v, generator=g)[: v * 2 // 5]] = True
    elif where == "leading_block":
        masked[:700] = True  # more than any tile or chunk: the first ones are all masked
    else:
        masked[300:] = True
    bias = torch.randn(v, generator=g).masked_fill(masked, MASKS[mask])
    allowed = (~masked).nonzero().squeeze(1)
    pick = torch.randint(0, allowed.shape[0], labels.shape, generator=g)
    labels = torch.where(labels == IGNORE, labels, allowed[pick])
    cu = torch.tensor([0, 4, 4, 13, 21], device=device)  # an empty sequence too
    _check(
        backend,
        device,
        _leaf(hidden, device, dtype),
        _leaf(weight, device, dtype),
        labels.to(device),
        _leaf(bias, device, dtype),
        cu,
    )


def test_label_on_a_masked_lane_gives_minus_infinity(case):
    """log p of a token the bias forbids is -inf (as log_softmax gives); its neighbours in the
    batch keep their finite values."""
    backend, device = case
    hidden, weight, labels, _ = _inputs(device, torch.float32)
    bias = torch.zeros(weight.shape[0]).index_fill(0, torch.tensor([3, 500]), float("-inf"))
    labels[1] = 500
    cu = torch.tensor([0, 4, 21], device=device)
    got = dk.linear_logprobs(
        hidden.to(device),
        weight.to(device),
        labels.to(device),
        bias.to(device),
        cu_seqlens=cu,
        backend=backend,
    )
    want = naive_logprobs(hidden, weight, labels, bias, cu_seqlens=cu.cpu())["logps"]
    assert got[0].item() == -math.inf and want[0].item() == -math.inf
    check_logps(got[1:].cpu(), want[1:])


@pytest.mark.parametrize("magnitude", [1e-3, 1e8, 1e20, 1e30, 1e36])
def test_logits_up_to_the_float_limit(case, magnitude):
    """All-positive logits of the given size, over a vocabulary large enough that their plain
    sum would overflow float32 at 1e36 (1001 × 1e36 > 3.4e38): finite, and as accurate as the
    logits themselves. fp32 logits carry a rounding of ~6e-8 relative to the largest, so the
    values are checked against torch on the same fp32 logits (DESIGN.md's rule) and the stats
    with an absolute allowance of that size."""
    backend, device = case
    hidden, weight, labels, _ = _inputs(device, torch.float32)
    hidden, weight = hidden.abs(), weight.abs()
    scale = magnitude / float((hidden @ weight.T).max())
    hidden = hidden * scale
    params = [_leaf(t, device, torch.float32) for t in (hidden, weight)]
    kw = dict(reduction="none")
    got = dk.linear_logprobs(*params, labels.to(device), backend=backend, return_stats=True, **kw)
    want = naive_logprobs(*params, labels.to(device), **kw)
    same = naive_logprobs(*params, labels.to(device), dtype=None, **kw)
    z_err = 1e-6 * magnitude  # the fp32 logits' own error, summed over D = 24 products
    for name in STATS:
        a = getattr(got, name)
        assert torch.isfinite(a).all(), (name, a)
        b, s = want[name], same[name]
        if name == "logits_sum":
            assert_close(a, b, tol=1e-6, what=name)  # the mean logit: relative to itself
        else:
            assert_close(a, b, s, tol=1e-6, atol=min(z_err, 1e30) * 1e-6 + 1e-5, what=name)
    up = torch.randn(got.logps.shape, generator=torch.Generator().manual_seed(3)).to(device)
    for g in torch.autograd.grad(got.logps, params, up):
        assert torch.isfinite(g).all()


def test_overflow_beyond_the_float_range_is_an_error_not_nan(case):
    """Finite inputs whose logits overflow float32 (|z| > 3.4e38): log_softmax in float64 would
    give a number, float32 cannot. On CPU tensors that is an OverflowError naming the cause
    (on CUDA it costs a host sync, so there only with DPO_KERNELS_VALIDATE=1)."""
    backend, device = case
    hidden = torch.full((3, 8), 1e20, device=device)
    weight = torch.full((50, 8), 1e20, device=device)
    labels = torch.tensor([1, 2, 3], device=device)
    if device == "cpu":
        with pytest.raises(OverflowError, match="logits overflow the torch.float32 range"):
            dk.linear_logprobs(hidden, weight, labels, backend=backend)
    else:
        assert torch.isnan(dk.linear_logprobs(hidden, weight, labels, backend=backend)).all()


def test_nan_and_inf_inputs_give_nan_rows_only(case):
    """A NaN (or +inf) in one token's hidden state makes that token's sequence NaN, never a
    number, and leaves the other sequences exact."""
    backend, device = case
    hidden, weight, labels, _ = _inputs(device, torch.float32)
    labels[:] = labels.clamp(min=0)
    cu = torch.tensor([0, 7, 14, 21], device=device)
    want = dk.linear_logprobs(
        hidden.to(device), weight.to(device), labels.to(device), cu_seqlens=cu, backend=backend
    )
    for bad in (float("nan"), float("inf")):
        h = hidden.clone()
        h[9, 3] = bad
        got = dk.linear_logprobs(
            h.to(device), weight.to(device), labels.to(device), cu_seqlens=cu, backend=backend
        )
        assert torch.isnan(got[1]), (bad, got)
        assert torch.equal(got[[0, 2]], want[[0, 2]]), (bad, got, want)


@pytest.mark.parametrize("size", [1e13, 1e19, 1e30])
def test_one_sequence_never_leaks_into_another(case, size):
    """A sequence whose log-prob is about -size next to ordinary ones: the others' sums are
    bitwise what they are in the same batch with an ordinary sequence in its place (each
    sequence is summed on its own, never as a difference of prefix sums). The same batch, so
    the same tiles and threads: only the loud sequence's values differ."""
    backend, device = case
    g = torch.Generator().manual_seed(4)
    d, v = 16, 257
    hidden = torch.randn(3, 6, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.3
    labels = torch.randint(0, v, (3, 6), generator=g)
    # Sequence 1: hidden states in the direction that makes its target logits hugely negative.
    loud = hidden.clone()
    loud[1] = -weight[labels[1]] * (size / float(weight[labels[1]].norm(dim=1).pow(2).min()))
    for layout in ("padded", "packed"):
        outs = []
        for h in (hidden, loud):
            kw, lab = {}, labels
            if layout == "packed":
                h, lab = h.reshape(-1, d), labels.reshape(-1)
                kw["cu_seqlens"] = torch.tensor([0, 6, 12, 18], device=device)
            outs.append(
                dk.linear_logprobs(
                    h.to(device), weight.to(device), lab.to(device), backend=backend, **kw
                )
            )
        quiet, noisy = outs
        assert noisy[1].item() < -0.1 * size
        assert torch.equal(noisy[[0, 2]], quiet[[0, 2]]), (layout, noisy, quiet)


def test_concurrent_calls_from_threads(case):
    """Several Python threads calling the op at once (a data loader computing reference
    log-probs beside the training step): each gets exactly what a call alone gives."""
    import threading

    backend, device = case
    if backend == "triton" and INTERPRET:
        pytest.skip(
            "Triton's interpreter (TRITON_INTERPRET=1) swaps module state while a kernel runs and "
            "is not thread-safe itself; compiled kernels on CUDA are tested"
        )
    results, errors = {}, []

    def call(k):
        try:
            hidden, weight, labels, _ = _inputs(device, torch.float32, seed=k)
            h = hidden.to(device).requires_grad_()
            out = dk.linear_logprobs(h, weight.to(device), labels.to(device), backend=backend)
            out.sum().backward()
            results[k] = (out.detach(), h.grad)
        except Exception as e:  # reported below, with the thread's inputs
            errors.append((k, e))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for k in range(4):
        hidden, weight, labels, _ = _inputs(device, torch.float32, seed=k)
        h = hidden.to(device).requires_grad_()
        out = dk.linear_logprobs(h, weight.to(device), labels.to(device), backend=backend)
        out.sum().backward()
        assert torch.equal(results[k][0], out.detach()) and torch.equal(results[k][1], h.grad)


@pytest.mark.parametrize("scale", [-1.0, 0.0])
def test_masked_lane_with_nonpositive_logit_scale_is_nan_not_overflow(case, scale):
    """A -inf bias lane times logit_scale <= 0 is a +inf or NaN logit from a non-finite input,
    not an overflow: the rows are not finite (found by the fuzzer)."""
    backend, device = case
    hidden, weight, labels, _ = _inputs(device, torch.float32, n=5, v=7)
    labels = labels.clamp(min=1)
    bias = torch.zeros(7).index_fill(0, torch.tensor([0]), float("-inf"))
    got = dk.linear_logprobs(
        hidden.to(device),
        weight.to(device),
        labels.to(device),
        bias.to(device),
        logit_scale=scale,
        backend=backend,
        reduction="none",
    )
    want = naive_logprobs(hidden, weight, labels, bias, logit_scale=scale, reduction="none")
    # float64 log_softmax gives NaN (inf - inf); -inf (the target's probability against a +inf
    # lane) is the limit: either, never a finite number and never an OverflowError
    assert torch.isnan(want["logps"]).all()
    assert not torch.isfinite(got).any(), got
