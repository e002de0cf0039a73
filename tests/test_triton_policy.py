"""The Triton tuning policy: shipped configs fit their devices, autotune is opt-in and the
backward always recomputes with the forward's config and fp32 matmul precision."""

import pytest
import torch

import dpo_kernels as dk

from .helpers import (
    HAS_CUDA,
    INTERPRET,
    D,
    V,
    assert_close,
    make_inputs,
    naive_logprobs,
    run_case,
)

pytest.importorskip("triton")
from dpo_kernels.triton import policy  # noqa: E402

needs_triton_here = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="Triton cannot run on this machine"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("key", sorted(k for k in policy.TABLE if isinstance(k[2], tuple)))
def test_shipped_configs_fit_their_device(key):
    kernel, dkey, cap = key
    dtype = torch.float32 if dkey in ("fp32", "any") else torch.bfloat16
    assert policy.check(policy.TABLE[key], dtype, policy.KNOWN_LIMITS[cap]) is None


def test_check_rejects_what_the_device_cannot_launch():
    h100 = policy.KNOWN_LIMITS[(9, 0)]
    # 5 stages of 128x256x64 bf16 tiles: 245,760 B of shared memory > 232,448 B.
    assert "shared memory" in policy.check(policy.Config(128, 256, 64, 8, 5), torch.bfloat16, h100)
    assert "registers" in policy.check(policy.Config(256, 256, 64, 4, 2), torch.bfloat16, h100)
    assert "threads" in policy.check(policy.Config(64, 64, 32, 64, 2), torch.bfloat16, h100)
    pool = policy.CANDIDATES["gpu"]
    fits = [c for c in pool if policy.check(c, torch.bfloat16, h100) is None]
    assert 0 < len(fits) < len(pool)  # the autotune list is pruned on the host


def test_lookup_falls_back_by_capability():
    assert policy.lookup("fused", torch.bfloat16, (9, 1)) == policy.TABLE[("fused", "half", (9, 0))]
    assert (
        policy.lookup("fused", torch.float16, (7, 5)) == policy.TABLE[("fused", "half", "default")]
    )
    assert policy.lookup("combine", torch.float32, (9, 0)).block_n == 1024


def test_fp32_precision_follows_the_call():
    assert policy.fp32_precision(torch.float32, True) == "tf32"
    assert policy.fp32_precision(torch.float32, False) == "ieee"
    assert policy.fp32_precision(torch.bfloat16, True) == "ieee"  # 16-bit dots ignore TF32


def test_program_order_is_sized_from_the_l2():
    h100 = policy.KNOWN_LIMITS[(9, 0)]
    cfg = policy.lookup("fused", torch.bfloat16, (9, 0))
    n_splits, split = policy.vocab_splits(16384, 128256, 4096, 2, cfg, h100)
    resident = policy.resident_programs(cfg, h100)
    # The row blocks resident together (one per split group) hold at most half the L2.
    assert -(-resident // n_splits) * cfg.block_n * 4096 * 2 <= h100.l2_bytes // 2 + 2**20
    assert split % cfg.block_v == 0 and n_splits * split >= 128256
    group = policy.grad_group(cfg, 4096, 2, h100)
    assert group in (8, 16)


def _spy(monkeypatch, record):
    real = policy.fused_config

    def spy(*args, **kwargs):
        cfg = real(*args, **kwargs)
        record.append((kwargs["allow_tf32"], kwargs["bench"] is not None, cfg))
        return cfg

    monkeypatch.setattr(policy, "fused_config", spy)


def _grads(hidden, weight, labels, bias, between=None):
    for t in (hidden, weight, bias):
        t.grad = None
    out = dk.linear_logprobs(hidden, weight, labels, bias, backend="triton")
    if between is not None:
        between()
    g = torch.randn_like(out)
    out.backward(g)
    return out, g


@needs_triton_here
def test_tf32_flag_is_saved_for_the_backward(monkeypatch):
    """A flag flipped between forward and backward does not reach the backward's recompute."""
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, DEVICE)
    record = []
    _spy(monkeypatch, record)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        _grads(
            hidden,
            weight,
            labels,
            bias,
            lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
        )
        assert [r[0] for r in record] == [False, False]  # forward, backward
        record.clear()
        torch.backends.cuda.matmul.allow_tf32 = True
        dk.linear_logprobs(hidden, weight, labels, bias, backend="triton")
        assert record[0][0] is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@needs_triton_here
