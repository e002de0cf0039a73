"""Edge cases DESIGN.md lists, determinism, and what a backend does with a bad label."""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import backend as contract

from .helpers import (
    IGNORE,
    INTERPRET,
    assert_close,
    check_grad,
    check_logps,
    make_inputs,
    naive_logprobs,
    run_case,
)


def check_against_oracle(hidden, weight, labels, bias=None, backend="torch", **kw):
    params = [t for t in (hidden, weight, bias) if t is not None]
    out = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend, **kw)
    ref = naive_logprobs(hidden, weight, labels, bias, **kw)["logps"]
    same = naive_logprobs(hidden, weight, labels, bias, dtype=None, **kw)["logps"]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grad_out = grad_out.to(out.device)
    grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, grad_out.double(), allow_unused=True)
    same_grads = torch.autograd.grad(same, params, grad_out.float(), allow_unused=True)
    check_logps(out, ref)
    for g, rg, sg, name in zip(grads, ref_grads, same_grads, ("hidden", "weight", "bias")):
        assert g is not None and torch.isfinite(g).all(), name
        check_grad(g, rg, sg, hidden.dtype, f"d{name}")
    return out, grads


def leaf(x, device, dtype=torch.float32):
    return x.to(device=device, dtype=dtype).requires_grad_()


def test_sequence_with_all_tokens_ignored(case, poison):
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device)
    labels[1] = IGNORE
    for reduction in ("sum", "mean", "none"):
        out, (d_hidden, _, _) = check_against_oracle(
            hidden, weight, labels, bias, backend, reduction=reduction
        )
        assert torch.all(out[1] == 0)
        assert torch.all(d_hidden[1] == 0)


def test_every_token_ignored(case, poison):
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device)
    labels.fill_(IGNORE)
    stats = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend, return_stats=True)
    assert torch.all(stats.logps == 0) and torch.all(stats.num_tokens == 0)
    assert torch.all(stats.entropy_sum == 0)
    grads = torch.autograd.grad(stats.logps.sum(), [hidden, weight, bias])
    assert all(torch.all(g == 0) for g in grads)


def test_one_token(case, poison):
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device, b=1, t=1)
    labels.fill_(7)
    check_against_oracle(hidden, weight, labels, bias, backend)


@pytest.mark.parametrize("vocab", [1, 17, 64, 65])
def test_vocab_sizes_not_multiples_of_tiles(case, vocab, poison):
    backend, device = case
    run_case(backend, device, torch.float32, "padded", "sum", True, {}, v=vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(case, dtype):
    """Logits of magnitude ~1e4: the online max must keep exp() finite."""
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs(
        "padded", False, dtype, device, h_scale=100.0, w_scale=10.0
    )
    with torch.no_grad():
        assert (hidden.float() @ weight.float().T).abs().max() > 1e4
    out, _ = check_against_oracle(hidden, weight, labels, None, backend)
    assert out.abs().max() > 1e4


def test_non_contiguous_inputs(case, poison):
    backend, device = case
    g = torch.Generator().manual_seed(5)
    b, t, d, v = 3, 11, 40, 301
    hidden = leaf(torch.randn(t, b, d, generator=g), device).transpose(0, 1)  # (b, t, d) view
    weight_big = leaf(torch.randn(v, 2 * d, generator=g) * d**-0.5, device)
    weight = weight_big[:, ::2]  # stride 2 along D
    bias_big = leaf(torch.randn(2 * v, generator=g), device)
    bias = bias_big[::2]
    labels = torch.randint(0, v, (t, b), generator=g).to(device).T  # (b, t) view
    assert not (
        hidden.is_contiguous()
        or weight.is_contiguous()
        or bias.is_contiguous()
        or labels.is_contiguous()
    )
    out = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend)
    dense = [x.detach().contiguous().requires_grad_() for x in (hidden, weight, bias)]
    ref = dk.linear_logprobs(dense[0], dense[1], labels.contiguous(), dense[2], backend=backend)
    assert torch.equal(out, ref)
    check_against_oracle(hidden, weight, labels, bias, backend)


