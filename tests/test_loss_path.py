"""The loss-level fast path (:mod:`dpo_kernels.loss_path`): the loss modules score chunks of
pairs with their logits kept and form the gradients at once (6·N·D·V for the policy, no
recompute). Checked against the float64 oracle (every logit materialised), against the recompute
path on the same inputs, for where it must not apply, and for its memory bound."""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import backend as backend_mod
from dpo_kernels import loss_path

from .helpers import HAS_TRITON, IGNORE, INTERPRET, AllocationRecorder, check_grad, naive_logprobs

PAIRS, T, D, V = 3, 13, 48, 1001
# The tensors here are CPU tensors: Triton runs them under its interpreter (TRITON_INTERPRET=1,
# the CPU test run); on a GPU machine tests/test_cuda.py runs it compiled.
BACKENDS = ["cpp", "torch"] + (["triton"] if HAS_TRITON and INTERPRET else [])


def make(dtype=torch.float32, pairs=PAIRS, t=T, d=D, v=V, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    hidden = torch.randn(n, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * d**-0.5
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, v, (n, t), generator=g)
    prompt = torch.randint(1, t // 2, (n,), generator=g)
    end = torch.randint(t // 2 + 1, t + 1, (n,), generator=g)  # different completion lengths
    pos = torch.arange(t)
    labels[(pos < prompt[:, None]) | (pos >= end[:, None])] = IGNORE
    ref = torch.randn(n, generator=g) * 3 - 40.0  # the reference's per-sequence log-probs

    def leaf(x):
        return None if x is None else x.to(dtype).requires_grad_()

    return leaf(hidden), leaf(weight), leaf(b), labels, ref


def oracle(h, w, b, labels, ref, loss_type, nll, avg, dtype=torch.float64, softcap=None):
    """The module's loss through every logit (float64, or ``dtype=None``: torch in the input
    dtype), from the same loss formulas."""
    st = naive_logprobs(h, w, labels, b, dtype=dtype, softcap=softcap)
    sums, num = st["logps"], st["num_tokens"]
    logps = sums / num.clamp(min=1) if avg else sums
    half = logps.shape[0] // 2
    out = dk.preference_loss(
        logps[:half],
        logps[half:],
        ref[:half].to(logps.dtype),
        ref[half:].to(logps.dtype),
        loss_type=loss_type,
        beta=0.1,
        chosen_num_tokens=num[:half],
        rejected_num_tokens=num[half:],
    )
    loss = out[0].mean()
    if nll:
        loss = loss + 0.5 * (-sums[:half].sum() / num[:half].sum())
    return loss


def module(loss_type, nll, avg, backend, softcap=None):
    return dk.FusedLinearDPOLoss(
        softcap=softcap,
        beta=0.1,
        alpha=0.5,
        compute_nll_loss=nll,
        average_log_prob=avg,
        loss_type=loss_type,
        backend=backend,
    )


def run(mod, h, w, b, labels, ref, upstream=1.0):
    half = h.shape[0] // 2
    loss, _ = mod(w, h, labels, b, ref_chosen_logps=ref[:half], ref_rejected_logps=ref[half:])
    params = [p for p in (h, w, b) if p is not None]
    grads = torch.autograd.grad(loss * upstream, params)
    return loss.detach(), grads


def one_pair_mb(labels, v=V):
    """A budget (MiB) that holds the largest pair's fp32 logits, and no two pairs of ``make``'s."""
    n = (labels != IGNORE).sum(dim=1)
    per_pair = (n[: n.shape[0] // 2] + n[n.shape[0] // 2 :]) * v * 4
    assert (per_pair[:-1] + per_pair[1:]).min() > per_pair.max()
    return str(per_pair.max().item() / 2**20)


class Spy:
    """Counts the calls of the loss-level path's backend methods (and of the recompute path's)."""

    def __init__(self, monkeypatch, name):
        self.calls = {"forward_kept": 0, "backward_kept": 0, "backward": 0}
        be = backend_mod.get(name)
        for meth in self.calls:
            real = getattr(be, meth)

            def wrapped(*a, _real=real, _m=meth, **k):
                self.calls[_m] += 1
                return _real(*a, **k)

            monkeypatch.setattr(be, meth, wrapped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks_of", ["batch", "pair"])
@pytest.mark.parametrize(
    "loss_type, nll, avg, softcap",
    [
        ("sigmoid", False, False, None),
        ("ipo", True, False, None),
        ("hinge", True, True, None),
        ("sigmoid", True, False, 2.0),  # Gemma-2's final_logit_softcapping, strongly curved
    ],
)
def test_matches_oracle(monkeypatch, backend, dtype, chunks_of, loss_type, nll, avg, softcap):
    h, w, b, labels, ref = make(dtype)
    chunk_mb = one_pair_mb(labels) if chunks_of == "pair" else None
    if chunk_mb is not None:
        monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", chunk_mb)
    chunks = loss_path.plan(h, w, b, labels, ignore_index=IGNORE, backend=backend, separable=True)
    if chunk_mb is not None and dtype != torch.float32:
        # A bf16 head's gradient would be rounded once per chunk: the recompute path instead.
        assert isinstance(chunks, str) and "rounded once per chunk" in chunks
    else:
        assert isinstance(chunks, list), chunks
        assert len(chunks) == (1 if chunk_mb is None else PAIRS)
    spy = Spy(monkeypatch, backend)
    loss, grads = run(module(loss_type, nll, avg, backend, softcap), h, w, b, labels, ref)
    fused = isinstance(chunks, list)
    assert spy.calls["forward_kept"] == (len(chunks) if fused else 0)
    assert spy.calls["backward_kept"] == spy.calls["forward_kept"]
    assert spy.calls["backward"] == (0 if fused else 1)  # no recompute on the fused path

    params = [p for p in (h, w, b) if p is not None]
    want = oracle(h, w, b, labels, ref, loss_type, nll, avg, softcap=softcap)
    want_grads = torch.autograd.grad(want, params)
    same = oracle(h, w, b, labels, ref, loss_type, nll, avg, dtype=None, softcap=softcap)
    same_grads = torch.autograd.grad(same, params)
    assert abs(loss.double() - want).item() <= 2e-6 * max(1.0, abs(want.item())), (loss, want)
    for name, g, rg, sg in zip(("hidden", "weight", "bias"), grads, want_grads, same_grads):
        check_grad(g, rg, sg, dtype, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["dpo", "simpo"])
def test_same_as_recompute_path(monkeypatch, backend, cls):
    """Both paths on one batch: the values come from the same forward; outputs, metrics and
    gradients agree to fp32 rounding (the order of the GEMMs' sums may differ)."""
    h, w, b, labels, ref = make()
    half = h.shape[0] // 2

    def go():
        if cls == "simpo":
            loss, out = dk.FusedLinearSimPOLoss(backend=backend)(w, h, labels, b)
        else:
            mod = dk.FusedLinearDPOLoss(backend=backend, compute_nll_loss=True, use_weighting=True)
            kw = dict(ref_chosen_logps=ref[:half], ref_rejected_logps=ref[half:])
            loss, out = mod(w, h, labels, b, **kw)
        return loss.detach(), out, torch.autograd.grad(loss, [h, w, b])

    spy = Spy(monkeypatch, backend)
    fused = go()
    assert spy.calls["forward_kept"] == 1 and spy.calls["backward"] == 0
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", "recompute")
    plain = go()
    assert spy.calls["forward_kept"] == 1 and spy.calls["backward"] == 1
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, c in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    for key in fused[1].metrics:
        torch.testing.assert_close(fused[1].metrics[key], plain[1].metrics[key])
    for a, c in zip(fused[2], plain[2]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_and_other_modules(backend):
    """``(k · loss).backward()`` scales every gradient by k; CPO and ORPO go through the path
    and match the recompute path."""
    h, w, b, labels, ref = make()
    mod = module("sigmoid", True, False, backend)
    _, g1 = run(mod, h, w, b, labels, ref)
    _, g3 = run(mod, h, w, b, labels, ref, upstream=-3.0)
    for x, y in zip(g1, g3):
        torch.testing.assert_close(y, -3.0 * x, rtol=1e-6, atol=1e-7)
    for cls in (dk.FusedLinearCPOLoss, dk.FusedLinearORPOLoss):
        outs = []
        for mode in ("auto", "recompute"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DPO_KERNELS_LOSS_PATH", mode)
                loss, _ = cls(backend=backend)(w, h, labels, b)
                outs.append((loss.detach(), torch.autograd.grad(loss, [h, w, b])))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        for x, y in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks_of", ["batch", "sequence"])
def test_kto_module_takes_the_path(monkeypatch, backend, chunks_of):
    """KTO (unpaired: a chunk is a run of sequences; the KL estimate is detached, so the loss is
    a sum over sequences): the path runs, one backend call per chunk and no recompute, and the
    loss and gradients are the float64 oracle's and the recompute path's."""
    h, w, b, labels, ref = make()
    n = h.shape[0]
    desirable = torch.tensor([True, False, True, True, False, False])
    if chunks_of == "sequence":  # room for the longest sequence's logits, never two
        rows = (labels != IGNORE).sum(dim=1) * V * 4
        assert (rows[:-1] + rows[1:]).min() > rows.max()
        monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", str(rows.max().item() / 2**20))
    kl = torch.tensor(0.3)

    def go():
        mod = dk.FusedLinearKTOLoss(beta=0.2, undesirable_weight=1.5, backend=backend)
        loss, out = mod(h, w, labels, b, desirable, ref_logps=ref, kl=kl)
        return loss.detach(), out, torch.autograd.grad(loss, [h, w, b])

    spy = Spy(monkeypatch, backend)
    fused = go()
    want_calls = 1 if chunks_of == "batch" else n
    assert spy.calls["forward_kept"] == want_calls and spy.calls["backward"] == 0, spy.calls
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", "recompute")
    plain = go()
    assert spy.calls["backward"] == 1

    params = [h, w, b]
    logps = naive_logprobs(h, w, labels, b, dtype=torch.float64)["logps"]
    want = dk.kto_loss(logps, ref.double(), desirable, beta=0.2, undesirable_weight=1.5, kl=kl)
    want = want.losses.mean()
    want_grads = torch.autograd.grad(want, params)
    assert abs(fused[0].double() - want).item() <= 2e-6 * max(1.0, abs(want.item()))
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, c in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    for name, g, pg, rg in zip(("hidden", "weight", "bias"), fused[2], plain[2], want_grads):
        torch.testing.assert_close(g, pg, rtol=1e-5, atol=1e-6, msg=f"d{name} vs recompute")
        check_grad(g, rg, pg, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks_of", ["batch", "pair"])
def test_packed_rows_match_the_padded_batch(monkeypatch, backend, chunks_of):
    """``cu_seqlens``: the same sequences packed into one row without padding (the TRL drop-in's
    padding_free) give the padded batch's statistics and gradients, chunk for chunk."""
    h, w, b, labels, ref = make()
    n, t, d = h.shape
    keep = labels != IGNORE
    # Pack each sequence from its first to its last scored token (the rest is padding).
    pos = torch.arange(t)
    first = torch.where(keep, pos, t).amin(dim=1)
    last = torch.where(keep, pos, -1).amax(dim=1)
    spans = [(int(first[i]), int(last[i]) + 1) for i in range(n)]
    hp = torch.cat([h.detach()[i, a:e] for i, (a, e) in enumerate(spans)]).requires_grad_()
    lp = torch.cat([labels[i, a:e] for i, (a, e) in enumerate(spans)])
    lengths = torch.tensor([e - a for a, e in spans])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if chunks_of == "pair":
        monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", one_pair_mb(labels))
    half = n // 2

    def chunk_loss(stats, pairs):
        c, r = stats.logps[: stats.logps.shape[0] // 2], stats.logps[stats.logps.shape[0] // 2 :]
        rc, rr = ref[:half][pairs], ref[half:][pairs]
        return dk.preference_loss(c, r, rc, rr, beta=0.1).losses.sum() / half

    kw = dict(ignore_index=IGNORE, backend=backend, separable=True)
    got = []
    for hid, lab, cu_ in ((h, labels, None), (hp, lp, cu)):
        chunks = loss_path.plan(hid, w, b, lab, cu_seqlens=cu_, **kw)
        assert isinstance(chunks, list) and len(chunks) == (1 if chunks_of == "batch" else half)
        carrier, stats = loss_path.fused_pair_loss(
            hid,
            w,
            lab,
            b,
            chunk_loss,
            chunks,
            ignore_index=IGNORE,
            backend=backend,
            cu_seqlens=cu_,
        )
        grads = torch.autograd.grad(carrier, [hid, w, b])
        got.append((stats, grads))
    (ps, pg), (qs, qg) = got
    for f in ps._fields:
        torch.testing.assert_close(getattr(qs, f), getattr(ps, f), rtol=1e-6, atol=1e-6)
    dh_padded = torch.cat([pg[0][i, a:e] for i, (a, e) in enumerate(spans)])
    torch.testing.assert_close(qg[0], dh_padded, rtol=1e-5, atol=1e-7)
    for x, y in zip(qg[1:], pg[1:]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_where_it_does_not_apply(monkeypatch):
    h, w, b, labels, ref = make()
    kw = dict(ignore_index=IGNORE, backend="cpp")
    assert isinstance(loss_path.plan(h, w, b, labels, separable=False, **kw), list)
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", one_pair_mb(labels))
    assert "couples the pairs" in loss_path.plan(h, w, b, labels, separable=False, **kw)
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", "0.001")  # not even one pair
    assert "exceed the memory budget" in loss_path.plan(h, w, b, labels, separable=True, **kw)
    monkeypatch.delenv("DPO_KERNELS_CHUNK_MB")
    with torch.no_grad():
        assert loss_path.plan(h, w, b, labels, separable=True, **kw) == "gradients are off"
    frozen = [t.detach() for t in (h, w, b)]
    assert "no input needs" in loss_path.plan(*frozen, labels, separable=True, **kw)
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", "recompute")
    assert "recompute" in loss_path.plan(h, w, b, labels, separable=True, **kw)
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", "fast")
    with pytest.raises(ValueError, match="DPO_KERNELS_LOSS_PATH"):
        loss_path.plan(h, w, b, labels, separable=True, **kw)


@pytest.mark.parametrize("loss_type", ["aot", "sft"])
def test_coupled_losses_one_chunk_or_recompute(monkeypatch, loss_type):
    """A loss that couples the pairs is right in one chunk, and takes the recompute path when
    the batch needs several."""
    h, w, b, labels, ref = make()
    params = [h, w, b]
    want = oracle(h, w, b, labels, ref, loss_type, False, False)
    want_grads = torch.autograd.grad(want, params)
    for chunk_mb, fused in ((None, True), (one_pair_mb(labels), False)):
        if chunk_mb:
            monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", chunk_mb)
        spy = Spy(monkeypatch, "cpp")
        loss, grads = run(module(loss_type, False, False, "cpp"), h, w, b, labels, ref)
        assert (spy.calls["forward_kept"] > 0) == fused
        assert abs(loss.double() - want).item() <= 2e-6 * max(1.0, abs(want.item()))
        for g, rg in zip(grads, want_grads):
            torch.testing.assert_close(g.double(), rg.double(), rtol=2e-5, atol=2e-6)


def test_pairs_without_tokens(monkeypatch):
    """A pair whose sequences have no scored token, alone in its chunk, costs no backend call
    and gets no gradient."""
    h, w, b, labels, ref = make()
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", one_pair_mb(labels))
    labels[1] = IGNORE
    labels[1 + PAIRS] = IGNORE
    spy = Spy(monkeypatch, "cpp")
    loss, grads = run(module("sigmoid", True, False, "cpp"), h, w, b, labels, ref)
    assert spy.calls["forward_kept"] == PAIRS - 1
    params = [h, w, b]
    want_grads = torch.autograd.grad(oracle(h, w, b, labels, ref, "sigmoid", True, False), params)
    assert torch.isfinite(loss)
    assert grads[0][1].abs().max() == 0 and grads[0][1 + PAIRS].abs().max() == 0
    for g, rg in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), rg.double(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bounded_by_budget(monkeypatch, backend):
    """At a batch whose logits are far above the budget, no allocation exceeds the budget: one
    chunk of kept logits at a time (and the head-sized gradient)."""
    pairs, t, d, v = 8, 64, 16, 2048  # a pair's logits at most 1 MiB in fp32, the batch's ~4
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", "1")
    h, w, b, labels, ref = make(pairs=pairs, t=t, d=d, v=v)
    chunks = loss_path.plan(h, w, b, labels, ignore_index=IGNORE, backend=backend, separable=True)
    assert isinstance(chunks, list) and len(chunks) >= 3, chunks
    rows = int((labels != IGNORE).sum())
    assert rows * v * 4 > 3 * 2**20
    rec = AllocationRecorder()
    with rec:
        run(module("sigmoid", True, False, backend), h, w, b, labels, ref)
    assert rec.largest_bytes <= 2**20, (rec.where, rec.largest_bytes)


def test_module_never_widens_a_bf16_head():
    """A module's call makes no fp32 copy of a bf16 head (Liger's logits means once summed the
    head with ``sum(dtype=float32)``, which widens all of it inside the op: invisible to an
    allocation recorder, so the resident size is measured)."""
    from dpo_kernels.bench.worker import PeakMeter

    h, w, b, labels, ref = make(torch.bfloat16, d=1024, v=16384)  # fp32 copy: 64 MiB
    mod = module("sigmoid", True, False, "cpp")
    kw = dict(ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])
    with torch.no_grad():

        def run_once():
            return mod(w, h, labels, b, **kw)

        run_once()  # first-call buffers
        meter = PeakMeter(False)
        if not meter.ok:
            pytest.skip("this kernel cannot reset the peak resident size (/proc/self/clear_refs)")
        run_once()
    assert meter.delta_mb() < w.numel() * 4 / 2**20 / 4, meter.delta_mb()


def test_torch_compile_takes_the_plain_op(monkeypatch):
    """Under ``torch.compile`` the modules run the plain custom op (one opaque op with a known
    backward), with the eager path's results."""
    h, w, b, labels, ref = make()
    mod = module("sigmoid", True, False, "cpp")
    kw = dict(ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])

    def loss_of(w_, h_, b_):
        return mod(w_, h_, labels, b_, **kw)[0]

    spy = Spy(monkeypatch, "cpp")
    want = loss_of(w, h, b)
    want_grads = torch.autograd.grad(want, [h, w, b])
    assert spy.calls["forward_kept"] == 1  # eager: the loss-level path
    got = torch.compile(loss_of, backend="eager")(w, h, b)
    got_grads = torch.autograd.grad(got, [h, w, b])
    assert spy.calls["forward_kept"] == 1 and spy.calls["backward"] == 1  # compiled: plain op
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
