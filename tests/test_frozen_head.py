"""Frozen head (LoRA / PEFT, a reference model trained through): no dW work, and the 4·N·D·V
Jacobian path whose backward is a scale; both against the float64 oracle."""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import backend as contract

from .helpers import check_grad, check_logps, make_inputs, naive_logprobs


def _frozen_case(case, dtype, layout, reduction, path, monkeypatch, opts=None):
    backend, device = case
    monkeypatch.setenv("DPO_KERNELS_FROZEN_PATH", path)
    hidden, weight, labels, bias, cu = make_inputs(layout, True, dtype, device)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    kw = dict(reduction=reduction, cu_seqlens=cu, **(opts or {}))
    calls = []
    chosen = contract.get(backend)
    for name in ("forward", "forward_jacobian", "backward"):
        real = getattr(type(chosen), name)
        monkeypatch.setattr(
            type(chosen), name, lambda self, *a, _r=real, _n=name: calls.append(_n) or _r(self, *a)
        )
    out = dk.linear_logprobs(hidden, weight, labels, bias, backend=backend, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (d_hidden,) = torch.autograd.grad(out, hidden, grad_out)
    ref = naive_logprobs(hidden, weight, labels, bias, **kw)["logps"]
    (ref_grad,) = torch.autograd.grad(ref, hidden, grad_out.double())
    same = naive_logprobs(hidden, weight, labels, bias, dtype=None, **kw)["logps"]
    (same_grad,) = torch.autograd.grad(same, hidden, grad_out.float())
    check_logps(out, ref)
    check_grad(d_hidden, ref_grad, same_grad, dtype, "dhidden")
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,reduction", [("padded", "sum"), ("packed", "none")])
def test_jacobian_path(case, dtype, layout, reduction, monkeypatch):
    backend, _ = case
    if not contract.get(backend).jacobian:
        pytest.skip(f"backend {backend!r} has no Jacobian path (it takes the recompute path)")
    calls = _frozen_case(case, dtype, layout, reduction, "jacobian", monkeypatch, {"softcap": 4.0})
    assert calls == ["forward_jacobian"]  # the backward is a scale: no backend call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recompute_path_skips_dw(case, dtype, monkeypatch):
    calls = _frozen_case(case, dtype, "padded", "mean", "recompute", monkeypatch)
    assert calls == ["forward", "backward"]


def test_jacobian_path_is_only_for_a_frozen_head(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_FROZEN_PATH", "jacobian")
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, "cpu")
    calls = []
    real = contract.get("torch").forward_jacobian
    monkeypatch.setattr(
        type(contract.get("torch")),
        "forward_jacobian",
        lambda self, *a: calls.append(1) or real(*a),
    )
    dk.linear_logprobs(hidden, weight, labels, bias, backend="torch").sum().backward()
    with torch.no_grad():  # the reference pass: no gradient at all, plain forward
        dk.linear_logprobs(hidden, weight.detach(), labels, backend="torch")
    assert calls == []


def test_frozen_path_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_FROZEN_PATH", "fast")
    hidden, weight, labels, _, _ = make_inputs("padded", False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="DPO_KERNELS_FROZEN_PATH"):
        dk.linear_logprobs(hidden, weight.detach(), labels, backend="torch")
