"""The loss family against an independent, scalar re-statement of TRL 1.16's formulas.

The oracle below is written pair by pair with Python's ``math`` (float64 scalars), not with the
tensor code it checks, so a shared mistake would need to be made twice in different forms.
``tests/test_trl_parity.py`` checks the same losses against TRL itself.
"""

import math
import zlib

import pytest
import torch

from dpo_kernels import losses as L


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def fdiv(t, kind, a):
    """f'(u) at u = exp(t) for the f-DPO divergences."""
    u = math.exp(t)
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(a - 1) < 1e-6):
        return t
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return math.log(2 * u / (u + 1))
    return (u ** (a - 1) - 1) / (a - 1)


def oracle(kind, pc, pr, rc, rr, nc, nr, beta, eps, tau, fk, fa):
    """Per-pair TRL 1.16 losses (lists of floats); aot/aot_unpaired sort over the batch."""
    n = len(pc)
    c = [pc[i] - rc[i] for i in range(n)]
    r = [pr[i] - rr[i] for i in range(n)]
    cs = [fdiv(x, fk, fa) for x in c]
    rs = [fdiv(x, fk, fa) for x in r]
    d = [cs[i] - rs[i] for i in range(n)]
    out = []
    for i in range(n):
        x = beta * d[i]
        if kind == "sigmoid":
            v = -(1 - eps) * logsig(x) - eps * logsig(-x)
        elif kind == "hinge":
            v = max(0.0, 1 - x)
        elif kind == "ipo":
            v = (cs[i] / max(nc[i], 1) - rs[i] / max(nr[i], 1) - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            v = sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps))
        elif kind == "nca_pair":
            v = -logsig(beta * c[i]) - 0.5 * logsig(-beta * c[i]) - 0.5 * logsig(-beta * r[i])
        elif kind == "robust":
            v = (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -logsig(beta * c[i]) - logsig(-beta * r[i])
        elif kind == "sppo_hard":
            v = (c[i] - 0.5 / beta) ** 2 + (r[i] + 0.5 / beta) ** 2
        elif kind == "aot":
            pol = sorted(pc[j] - pr[j] for j in range(n))
            ref = sorted(rc[j] - rr[j] for j in range(n))
            y = beta * (pol[i] - ref[i])
            v = -(1 - eps) * logsig(y) - eps * logsig(-y)
        elif kind == "aot_unpaired":
            y = beta * (sorted(c)[i] - sorted(r)[i])
            v = -(1 - eps) * logsig(y) - eps * logsig(-y)
        elif kind == "apo_zero":
            v = 1 - sig(beta * c[i]) + sig(beta * r[i])
        elif kind == "apo_down":
            v = sig(beta * c[i]) + 1 - sig(beta * (c[i] - r[i]))
        elif kind == "discopop":
            m = sig(x / tau)
            v = -logsig(x) * (1 - m) + math.exp(-x) * m
        elif kind == "sft":
            v = -sum(pc) / sum(nc)
        elif kind == "sigmoid_norm":
            v = -logsig(beta * (cs[i] / max(nc[i], 1) - rs[i] / max(nr[i], 1)))
        else:
            raise AssertionError(kind)
        out.append(v)
    return out


def make_pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(n, generator=g, dtype=torch.float64) * 30 - 1
    pr = -torch.rand(n, generator=g, dtype=torch.float64) * 30 - 1
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    nc = torch.randint(1, 40, (n,), generator=g)
    nr = torch.randint(1, 40, (n,), generator=g)
    return pc, pr, rc, rr, nc, nr


EPS = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.15}


# Every loss type with the default reverse KL; the f-divergences only where TRL defines them (the
# other combinations must raise: test_errors).
COMBOS = [
    (k, f)
    for f in L.F_DIVERGENCES
    for k in L.LOSS_TYPES
    if f == "reverse_kl" or L.LOSS_SPECS[k].f_divergence_ok
]


