"""The fused loss modules against Liger-Kernel's on the CPU in fp32, and what they add.

Liger computes full logits per pair in fp32; we go through the fused op. The two sum the same
terms in different orders, so values agree to fp32 rounding, not bitwise: each comparison allows
``RTOL`` of the larger magnitude involved (measured worst: 5e-6, on discopop's gradients, whose
exp(−x) term amplifies rounding, and on KTO's reward sums, which cancel).
"""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import modules as M

liger = pytest.importorskip("liger_kernel.chunked_loss")

RTOL = 2e-5
B, T, D, V = 3, 7, 16, 50
LIGER_DPO_TYPES = sorted(liger.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)


def close(ours, theirs, what, scale=None):
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    ref = theirs.abs().max().item() if theirs.numel() else 0.0
    tol = RTOL * max(ref, scale or 0.0, 1e-6)
    err = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
    assert err <= tol, f"{what}: |ours - liger| = {err:.3e} > {tol:.3e}"


def make(seed=0, n=2 * B, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    t = torch.randint(0, V, (n, T), generator=g)
    prompt = torch.randint(1, 3, (n,), generator=g)
    end = torch.randint(4, T + 1, (n,), generator=g)
    pos = torch.arange(T)
    t[(pos < prompt[:, None]) | (pos >= end[:, None])] = -100
    ref = (
        h + 0.1 * torch.randn(h.shape, generator=g),
        w + 0.02 * torch.randn(w.shape, generator=g),
        None if b is None else b + 0.01 * torch.randn(b.shape, generator=g),
    )
    return h, w, b, t, ref


def run(mod, call, h, w, b):
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    loss, aux = call(mod, hh, ww, bb)
    loss.backward()
    return loss.detach(), list(aux), hh.grad, ww.grad, None if bb is None else bb.grad


def compare(theirs_mod, ours_mod, call, h, w, b, what, scales=None):
    l1, a1, *g1 = run(theirs_mod, call, h, w, b)
    l2, a2, *g2 = run(ours_mod, call, h, w, b)
    close(l2, l1, f"{what} loss")
    assert len(a2) == len(a1), f"{what}: {len(a2)} returned values, Liger returns {len(a1)}"
    for i, (x, y) in enumerate(zip(a2, a1)):
        close(x, y, f"{what} output {i}", (scales or {}).get(i))
    for name, x, y in zip(("d_input", "d_weight", "d_bias"), g2, g1):
        assert (x is None) == (y is None), f"{what} {name}"
        if y is not None:
            close(x, y, f"{what} {name}")


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ref", [True, False])
@pytest.mark.parametrize("nll", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_dpo_matches_liger(loss_type, bias, ref, nll, avg):
    h, w, b, t, (rh, rw, rb) = make(seed=len(loss_type), bias=bias)
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    kw = dict(
        beta=0.1,
        compute_nll_loss=nll,
        use_ref_model=ref,
        average_log_prob=avg,
        loss_type=loss_type,
        label_smoothing=ls,
        alpha=0.7,
    )
    theirs = liger.LigerFusedLinearDPOLoss(compiled=False, **kw)
    ours = M.FusedLinearDPOLoss(**kw, backend="torch")

    def call(m, hh, ww, bb):
        return m(ww, hh, t, bb, rh, rw, rb) if ref else m(ww, hh, t, bb)

    # The rewards (outputs 5, 6) are β·(logp − ref_logp): differences of log-probs of ~5 that
    # cancel to ~3e-3, so fp32 rounding is relative to β·|logp|, not to the reward itself (ours
    # divides the float64 sum for average_log_prob, Liger the float32 one).
    scale = 0.1 * 10.0
    compare(theirs, ours, call, h, w, b, f"dpo/{loss_type}", scales={5: scale, 6: scale})


@pytest.mark.parametrize("nll", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_simpo_cpo_orpo_match_liger(nll, bias):
    h, w, b, t, _ = make(seed=5, bias=bias)
    nll_target = t.clone()
    nll_target[:, -2:] = -100

    def call(m, hh, ww, bb):
        return m(ww, hh, t, bb)

    compare(
        liger.LigerFusedLinearSimPOLoss(
            compute_nll_loss=nll, label_smoothing=0.1, gamma=0.3, compiled=False
        ),
        M.FusedLinearSimPOLoss(
            compute_nll_loss=nll, label_smoothing=0.1, gamma=0.3, backend="torch"
        ),
        call,
        h,
        w,
        b,
        "simpo",
    )
    for avg in (False, True):
        compare(
            liger.LigerFusedLinearCPOLoss(
                compute_nll_loss=nll,
                label_smoothing=0.1,
                average_log_prob=avg,
                alpha=0.5,
                compiled=False,
            ),
            M.FusedLinearCPOLoss(
                compute_nll_loss=nll,
                label_smoothing=0.1,
                average_log_prob=avg,
                alpha=0.5,
                backend="torch",
            ),
            call,
            h,
            w,
            b,
            f"cpo avg={avg}",
        )
    for tgt in (None, nll_target):
        compare(
            liger.LigerFusedLinearORPOLoss(compute_nll_loss=nll, compiled=False),
            M.FusedLinearORPOLoss(compute_nll_loss=nll, backend="torch"),
            lambda m, hh, ww, bb, tgt=tgt: m(ww, hh, t, bb, nll_target=tgt),
            h,
            w,
            b,
            f"orpo nll_target={tgt is not None}",
        )


@pytest.mark.parametrize("ref", [True, False])
@pytest.mark.parametrize("avg", [True, False])
@pytest.mark.parametrize("use_kl", [True, False])
def test_kto_matches_liger(ref, avg, use_kl):
    h, w, b, t, (rh, rw, rb) = make(seed=7, n=7)
    labels = torch.tensor([True, False, True, True, False, False, True])
    kl = torch.tensor(0.3) if use_kl else None

    def call(m, hh, ww, bb):
        return m(hh, ww, t, bb, labels, rh, rw, rb, kl)

    # Reward sums cancel (β·(policy − ref) of both signs): compare at the scale of their terms.
    scale = 0.1 * 2 * T * 10
    compare(
        liger.LigerFusedLinearKTOLoss(use_ref_model=ref, average_log_prob=avg, compiled=False),
        M.FusedLinearKTOLoss(use_ref_model=ref, average_log_prob=avg, backend="torch"),
        call,
        h,
        w,
        b,
        "kto",
        scales={4: scale, 5: scale},
    )


def test_liger_positional_arguments_line_up():
    # A Liger user may pass constructor arguments positionally: same order, same meaning.
    pairs = [
        (liger.LigerFusedLinearDPOLoss, M.FusedLinearDPOLoss),
        (liger.LigerFusedLinearSimPOLoss, M.FusedLinearSimPOLoss),
        (liger.LigerFusedLinearORPOLoss, M.FusedLinearORPOLoss),
        (liger.LigerFusedLinearCPOLoss, M.FusedLinearCPOLoss),
        (liger.LigerFusedLinearKTOLoss, M.FusedLinearKTOLoss),
    ]
    import inspect

    for theirs, ours in pairs:
        for fn in ("__init__", "forward"):
            p1 = list(inspect.signature(getattr(theirs, fn)).parameters.values())
            p2 = list(inspect.signature(getattr(ours, fn)).parameters.values())
            head = [(p.name, p.default) for p in p2[: len(p1)]]
            assert head == [(p.name, p.default) for p in p1], f"{ours.__name__}.{fn}"
            assert all(
                p.kind is p.KEYWORD_ONLY
                for p in p2[len(p1) :]
                if p.name not in ("ref_chosen_logps", "ref_rejected_logps")
            ), ours


def test_step_zero_rewards_are_exactly_zero(case):
    """Same weights for policy and reference: the same kernel path gives bitwise-equal log-probs."""
    backend, device = case
    h, w, b, t, _ = (x.to(device) if isinstance(x, torch.Tensor) else x for x in make(seed=11))
    for ld_alpha in (None, 0.5):
        mod = M.FusedLinearDPOLoss(backend=backend, ld_alpha=ld_alpha)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, out = mod(ww, hh, t, b, h.clone(), w.clone(), b.clone())
        assert torch.equal(out.chosen_rewards, torch.zeros(B, device=device))
        assert torch.equal(out.rejected_rewards, torch.zeros(B, device=device))
        torch.testing.assert_close(loss, torch.tensor(2.0, device=device).log(), rtol=0, atol=0)
        assert out.metrics["rewards/accuracies"].item() == 0.0
        loss.backward()
        assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


def test_triton_module_matches_torch_module(case):
    """The modules on the fused kernels give what they give on the reference backend."""
    backend, device = case
    h, w, b, t, ref = make(seed=37)
    h, w, b, t = h.to(device), w.to(device), b.to(device), t.to(device)
    ref = tuple(x.to(device) for x in ref)
    got = []
    for be in ("torch", backend):
        mod = M.FusedLinearDPOLoss(loss_type=["sigmoid", "ipo"], compute_nll_loss=True, backend=be)
        got.append(run(mod, lambda m, hh, ww, bb: m(ww, hh, t, bb, *ref), h, w, b))
    (l1, a1, *g1), (l2, a2, *g2) = got
    close(l2, l1, "loss")
    for i, (x, y) in enumerate(zip(a2 + g2, a1 + g1)):
        close(x, y, f"value {i}")


def test_precomputed_reference_equals_reference_model():
    h, w, b, t, (rh, rw, rb) = make(seed=13)
    ref = dk.linear_logprobs(rh, rw, t, rb, backend="torch")
    mod = M.FusedLinearDPOLoss(loss_type=["sigmoid", "ipo"], backend="torch")
    a = mod(w, h, t, b, rh, rw, rb)
    c = mod(w, h, t, b, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    assert torch.equal(a[0], c[0])
    for x, y in zip(a[1], c[1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("path", ["auto", "recompute"])
def test_one_policy_pass_and_reference_without_autograd(monkeypatch, path):
    """The reference first, without autograd; then one policy pass: the loss-level path where it
    applies (``dpo_kernels.loss_path``), else the plain op with autograd."""
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", path)
    h, w, b, t, (rh, rw, rb) = make(seed=17)
    calls = []
    real, real_fused = M.linear_logprobs, M.loss_path.fused_pair_loss

    def spy(hidden, *args, **kwargs):
        calls.append((hidden is h, torch.is_grad_enabled()))
        return real(hidden, *args, **kwargs)

    def spy_fused(hidden, *args, **kwargs):
        calls.append(("fused", hidden is h, torch.is_grad_enabled()))
        return real_fused(hidden, *args, **kwargs)

    monkeypatch.setattr(M, "linear_logprobs", spy)
    monkeypatch.setattr(M.loss_path, "fused_pair_loss", spy_fused)
    h.requires_grad_()
    loss, out = M.FusedLinearDPOLoss(backend="torch", compute_nll_loss=True)(w, h, t, b, rh, rw, rb)
    policy = ("fused", True, True) if path == "auto" else (True, True)
    assert calls == [(False, False), policy], calls  # reference without autograd, then policy
    assert set(out.metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
        "nll_loss",
    }
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())


def test_metrics_follow_trl_definitions():
    """Metrics against naive float64 logits, computed the way TRL's DPOTrainer logs them."""
    h, w, b, t, (rh, rw, rb) = make(seed=19)
    h, w, b, t = h.double(), w.double(), b.double(), t
    rh, rw, rb = rh.double(), rw.double(), rb.double()
    loss, out = M.FusedLinearDPOLoss(beta=0.2, backend="torch")(w, h, t, b, rh, rw, rb)
    m = {k: v.item() for k, v in out.metrics.items()}
    z = h @ w.T + b
    logp = z.log_softmax(-1)
    valid = t != -100
    tok = logp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * valid
    zr = rh @ rw.T + rb
    rtok = zr.log_softmax(-1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * valid
    pol, ref = tok.sum(1), rtok.sum(1)
    rc, rr = 0.2 * (pol[:B] - ref[:B]), 0.2 * (pol[B:] - ref[B:])
    ent = -(logp.exp() * logp).sum(-1)
    top1 = z.argmax(-1) == t
    want = {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (rc > rr).double().mean(),
        "rewards/margins": (rc - rr).mean(),
        "logps/chosen": pol[:B].mean(),
        "logps/rejected": pol[B:].mean(),
        "logits/chosen": z.mean(-1)[:B][valid[:B]].mean(),
        "logits/rejected": z.mean(-1)[B:][valid[B:]].mean(),
        "entropy": ent[valid].mean(),
        "mean_token_accuracy": top1[:B][valid[:B]].double().mean(),
        "nll_loss": -pol[:B].sum() / valid[:B].sum(),
    }
    for k, v in want.items():
        assert m[k] == pytest.approx(v.item(), rel=1e-6, abs=1e-6), k


def test_rpo_is_dpo_plus_alpha_nll():
    h, w, b, t, (rh, rw, rb) = make(seed=23)
    plain = M.FusedLinearDPOLoss(backend="torch")(w, h, t, b, rh, rw, rb)
    rpo = M.FusedLinearDPOLoss(compute_nll_loss=True, alpha=0.5, backend="torch")(
        w, h, t, b, rh, rw, rb
    )
    torch.testing.assert_close(rpo[0], plain[0] + 0.5 * rpo[1].nll_loss)
    valid = t[:B] != -100
    logp = (h[:B] @ w.T + b).log_softmax(-1).gather(-1, t[:B].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(rpo[1].nll_loss, -(logp * valid).sum() / valid.sum())


def test_kto_kl_estimate_from_mismatched_completions():
    h, w, b, t, (rh, rw, rb) = make(seed=29, n=4)
    labels = torch.tensor([True, False, True, False])
    kl_h, kl_t = h.roll(1, 0), t.roll(1, 0)
    mod = M.FusedLinearKTOLoss(use_ref_model=True, backend="torch")
    loss, out = mod(
        h, w, t, b, labels, rh, rw, rb, kl_input=kl_h, kl_target=kl_t, ref_kl_input=rh.roll(1, 0)
    )
    pol = dk.linear_logprobs(kl_h, w, kl_t, b, backend="torch")
    ref = dk.linear_logprobs(rh.roll(1, 0), rw, kl_t, rb, backend="torch")
    kl = (pol - ref).mean().clamp(min=0)
    torch.testing.assert_close(out.metrics["kl"], kl)
    loss2, _ = mod(h, w, t, b, labels, rh, rw, rb, kl)
    torch.testing.assert_close(loss, loss2)


def test_module_errors():
    h, w, b, t, (rh, rw, rb) = make(seed=31)
    dpo = M.FusedLinearDPOLoss(backend="torch")
    with pytest.raises(ValueError, match="unknown loss_type"):
        M.FusedLinearDPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        M.FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        M.FusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="ld_alpha"):
        M.FusedLinearDPOLoss(ld_alpha=2.0)
    with pytest.raises(ValueError, match="odd batch"):
        dpo(w, h[:5], t[:5], b, rh[:5], rw, rb)
    with pytest.raises(ValueError, match="ref_input and ref_weight"):
        dpo(w, h, t, b)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(3,\)"):
        dpo(w, h, t, b, ref_chosen_logps=torch.zeros(4), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="both"):
        dpo(w, h, t, b, ref_chosen_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="target must be"):
        dpo(w, h, t[:, :-1], b, rh, rw, rb)
    with pytest.raises(ValueError, match="ref_input must be"):
        dpo(w, h, t, b, rh[0], rw, rb)
    with pytest.raises(ValueError, match="lin_weight must be"):
        dpo(w[:, :-1], h, t, b, rh, rw, rb)
    with pytest.raises(ValueError, match="unknown CPO"):
        M.FusedLinearCPOLoss(loss_type="apo_zero")
    with pytest.raises(ValueError, match="preference_labels"):
        M.FusedLinearKTOLoss(backend="torch")(h, w, t, b)
    with pytest.raises(ValueError, match="nll_target"):
        M.FusedLinearORPOLoss(backend="torch")(w, h, t, b, nll_target=t[:, 1:])


def test_readme_liger_swap_gives_liger_results():
    """The README's "coming from Liger" lines run as written and, with the import swapped back to
    Liger's, give the same loss and log-probs: a Liger script works with only the import changed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ours = next(
        s
        for s in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        if "was: from liger_kernel" in s
    )
    theirs = re.sub(
        r"from dpo_kernels import FusedLinearDPOLoss.*\n",
        "from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss as FusedLinearDPOLoss\n",
        ours,
    )
    assert theirs != ours and "dpo_kernels" not in theirs
    h, w, _, t, (rh, rw, _) = make(seed=41, bias=False)
    results = []
    for code in (ours, theirs):
        env = {
            "hidden": h.clone(),
            "target": t,
            "ref_hidden": rh,
            "lm_head": torch.nn.Linear(D, V, bias=False),
            "ref_lm_head": torch.nn.Linear(D, V, bias=False),
        }
        with torch.no_grad():
            env["lm_head"].weight.copy_(w)
            env["ref_lm_head"].weight.copy_(rw)
        exec(compile(code, "README.md", "exec"), env)
        results.append((env["loss"], env["chosen_logps"], env["rejected_logps"]))
    for x, y, what in zip(*results, ("loss", "chosen_logps", "rejected_logps")):
        close(x, y, what)


MODULES = (
    M.FusedLinearDPOLoss,
    M.FusedLinearSimPOLoss,
    M.FusedLinearCPOLoss,
    M.FusedLinearORPOLoss,
    M.FusedLinearKTOLoss,
)


@pytest.fixture
def no_loss_runs(monkeypatch):
    """Make running any loss or LM-head pass an error: construction must check options alone."""

    def boom(*args, **kwargs):
        raise AssertionError("a loss ran at module construction")

    for name in (
        "_preference_loss",
        "_simpo_loss",
        "_cpo_loss",
        "_orpo_loss",
        "_kto_loss",
        "linear_logprobs",
        "wpo_weights",
    ):
        monkeypatch.setattr(M, name, boom)
    for name in (
        "preference_loss",
        "simpo_loss",
        "cpo_loss",
        "orpo_loss",
        "kto_loss",
        "ld_logps",
        "_preference_loss",
    ):
        monkeypatch.setattr(dk.losses, name, boom)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (M.FusedLinearDPOLoss, dict(loss_type="nope"), "unknown loss_type"),
        (M.FusedLinearDPOLoss, dict(loss_type="robust", label_smoothing=0.7), r"\[0, 0.5\)"),
        (
            M.FusedLinearDPOLoss,
            dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]),
            "one weight per loss",
        ),
        (
            M.FusedLinearDPOLoss,
            dict(loss_type="bco_pair", f_divergence_type="forward_kl"),
            "no generalisation",
        ),
        (M.FusedLinearDPOLoss, dict(ld_alpha=-0.5), "ld_alpha"),
        (M.FusedLinearSimPOLoss, dict(beta=0.0), "beta"),
        (M.FusedLinearSimPOLoss, dict(label_smoothing=1.5), r"\[0, 1\)"),
        (M.FusedLinearCPOLoss, dict(loss_type="nope"), "unknown CPO loss_type"),
        (M.FusedLinearORPOLoss, dict(beta=-1.0), "beta"),
        (M.FusedLinearKTOLoss, dict(loss_type="nope"), "unknown KTO loss_type"),
    ],
)
def test_options_checked_at_construction_without_a_loss(no_loss_runs, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_modules_hold_one_frozen_options_object(no_loss_runs):
    import dataclasses

    dpo = M.FusedLinearDPOLoss(
        beta=0.3,
        loss_type=["sigmoid", "ipo"],
        label_smoothing=0.1,
        loss_weights=[1.0, 0.5],
        ignore_index=-1,
        backend="torch",
        compiled=False,
        chunk_size=4,
        ld_alpha=0.5,
    )
    assert dpo.options == dk.losses.PreferenceOptions(
        beta=0.3, loss_type=("sigmoid", "ipo"), label_smoothing=0.1, loss_weights=(1.0, 0.5)
    )
    assert (dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.loss_weights) == (
        0.3,
        ("sigmoid", "ipo"),
        0.1,
        (1.0, 0.5),
    )
    assert (dpo.ignore_index, dpo.backend, dpo.compiled, dpo.chunk_size, dpo.ld_alpha) == (
        -1,
        "torch",
        False,
        4,
        0.5,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        dpo.options.beta = 0.5
    with pytest.raises(AttributeError):
        dpo.beta = 0.5  # would silently not reach the loss: build a new module instead
    for cls in MODULES:
        mod = cls(beta=0.2)
        assert dataclasses.is_dataclass(mod.options) and mod.beta == mod.options.beta == 0.2
    assert M.FusedLinearCPOLoss(loss_type="simpo", simpo_gamma=0.3).simpo_gamma == 0.3
    assert M.FusedLinearSimPOLoss(gamma=0.7).gamma == 0.7
    kto = M.FusedLinearKTOLoss(undesirable_weight=1.5, loss_type="apo_zero_unpaired")
    assert (kto.undesirable_weight, kto.loss_type) == (1.5, "apo_zero_unpaired")
