"""No allocation reaches N·V/4 elements: full logits never exist, not even in the backward."""

import pytest
import torch

import dpo_kernels as dk

from .helpers import AllocationRecorder, make_inputs, naive_logprobs

# N·V/4 = 32768 > V·D = 16384 > N·D = 2048: the bound catches logits, not the head or activations.
B, T, D, V = 2, 64, 16, 1024
N = B * T
BOUND = N * V // 4


def _inputs():
    hidden, weight, labels, bias, _ = make_inputs(
        "padded", True, torch.float32, "cpu", b=B, t=T, d=D, v=V
    )
    return hidden, weight, labels, bias


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_allocation_reaches_a_quarter_of_the_logits(case, reduction, monkeypatch):
    backend, device = case
    if device != "cpu":
        pytest.skip("allocations are recorded on the CPU")
    # The default budget (256 MiB) holds this toy problem whole; a budget of 1/16 of the logits
    # makes the chunking visible at a size the interpreter runs in seconds.
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", str(N * V * 4 / 16 / 2**20))
    hidden, weight, labels, bias = _inputs()
    rec = AllocationRecorder()
    with rec:
        stats = dk.linear_logprobs(
            hidden, weight, labels, bias, backend=backend, reduction=reduction, return_stats=True
        )
        stats.logps.sum().backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    assert rec.largest >= V * D, "the recorder missed the weight gradient"
    assert rec.largest < BOUND, f"{rec.where} allocated {rec.largest} elements (>= {BOUND})"


def test_recorder_catches_materialised_logits():
    """The same recorder flags the naive [N × V] logits, so the test above can fail."""
    hidden, weight, labels, bias = _inputs()
    rec = AllocationRecorder()
    with rec:
        naive_logprobs(hidden, weight, labels, bias, dtype=torch.float32)["logps"].sum().backward()
    assert rec.largest >= N * V


@pytest.mark.parametrize("module", ["dpo", "dpo_ld", "orpo", "kto"])
def test_loss_modules_stay_below_a_quarter_of_the_logits(module, monkeypatch):
    """The modules add a reference pass, stats and (LD-DPO) per-token log-probs, never logits."""
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", str(N * V * 4 / 16 / 2**20))
    hidden, weight, labels, bias = _inputs()
    ref_h, ref_w = hidden.detach().clone(), weight.detach().clone()
    rec = AllocationRecorder()
    with rec:
        if module.startswith("dpo"):
            fn = dk.FusedLinearDPOLoss(
                backend="torch", compute_nll_loss=True, ld_alpha=0.5 if module == "dpo_ld" else None
            )
            loss, _ = fn(weight, hidden, labels, bias, ref_h, ref_w)
        elif module == "orpo":
            loss, _ = dk.FusedLinearORPOLoss(backend="torch")(weight, hidden, labels, bias)
        else:
            prefs = torch.tensor([True, False])
            loss, _ = dk.FusedLinearKTOLoss(backend="torch", use_ref_model=True)(
                hidden, weight, labels, bias, prefs, ref_h, ref_w
            )
        loss.backward()
    assert rec.largest >= V * D, "the recorder missed the weight gradient"
    assert rec.largest < BOUND, f"{rec.where} allocated {rec.largest} elements (>= {BOUND})"