@pytest.mark.parametrize("kind, fk", COMBOS)
def test_loss_types_match_formulas(kind, fk):
    pc, pr, rc, rr, nc, nr = make_pairs(seed=zlib.crc32(f"{kind}/{fk}".encode()))
    beta, eps, tau, fa = 0.3, EPS.get(kind, 0.0), 0.05, 0.4
    out = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=kind,
        beta=beta,
        label_smoothing=eps,
        discopop_tau=tau,
        f_divergence_type=fk,
        f_alpha_divergence_coef=fa,
        chosen_num_tokens=nc,
        rejected_num_tokens=nr,
    )
    want = oracle(
        kind,
        pc.tolist(),
        pr.tolist(),
        rc.tolist(),
        rr.tolist(),
        nc.tolist(),
        nr.tolist(),
        beta,
        eps,
        tau,
        fk,
        fa,
    )
    torch.testing.assert_close(
        out.losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc), rtol=0, atol=0)
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr), rtol=0, atol=0)
    assert not out.chosen_rewards.requires_grad


def test_gradients_flow_and_match_finite_differences():
    pc, pr, rc, rr, nc, nr = make_pairs(4, seed=3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    for kind in L.LOSS_TYPES:
        eps = EPS.get(kind, 0.0)

        def f(a, b, kind=kind, eps=eps):
            return L.preference_loss(
                a,
                b,
                rc,
                rr,
                loss_type=kind,
                beta=0.2,
                label_smoothing=eps,
                chosen_num_tokens=nc,
                rejected_num_tokens=nr,
            ).losses.mean()

        assert torch.autograd.gradcheck(f, (pc, pr)), kind


def test_loss_list_is_weighted_sum():
    pc, pr, rc, rr, nc, nr = make_pairs()
    kw = dict(chosen_num_tokens=nc, rejected_num_tokens=nr, beta=0.2)
    parts = [
        L.preference_loss(pc, pr, rc, rr, loss_type=k, **kw).losses
        for k in ("sigmoid", "bco_pair", "sft")
    ]
    mixed = L.preference_loss(
        pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kw
    ).losses
    torch.testing.assert_close(mixed, 0.8 * parts[0] + 0.2 * parts[1] + parts[2])


def test_reference_free_is_zero_reference():
    pc, pr, *_ = make_pairs()
    free = L.preference_loss(pc, pr, reference_free=True).losses
    zero = L.preference_loss(pc, pr, torch.zeros_like(pc), torch.zeros_like(pr)).losses
    torch.testing.assert_close(free, zero, rtol=0, atol=0)


def test_wpo_weights_and_use_weighting():
    pc, pr, rc, rr, nc, nr = make_pairs()
    lc = pc * 0.5  # log Σ p² sums: anything ≤ the log-prob sums' scale will do
    lr = pr * 0.5
    w = L.wpo_weights(pc, pr, lc, lr, nc, nr)
    want = [
        math.exp((a - b) / n) * math.exp((c - d) / m)
        for a, b, n, c, d, m in zip(
            pc.tolist(), lc.tolist(), nc.tolist(), pr.tolist(), lr.tolist(), nr.tolist()
        )
    ]
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    kw = dict(chosen_num_tokens=nc, rejected_num_tokens=nr)
    plain = L.preference_loss(pc, pr, rc, rr, **kw).losses
    weighted = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        use_weighting=True,
        chosen_log_sum_sq_probs=lc,
        rejected_log_sum_sq_probs=lr,
        **kw,
    ).losses
    torch.testing.assert_close(weighted, plain * w, rtol=0, atol=0)


def test_ld_logps_weights_the_tail():
    per_tok = torch.tensor([[0.0, -1.0, -2.0, -3.0, 0.0], [0.0, 0.0, -4.0, -5.0, -6.0]])
    per_tok = torch.cat([per_tok, per_tok.flip(0)])
    mask = per_tok != 0
    # pair 0: chosen has 3 completion tokens, rejected 3 → no tail; pair 1 likewise.
    torch.testing.assert_close(L.ld_logps(per_tok, mask, 0.5), per_tok.sum(1))
    per_tok = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    got = L.ld_logps(per_tok, mask, 0.25)
    torch.testing.assert_close(got, torch.tensor([-3.0 + 0.25 * -7.0, -11.0]))