def test_autotune_is_opt_in_and_shared_with_the_backward(monkeypatch):
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, DEVICE)
    candidates = (
        policy.Config(32, 32, 16, 4, 1, group=2),
        policy.Config(16, 128, 16, 4, 1, group=3),
    )
    monkeypatch.setitem(policy.CANDIDATES, "interp", candidates)
    monkeypatch.setattr(policy, "_TUNED", {})
    timed = []
    real_time = policy.time_call
    monkeypatch.setattr(policy, "time_call", lambda fn, dev: timed.append(1) or real_time(fn, dev))
    record = []
    _spy(monkeypatch, record)

    # Off by default: the table's config, nothing timed.
    _grads(hidden, weight, labels, bias)
    assert not timed and all(r[2] == record[0][2] for r in record)
    assert record[0][2] not in candidates

    # On: the forward times the candidates once; the backward reuses its pick even if the
    # variable is unset in between, and gets the oracle's answer.
    record.clear()
    monkeypatch.setenv("DPO_KERNELS_AUTOTUNE", "1")
    out, g = _grads(
        hidden, weight, labels, bias, lambda: monkeypatch.delenv("DPO_KERNELS_AUTOTUNE")
    )
    if INTERPRET:  # on a GPU the real candidate list is timed instead
        assert len(timed) == len(candidates)  # each candidate timed once (median of 3)
        assert record[0][2] in candidates
    assert record[0][1] and not record[1][1]  # only the forward may tune
    assert record[1][2] == record[0][2]
    ref = naive_logprobs(hidden, weight, labels, bias)["logps"]
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias), g.double())
    assert_close(out, ref, tol=2e-6, what="logps")  # fp32: the oracle suite's tolerances
    for ours, theirs, name in zip((hidden.grad, weight.grad, bias.grad), ref_grads, "hwb"):
        assert_close(ours, theirs, tol=2e-6, what=f"d{name}")
    assert D % 16 != 0 or V % 16 != 0  # the odd test shapes: masks in every candidate


@needs_triton_here
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sync_free_layout_matches_the_oracle(layout, reduction, monkeypatch, poison):
    """DPO_KERNELS_SYNC_FREE=1 (what CUDA-graph capture selects): all N rows reach the kernels
    with the valid-row count on the device; results and gradients still match the oracle, and
    nothing past the count leaks out (``poison`` fills every unwritten buffer with NaN)."""
    from dpo_kernels import triton as tri

    monkeypatch.setenv("DPO_KERNELS_SYNC_FREE", "1")
    seen = []
    real_fwd, real_bwd = tri.TritonBackend.forward, tri.TritonBackend.backward

    def fwd(self, x, *a):
        seen.append((x.count is not None, x.rows.shape[0] == x.hidden.shape[0]))
        return real_fwd(self, x, *a)

    def bwd(self, x, *a):
        seen.append((x.count is not None, x.rows.shape[0] == x.hidden.shape[0]))
        return real_bwd(self, x, *a)

    monkeypatch.setattr(tri.TritonBackend, "forward", fwd)
    monkeypatch.setattr(tri.TritonBackend, "backward", bwd)
    run_case("triton", DEVICE, torch.float32, layout, reduction, True, {"softcap": 5.0})
    assert seen == [(True, True), (True, True)]


def test_a_table_config_too_big_for_the_device_is_replaced(monkeypatch):
    """A device with less shared memory than its family's table entry assumes gets the largest
    candidate that fits, never a launch that fails with OutOfResources."""
    small = policy.Limits(48 * 2**10, 4 * 2**20, 30)
    monkeypatch.setattr(policy, "limits", lambda device: small)
    monkeypatch.setattr(policy, "capability", lambda device: (9, 0))
    cfg = policy.fused_config(
        torch.bfloat16, torch.device("cpu"), 4096, 4096, 128256, allow_tf32=False, autotune=False
    )
    assert cfg != policy.TABLE[("fused", "half", (9, 0))]
    assert policy.check(cfg, torch.bfloat16, small) is None
