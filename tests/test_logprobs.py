"""Values and gradients of linear_logprobs against a float64 oracle, for every backend."""

import pytest
import torch

import dpo_kernels as dk

from .oracle import IGNORE, VALUE_TOL, assert_close, check_grad, check_logps, naive_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (name, layout, reduction, bias, options): spans reductions, layouts and logit transforms.
VARIANTS = [
    ("plain", "padded", "sum", False, {}),
    ("mean-bias-temp", "padded", "mean", True, {"temperature": 0.7}),
    ("none-softcap", "padded", "none", True,
     {"softcap": 5.0, "logit_scale": 1.7, "temperature": 1.3}),
    ("packed-softcap30", "packed", "sum", True, {"softcap": 30.0}),
    ("packed-none-scale", "packed", "none", False, {"logit_scale": 0.5}),
    ("packed-mean", "packed", "mean", False, {"temperature": 2.0}),
]

B, T, D, V = 3, 13, 48, 1001  # 37-ish valid rows, several vocab tiles and splits, odd sizes


def make_inputs(layout, bias, dtype, device, *, b=B, t=T, d=D, v=V, seed=0, h_scale=1.0,
                w_scale=None):
    g = torch.Generator().manual_seed(seed)
    w_scale = d**-0.5 if w_scale is None else w_scale
    if layout == "padded":
        hidden = torch.randn(b, t, d, generator=g) * h_scale
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[:, : t // 4] = IGNORE            # a prompt
        labels[-1, -2:] = IGNORE                 # padding
        cu = None
    else:
        lens = torch.tensor([5, 0, 17, 1, 11])  # an empty sequence, a one-token sequence
        n = int(lens.sum())
        hidden = torch.randn(n, d, generator=g) * h_scale
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.3] = IGNORE
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
    weight = torch.randn(v, d, generator=g) * w_scale
    bias_t = torch.randn(v, generator=g) if bias else None
    cast = lambda x: x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return (cast(hidden), cast(weight), labels.to(device),
            None if bias_t is None else cast(bias_t), cu)


def run_case(backend, device, dtype, layout, reduction, bias, opts, **shape):
    hidden, weight, labels, bias_t, cu = make_inputs(layout, bias, dtype, device, **shape)
    params = [hidden, weight] + ([bias_t] if bias_t is not None else [])
    kw = dict(reduction=reduction, cu_seqlens=cu, **opts)
    out = dk.linear_logprobs(hidden, weight, labels, bias_t, backend=backend, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(out, params, grad_out)

    ref = naive_logprobs(hidden, weight, labels, bias_t, **kw)["logps"]
    ref_grads = torch.autograd.grad(ref, params, grad_out.double())
    same = naive_logprobs(hidden, weight, labels, bias_t, dtype=None, **kw)["logps"]
    same_grads = torch.autograd.grad(same, params, grad_out.float())
    check_logps(out, ref)
    for name, g, rg, sg in zip(["hidden", "weight", "bias"], grads, ref_grads, same_grads):
        check_grad(g, rg, sg, dtype, f"d{name}")
    return out, grads


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
    got = dk.linear_logprobs(hidden, weight, labels, bias, reduction=reduction,
                             return_stats=True, backend=backend, **opts)
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

    t = policy.tiles(torch.float32, torch.device("cpu"))
    n_valid = 26  # a lower bound for make_inputs("padded")
    n_splits, split = policy.vocab_splits(n_valid, V, t, torch.device("cpu"))
    assert n_splits >= 3 and split // t.block_v >= 2 and V % t.block_v != 0
    assert -(-n_valid // t.block_n) >= 2 and D % t.block_d != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backends_agree(dtype):
    """Triton (interpreted or CUDA) and the torch reference agree with each other too."""
    pytest.importorskip("triton")
    from .conftest import HAS_CUDA, INTERPRET

    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton cannot run on this machine")
    hidden, weight, labels, bias, _ = make_inputs("padded", True, dtype, device)
    a = dk.linear_logprobs(hidden, weight, labels, bias, backend="torch", return_stats=True)
    b = dk.linear_logprobs(hidden, weight, labels, bias, backend="triton", return_stats=True)
    for x, y, name in zip(a, b, a._fields):
        assert_close(y, x, tol=VALUE_TOL, what=name)  # both keep fp32 logits
