"""CUDA only: real LM-head shapes, and the sync-free handling of bad data on the device."""

import pytest
import torch

import dpo_kernels as dk

from .helpers import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")

SHAPES = [  # (N tokens, D, V): Llama-3 8B head, and Gemma-2 2B with its softcap
    (8192, 4096, 128256, None),
    (4096, 2304, 256000, 30.0),
]


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n,d,v,softcap", SHAPES, ids=["llama3-8b", "gemma2-2b"])
def test_large_head_against_fp32_chunked_reference(n, d, v, softcap, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[: n // 4] = -100
    cu = torch.linspace(0, n, 9, device="cuda").long()
    grad_out = torch.randn(8, device="cuda", generator=g)
    out = dk.linear_logprobs(hidden, weight, labels, cu_seqlens=cu, softcap=softcap)
    d_hidden, d_weight = torch.autograd.grad(out, [hidden, weight], grad_out)
    # The reference: the chunked torch backend on the same values in float32.
    h32, w32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
    ref = dk.linear_logprobs(h32, w32, labels, cu_seqlens=cu, softcap=softcap, backend="torch")
    r_hidden, r_weight = torch.autograd.grad(ref, [h32, w32], grad_out)
    assert _rel_err(out, ref) < 1e-5
    # Gradients are written in the input dtype: allow one rounding of it (bf16: 2**-8).
    grad_tol = 2**-7 if dtype == torch.bfloat16 else 1e-4
    assert _rel_err(d_hidden, r_hidden) < grad_tol
    assert _rel_err(d_weight, r_weight) < grad_tol


def _small():
    hidden = torch.randn(2, 6, 16, device="cuda")
    weight = torch.randn(50, 16, device="cuda")
    labels = torch.randint(0, 50, (2, 6), device="cuda")
    return hidden, weight, labels


def _host_syncs(fn):
    """``fn()``'s result and how many host syncs it made, counted by torch's sync debug mode."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchronizing" in str(w.message) for w in caught)


# The op's one documented host sync per pass: counting the valid rows (nonzero) sizes the launches.
OP_SYNCS = 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_label_on_cuda_is_nan_without_a_sync(backend, monkeypatch):
    """A bad label costs no host sync beyond the op's own (no data check reads it back)."""
    monkeypatch.delenv("DPO_KERNELS_VALIDATE", raising=False)
    hidden, weight, labels = _small()
    labels[1, 3] = 50
    dk.linear_logprobs(hidden, weight, labels, backend=backend)  # warm-up: compile, caches
    out, syncs = _host_syncs(lambda: dk.linear_logprobs(hidden, weight, labels, backend=backend))
    assert syncs == OP_SYNCS
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    with pytest.raises(RuntimeError):  # the counter sees syncs: "error" mode raises on one
        torch.cuda.set_sync_debug_mode("error")
        try:
            labels.nonzero()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_validate_opt_in_raises_on_cuda(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_VALIDATE", "1")
    hidden, weight, labels = _small()
    labels[1, 3] = 50
    with pytest.raises(ValueError, match="labels must be in"):
        dk.linear_logprobs(hidden, weight, labels)


def test_bad_cu_seqlens_on_cuda_is_nan_without_a_sync(monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_VALIDATE", raising=False)
    hidden, weight, labels = _small()
    cu = torch.tensor([0, 7, 5, 12], device="cuda")
    out, syncs = _host_syncs(
        lambda: dk.linear_logprobs(
            hidden.reshape(12, 16), weight, labels.reshape(12), cu_seqlens=cu
        )
    )
    assert syncs == OP_SYNCS
    assert torch.isnan(out).all()


def _train_inputs(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 96, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(5000, 256, device="cuda", generator=g) * 0.06).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, 5000, (4, 96), device="cuda", generator=g)
    labels[:, :30] = -100
    return hidden, weight, labels


def test_sync_free_forward_and_backward_make_no_host_sync(monkeypatch):
    """DPO_KERNELS_SYNC_FREE=1: the valid-row count stays on the device in both passes."""
    monkeypatch.setenv("DPO_KERNELS_SYNC_FREE", "1")
    hidden, weight, labels = _train_inputs()

    def step():
        out = dk.linear_logprobs(hidden, weight, labels, backend="triton")
        out.sum().backward()
        return out

    step()  # warm-up: compile, caches
    out, syncs = _host_syncs(step)
    assert syncs == 0
    monkeypatch.delenv("DPO_KERNELS_SYNC_FREE")
    ref = dk.linear_logprobs(hidden, weight, labels, backend="triton")
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_op_runs_under_cuda_graph_capture():
    """Captured in a CUDA graph (the sync-free layout is chosen while capturing) and replayed
    on new data, forward and backward match an eager run."""
    hidden, weight, labels = _train_inputs()
    static_h = hidden.detach().clone().requires_grad_()

    def step():
        out = dk.linear_logprobs(static_h, weight, labels, backend="triton")
        (dh,) = torch.autograd.grad(out.sum(), static_h)
        return out, dh

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture (Triton compiles here)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_dh = step()
    new = torch.randn_like(hidden)
    with torch.no_grad():
        static_h.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager_h = new.clone().requires_grad_()
    out = dk.linear_logprobs(eager_h, weight, labels, backend="triton")
    (dh,) = torch.autograd.grad(out.sum(), eager_h)
    assert torch.allclose(g_out, out, rtol=1e-5, atol=1e-4)
    assert torch.allclose(g_dh.float(), dh.float(), rtol=2e-2, atol=1e-3)