@pytest.mark.parametrize("layout", ["batch0", "time0", "packed-empty"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_empty_input(case, layout, reduction):
    backend, device = case
    d, v = 8, 33
    weight = leaf(torch.randn(v, d), device)
    cu = None
    if layout == "batch0":
        hidden, labels, n_out = torch.randn(0, 5, d), torch.zeros(0, 5, dtype=torch.long), 0
    elif layout == "time0":
        hidden, labels, n_out = torch.randn(2, 0, d), torch.zeros(2, 0, dtype=torch.long), 2
    else:
        hidden, labels, n_out = torch.randn(0, d), torch.zeros(0, dtype=torch.long), 2
        cu = torch.zeros(3, dtype=torch.long, device=device)
    hidden = leaf(hidden, device)
    stats = dk.linear_logprobs(
        hidden,
        weight,
        labels.to(device),
        cu_seqlens=cu,
        reduction=reduction,
        backend=backend,
        return_stats=True,
    )
    want_shape = tuple(labels.shape) if reduction == "none" else (n_out,)
    for value in stats:
        assert tuple(value.shape) == want_shape and torch.all(value == 0)
    d_hidden, d_weight = torch.autograd.grad(stats.logps.sum(), [hidden, weight], allow_unused=True)
    assert d_weight is not None and torch.all(d_weight == 0)
    assert d_hidden is not None and d_hidden.shape == hidden.shape


def test_int32_labels_and_float64_inputs():
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float64, "cpu")
    out = dk.linear_logprobs(hidden, weight, labels.int(), bias)
    assert out.dtype == torch.float64
    ref = naive_logprobs(hidden, weight, labels, bias)["logps"]
    assert_close(out, ref, tol=1e-12, what="float64 logps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(case, dtype):
    """Two calls on the same inputs give bitwise-equal outputs and gradients."""
    backend, device = case
    results = []
    for _ in range(2):
        hidden, weight, labels, bias, _ = make_inputs("padded", True, dtype, device)
        stats = dk.linear_logprobs(
            hidden, weight, labels, bias, backend=backend, return_stats=True, softcap=20.0
        )
        grads = torch.autograd.grad(
            stats.logps,
            [hidden, weight, bias],
            torch.linspace(-1, 2, stats.logps.shape[0], device=device),
        )
        results.append(list(stats) + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_label_gives_nan_in_backend(backend):
    """What runs on CUDA without the opt-in check: a bad label is NaN, never plausible."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    hidden, weight, _, bias, _ = make_inputs("padded", True, torch.float32, "cpu")
    vocab = weight.shape[0]
    rows = torch.tensor([0, 1, 2, 5, 6])
    labels_c = torch.tensor([3, vocab, 4, -7, 9])
    seg = torch.tensor([0, 2, 3, 5])
    x = contract.Rows(
        hidden.detach().reshape(-1, hidden.shape[-1]),
        weight.detach(),
        bias.detach(),
        rows,
        labels_c,
    )
    tok = contract.get(backend).forward(x, contract.LogitOptions(), True)
    assert torch.isnan(tok.logps).tolist() == [False, True, False, True, False]
    assert torch.isnan(contract.segment_sum(tok.logps, seg)).tolist() == [True, False, True]
    assert torch.isfinite(tok.max_logit).all() and torch.isfinite(tok.log_s).all()


def test_autocast_with_fp32_master_weights(case):
    """Under AMP, hidden is bf16 and the head fp32: run in bf16 as F.linear would."""
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = dk.linear_logprobs(hidden.bfloat16(), weight, labels, bias, backend=backend)
    out.sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    cast = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    ref = dk.linear_logprobs(*cast[:2], labels, cast[2], backend=backend)
    ref.sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(weight.grad, cast[1].grad.float())


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_gradients_of_a_subset(case, trainable):
    """A frozen head (LoRA) or frozen activations: only the needed gradients, still right."""
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device)
    full = torch.autograd.grad(
        dk.linear_logprobs(hidden, weight, labels, bias, backend=backend).sum(),
        [hidden, weight, bias],
    )
    params = {"hidden": hidden, "weight": weight, "bias": bias}
    for name, p in params.items():
        p.requires_grad_(name == trainable)
    out = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), [params[trainable]])
    assert torch.equal(grad, full[list(params).index(trainable)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_mode(case, dtype):
    """Reference log-probs are often computed under torch.inference_mode(): the same values as
    under no_grad, on every backend (the C++ backend's worker threads must enter it too)."""
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, dtype, device, b=4, t=40)
    kw = dict(backend=backend, return_stats=True, softcap=9.0)
    with torch.no_grad():
        expected = dk.linear_logprobs(hidden, weight, labels, bias, **kw)
    with torch.inference_mode():
        got = dk.linear_logprobs(hidden, weight, labels, bias, **kw)
    assert torch.get_num_threads() >= 2 or backend != "cpp", "needs worker threads to mean much"
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