def test_simpo_cpo_orpo_kto_formulas():
    pc, pr, rc, rr, nc, nr = make_pairs()
    a, b = (pc / nc).tolist(), (pr / nr).tolist()
    beta, g, eps = 2.0, 0.7, 0.1
    s = L.simpo_loss(pc / nc, pr / nr, beta=beta, gamma=g, label_smoothing=eps).losses
    want = [
        -(1 - eps) * logsig(beta * (x - y) - g) - eps * logsig(-(beta * (x - y) - g))
        for x, y in zip(a, b)
    ]
    torch.testing.assert_close(s, torch.tensor(want, dtype=torch.float64))
    for kind in L.CPO_LOSS_TYPES:
        got = L.cpo_loss(
            pc, pr, beta=0.1, label_smoothing=eps, loss_type=kind, simpo_gamma=g
        ).losses
        want = []
        for x, y in zip(pc.tolist(), pr.tolist()):
            d = x - y
            if kind == "sigmoid":
                want.append(-(1 - eps) * logsig(0.1 * d) - eps * logsig(-0.1 * d))
            elif kind == "simpo":
                z = 0.1 * (d - g / 0.1)
                want.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
            elif kind == "hinge":
                want.append(max(0.0, 1 - 0.1 * d))
            else:
                want.append((d - 1 / 0.2) ** 2)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), msg=kind)
    o = L.orpo_loss(pc / nc, pr / nr, beta=0.1)
    lo = [(x - y) - (math.log(1 - math.exp(x)) - math.log(1 - math.exp(y))) for x, y in zip(a, b)]
    torch.testing.assert_close(
        o.losses, torch.tensor([-0.1 * logsig(v) for v in lo], dtype=torch.float64)
    )
    torch.testing.assert_close(
        o.log_odds_chosen, torch.tensor(sum(lo) / len(lo), dtype=torch.float64)
    )
    labels = torch.tensor([True, False, True, True, False, False])
    kl = torch.tensor(0.4, dtype=torch.float64)
    k = L.kto_loss(pc, rc, labels, beta=0.1, kl=kl, desirable_weight=1.5, undesirable_weight=0.5)
    want = [
        1.5 * (1 - sig(0.1 * (x - y - 0.4))) if lab else 0.5 * (1 - sig(0.1 * (0.4 - x + y)))
        for x, y, lab in zip(pc.tolist(), rc.tolist(), labels.tolist())
    ]
    torch.testing.assert_close(k.losses, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(L.kto_kl(pc, rc), (pc - rc).mean().clamp(min=0))


def test_orpo_stable_near_zero():
    # Average log-probs just below 0: log(1 - e^x) must not lose all its digits.
    x = torch.tensor([-1e-9, -1e-5], dtype=torch.float64)
    o = L.orpo_loss(x, x - 1.0, beta=1.0)
    assert torch.isfinite(o.losses).all()
    want = [
        (xv - (xv - 1)) - (math.log(-math.expm1(xv)) - math.log(-math.expm1(xv - 1)))
        for xv in x.tolist()
    ]
    torch.testing.assert_close(o.log_odds_chosen, torch.tensor(sum(want) / 2, dtype=torch.float64))


def test_float32_and_bfloat16_inputs_keep_dtype():
    pc, pr, rc, rr, nc, nr = make_pairs()
    for dt in (torch.float32, torch.bfloat16):
        out = L.preference_loss(pc.to(dt), pr.to(dt), rc.to(dt), rr.to(dt))
        assert out.losses.dtype == dt
        ref = L.preference_loss(pc, pr, rc, rr).losses
        torch.testing.assert_close(out.losses.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="dpo"), "unknown loss_type"),
        (dict(loss_type=[]), "at least one"),
        (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(loss_type="robust", label_smoothing=-0.1), r"\[0, 1\)"),
        (dict(loss_type="exo_pair", label_smoothing=0.0), r"\(0, 1\)"),
        (dict(label_smoothing=1.0), r"\[0, 1\)"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(f_divergence_type="kl"), "unknown f_divergence_type"),
        (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "no generalisation"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "one weight per loss"),
        (dict(loss_type="ipo"), "chosen_num_tokens"),
        (dict(loss_type="sigmoid_norm"), "chosen_num_tokens"),
        (dict(use_weighting=True), "use_weighting"),
        (dict(discopop_tau=0.0, loss_type="discopop"), "discopop_tau"),
    ],
)
def test_errors(kwargs, match):
    pc, pr, rc, rr, *_ = make_pairs()
    with pytest.raises(ValueError, match=match):
        L.preference_loss(pc, pr, rc, rr, **kwargs)


