"""``linear_logprobs(..., vocab_parallel_group=...)`` and ``sequence_parallel_group`` on 2 and 3
real gloo processes, against the single-process op on the whole head: values, every stat and
every gradient, on each backend."""

import pytest
import torch
import torch.distributed as dist

import dpo_kernels as dk
from dpo_kernels.distributed import sequence_parallel_sum

from .helpers import HAS_TRITON, IGNORE, run_ranks

V, D = 89, 24
SHARDS = {2: [30, 59], 3: [20, 40, 29]}  # uneven on purpose


def _inputs(dtype, bias, packed, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 9
    hidden = (torch.randn(b, t, D, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    bias_t = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, :4] = IGNORE  # a prompt
    labels[2] = IGNORE  # a sequence with nothing to score
    if masked:  # the first 20 lanes masked: all of rank 0's shard on 3 ranks, part on 2
        bias_t[:20] = float("-inf")
        labels = torch.where(labels == IGNORE, labels, 20 + labels % (V - 20))
    # Some labels are the argmax (top-1 must be decided across the shards).
    z = hidden.double() @ weight.double().T
    if bias_t is not None:
        z = z + bias_t.double()
    top = z.argmax(-1)
    labels[1, ::2] = top[1, ::2]
    if packed:  # (N, D) rows with cu_seqlens: 3 sequences of 9 tokens, cut as 5, 13, 9
        return (
            hidden.reshape(-1, D),
            weight,
            bias_t,
            labels.reshape(-1),
            torch.tensor([0, 5, 18, 27]),
        )
    return hidden, weight, bias_t, labels, None


def _run(hidden, weight, bias, labels, cu, kw, up, group=None, **more):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    stats = dk.linear_logprobs(
        h, w, labels, b, cu_seqlens=cu, return_stats=True, vocab_parallel_group=group, **kw, **more
    )
    (stats.logps.double() * up).sum().backward()
    return stats, h.grad, w.grad, None if b is None else b.grad


CASES = [
    # backend, dtype, bias, softcap, reduction, packed
    ("cpp", torch.float32, False, None, "sum", False),
    ("cpp", torch.float32, True, 2.5, "mean", True),
    ("cpp", torch.bfloat16, False, None, "none", False),
    ("torch", torch.float64, True, None, "sum", False),
    ("torch", torch.float32, False, 3.0, "none", True),
    ("triton", torch.float32, True, None, "sum", False),
    ("cpp", torch.float32, "masked", None, "sum", False),
]


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]


def _vocab_worker(rank, world, cases):
    sizes = SHARDS[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    for backend, dtype, bias, softcap, reduction, packed in cases:
        if backend == "triton" and not HAS_TRITON:
            continue
        what = f"rank {rank}/{world} {backend} {dtype} bias={bias} softcap={softcap} {reduction}"
        hidden, weight, bias_t, labels, cu = _inputs(
            dtype, bool(bias), packed, masked=bias == "masked"
        )
        kw = dict(backend=backend, softcap=softcap, reduction=reduction, temperature=0.9)
        shape = labels.shape if reduction == "none" else (3,)
        up = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        want, wh, ww, wb = _run(hidden, weight, bias_t, labels, cu, kw, up)
        got, gh, gw, gb = _run(
            hidden,
            weight[lo:hi],
            None if bias_t is None else bias_t[lo:hi],
            labels,
            cu,
            kw,
            up,
            group=dist.group.WORLD,
        )
        tol = _tol(dtype)
        for field in want._fields:
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and a.shape == b.shape, (what, field, a.dtype, b.dtype)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{what}: {field}")
        if reduction != "none":
            assert int(want.top1_correct.sum()) > 0, f"{what}: no top-1 label, the test is weak"
        torch.testing.assert_close(gh, wh, rtol=tol, atol=tol, msg=f"{what}: d hidden")
        torch.testing.assert_close(gw, ww[lo:hi], rtol=tol, atol=tol, msg=f"{what}: d weight")
        if bias:
            torch.testing.assert_close(gb, wb[lo:hi], rtol=tol, atol=tol, msg=f"{what}: d bias")


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_the_single_process_op(world):
    run_ranks(_vocab_worker, world, CASES)


def _mismatch_worker(rank, world):
    hidden, weight, _, labels, _ = _inputs(torch.float32, False, False)
    if rank == 1:
        labels = labels.clone()
        labels[0, 5] = (labels[0, 5] + 1) % V
    with pytest.raises(ValueError, match="same hidden .* same labels"):
        dk.linear_logprobs(
            hidden,
            weight[:44] if rank == 0 else weight[44:],
            labels,
            vocab_parallel_group=dist.group.WORLD,
        )
    # a label past the full vocabulary is refused on every rank (no rank hangs)
    labels = _inputs(torch.float32, False, False)[3].clone()
    labels[1, 1] = V
    with pytest.raises(ValueError, match=r"labels must be in \[0, 89\)"):
        dk.linear_logprobs(
            hidden,
            weight[:44] if rank == 0 else weight[44:],
            labels,
            vocab_parallel_group=dist.group.WORLD,
        )


def test_vocab_parallel_refuses_ranks_that_disagree():
    run_ranks(_mismatch_worker, 2)


def _sequence_worker(rank, world, backend):
    """Each sequence's tokens cut in ``world`` contiguous slices, one per rank."""
    hidden, weight, bias, labels, _ = _inputs(torch.float32, True, False)
    t = labels.shape[1]
    cuts = torch.linspace(0, t, world + 1).round().long().tolist()
    sl = slice(cuts[rank], cuts[rank + 1])
    for reduction in ("sum", "mean"):
        kw = dict(backend=backend, reduction=reduction)
        up = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        want, wh, ww, wb = _run(hidden, weight, bias, labels, None, kw, up)
        got, gh, gw, gb = _run(
            hidden[:, sl].contiguous(),
            weight,
            bias,
            labels[:, sl].contiguous(),
            None,
            kw,
            up,
            sequence_parallel_group=dist.group.WORLD,
        )
        for field in want._fields:
            torch.testing.assert_close(
                getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-5, msg=field
            )
        torch.testing.assert_close(gh, wh[:, sl], rtol=2e-5, atol=2e-5)
        # The head's gradient is the sum of the ranks' (what a data-parallel engine adds up).
        for mine, whole in ((gw, ww), (gb, wb)):
            dist.all_reduce(mine)
            torch.testing.assert_close(mine, whole, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_sums_match_the_unsplit_run(world):
    run_ranks(_sequence_worker, world, "cpp")


def test_sequence_parallel_sum_passes_integers_and_checks_its_input():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sequence_parallel_sum([1.0])


BACKENDS = ["torch", "cpp"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [False, True])
def test_backward_adds_no_onehot_for_a_label_outside_the_shard(backend, kept):
    """The backend contract the vocabulary-parallel op stands on: a row whose label is outside
    ``[0, V)`` gets the gradient of ``−logsumexp`` only (float64 oracle)."""
    from dpo_kernels.backend import LogitOptions, Needs, Rows, get

    be = get(backend)
    if kept and not be.keeps_logits:
        pytest.skip(f"backend {backend!r} does not keep logits (it has no backward_kept)")
    g = torch.Generator().manual_seed(5)
    n, v = 7, 37
    hidden = torch.randn(n, D, generator=g)
    weight = torch.randn(v, D, generator=g)
    bias = torch.randn(v, generator=g)
    labels = torch.tensor([3, v, 36, v, 0, v + 5, 12])  # v and past it: "on another shard"
    rows = torch.arange(n)
    opts = LogitOptions(softcap=4.0)
    up = torch.randn(n, generator=g)
    x = Rows(hidden, weight, bias, rows, labels)
    needs = Needs(True, True, True)
    if kept:
        tok, z = be.forward_kept(x, opts, False)
        got = be.backward_kept(x, z, tok.norm, up, opts, needs)
    else:
        tok = be.forward(x, opts, False)
        got = be.backward(x, tok.norm, up, opts, needs)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    z64 = 4.0 * torch.tanh((h64 @ w64.T + b64) / 4.0)
    lse64 = torch.logsumexp(z64, -1)
    inside = labels < v
    target = z64.gather(1, labels.clamp(max=v - 1)[:, None])[:, 0]
    ((torch.where(inside, target, 0.0) - lse64) * up.double()).sum().backward()
    for name, a, b in (
        ("hidden", got.hidden, h64.grad),
        ("weight", got.weight, w64.grad),
        ("bias", got.bias, b64.grad),
    ):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)