def test_shape_errors():
    pc, pr, rc, rr, nc, nr = make_pairs()
    with pytest.raises(ValueError, match="same shape"):
        L.preference_loss(pc, pr[:-1], rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape"):
        L.preference_loss(pc, pr, rc[:-1], rr)
    with pytest.raises(ValueError, match="1-D"):
        L.preference_loss(pc[None], pr[None], rc, rr)
    with pytest.raises(TypeError, match="floating"):
        L.preference_loss(nc, nr, rc, rr)
    with pytest.raises(ValueError, match="reference_free"):
        L.preference_loss(pc, pr)
    with pytest.raises(ValueError, match="takes no ref"):
        L.preference_loss(pc, pr, rc, rr, reference_free=True)
    with pytest.raises(ValueError, match="chosen_num_tokens must have shape"):
        L.preference_loss(pc, pr, rc, rr, chosen_num_tokens=nc[:2], rejected_num_tokens=nr)
    with pytest.raises(ValueError, match="unknown CPO"):
        L.cpo_loss(pc, pr, loss_type="kto")
    with pytest.raises(ValueError, match="unknown KTO"):
        L.kto_loss(pc, rc, pc > -10, loss_type="sigmoid")
    with pytest.raises(ValueError, match="preference_labels"):
        L.kto_loss(pc, rc, (pc > -10)[:2])
    with pytest.raises(ValueError, match="ld_alpha"):
        L.ld_logps(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match=r"\(2P, T\)"):
        L.ld_logps(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool), 0.5)


# ----------------------------------------------------------------------------- the table, options


def test_loss_specs_cover_exactly_loss_types():
    assert tuple(L.LOSS_SPECS) == L.LOSS_TYPES
    for kind, spec in L.LOSS_SPECS.items():
        doc = spec.fn.__doc__
        assert doc and "\n" not in doc.strip(), f"{kind}: one-line formula docstring"
    # TRL 1.16's DPOTrainer.__init__ lists these as the ones an f-divergence generalises.
    assert {k for k, s in L.LOSS_SPECS.items() if s.f_divergence_ok} == {
        "sigmoid",
        "sigmoid_norm",
        "hinge",
        "ipo",
        "exo_pair",
        "robust",
        "discopop",
        "sft",
    }
    assert {k for k, s in L.LOSS_SPECS.items() if s.needs_num_tokens} == {"ipo", "sigmoid_norm"}
    assert {k for k, s in L.LOSS_SPECS.items() if s.trl_overrides} == {"sigmoid"}
    assert L.CPO_LOSS_TYPES == ("sigmoid", "hinge", "ipo", "simpo")
    assert L.KTO_LOSS_TYPES == ("kto", "apo_zero_unpaired")


def test_options_are_frozen_and_normalised():
    import dataclasses

    o = L.PreferenceOptions(loss_type=["sigmoid", "ipo"], loss_weights=[1, 0.5])
    assert o.loss_type == ("sigmoid", "ipo") and o.loss_types == ("sigmoid", "ipo")
    assert o.loss_weights == (1.0, 0.5)
    one = L.PreferenceOptions()
    assert one.loss_type == "sigmoid" and one.loss_types == ("sigmoid",)
    assert one.loss_weights == (1.0,)
    assert hash(o) == hash(
        L.PreferenceOptions(loss_type=("sigmoid", "ipo"), loss_weights=(1.0, 0.5))
    )
    for opts in (o, L.SimPOOptions(), L.CPOOptions(), L.ORPOOptions(), L.KTOOptions()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            opts.beta = 0.5


# The option errors of test_errors, raised by the options object itself (no tensors involved).
OPTION_ERRORS = [
    (L.PreferenceOptions, dict(loss_type="dpo"), "unknown loss_type"),
    (L.PreferenceOptions, dict(loss_type=[]), "at least one"),
    (L.PreferenceOptions, dict(loss_type="robust", label_smoothing=0.7), r"\[0, 0.5\)"),
    (L.PreferenceOptions, dict(loss_type=["sigmoid", "exo_pair"]), r"\(0, 1\)"),
    (L.PreferenceOptions, dict(label_smoothing=1.0), r"\[0, 1\)"),
    (L.PreferenceOptions, dict(beta=-1.0), "beta"),
    (L.PreferenceOptions, dict(f_divergence_type="kl"), "unknown f_divergence_type"),
    (
        L.PreferenceOptions,
        dict(loss_type=["sigmoid", "aot"], f_divergence_type="js_divergence"),
        r"no generalisation for loss_type \['aot'\]",
    ),
    (
        L.PreferenceOptions,
        dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
        "one weight per loss",
    ),
    (L.PreferenceOptions, dict(loss_type="discopop", discopop_tau=-1.0), "discopop_tau"),
    (L.SimPOOptions, dict(label_smoothing=-0.1), r"\[0, 1\)"),
    (L.CPOOptions, dict(loss_type="kto"), "unknown CPO loss_type"),
    (L.CPOOptions, dict(beta=0.0), "beta"),
    (L.ORPOOptions, dict(beta=float("inf")), "beta"),
    (L.KTOOptions, dict(loss_type="sigmoid"), "unknown KTO loss_type"),
]


@pytest.mark.parametrize("cls, kwargs, match", OPTION_ERRORS)
def test_option_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_discopop_tau_is_only_checked_for_discopop():
    L.PreferenceOptions(loss_type="sigmoid", discopop_tau=0.0)  # unused: no error


def test_trl_overrides_in_one_call():
    """trl=True: sigmoid without label smoothing (TRL 1.16 ignores it there), robust with it, in
    one call with both types; the default options smooth the sigmoid loss too."""
    pc, pr, rc, rr, *_ = make_pairs()
    eps, kinds, weights = 0.2, ["sigmoid", "robust"], [0.7, 0.3]

    def part(kind, e):
        return L.preference_loss(pc, pr, rc, rr, loss_type=kind, label_smoothing=e).losses

    trl = L.PreferenceOptions(loss_type=kinds, label_smoothing=eps, loss_weights=weights, trl=True)
    got = L._preference_loss(trl, pc, pr, rc, rr).losses
    torch.testing.assert_close(
        got, 0.7 * part("sigmoid", 0.0) + 0.3 * part("robust", eps), rtol=0, atol=0
    )
    ours = L.PreferenceOptions(loss_type=kinds, label_smoothing=eps, loss_weights=weights)
    got = L._preference_loss(ours, pc, pr, rc, rr).losses
    torch.testing.assert_close(
        got, 0.7 * part("sigmoid", eps) + 0.3 * part("robust", eps), rtol=0, atol=0
    )
    assert ours.label_smoothing == trl.label_smoothing == eps  # the override is per type only


def test_ld_sequence_stats():
    """The LD-DPO per-token → per-sequence step the module and the TRL drop-in share."""
    from dpo_kernels import LogProbStats

    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    per_tok = LogProbStats(
        *(torch.randn(4, 4, generator=g, dtype=torch.float64) * mask for _ in range(6))
    )
    per_tok = per_tok._replace(num_tokens=mask)
    logps, sums = L._ld_sequence_stats(per_tok, 0.3)
    torch.testing.assert_close(logps, L.ld_logps(per_tok.logps, mask.bool(), 0.3), rtol=0, atol=0)
    assert type(sums) is LogProbStats
    for got, t in zip(sums, per_tok):
        torch.testing.assert_close(got, t.sum(dim=1), rtol=0, atol=0)
