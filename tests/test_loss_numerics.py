"""Non-finite log-probs and degenerate batches through every loss and every module.

The rules (issue 17, item 3):

- **NaN propagates.** A NaN in an input a loss depends on makes that pair's loss NaN (every pair's,
  for the losses that couple the pairs through the batch) and the batch mean NaN; the other pairs'
  losses and gradients of a separable loss are exactly what they are without it.
- **-inf gives the limit or NaN.** A log-prob of -inf gives the mathematical limit of the loss as
  that log-prob → -∞ (±inf included), or NaN — never a finite value other than the limit. Where no
  limit exists (it depends on how two infinities race: ∞ − ∞) the result must be NaN. The limits
  come from :func:`dpo_oracle` and its siblings, a float64 scalar re-statement of each formula in
  the extended reals (written from the papers / TRL 1.16, not from the tensor code), which
  :data:`LIMITS` writes down per loss type and :func:`test_oracle_limits_match_large_finite_inputs`
  checks against the same formulas at large finite inputs along several paths.
- **Degenerate batches are fine.** A sequence with no scored token (every token ignored) has
  log-prob sum 0 and, with ``average_log_prob``, average 0 (``sum / max(n, 1)``: TRL 1.16's
  ``DPOTrainer`` length normalisation, ``.clamp(min=1.0)``; Liger 0.8.5 and TRL's CPO/ORPO
  trainers divide by 0 there and give NaN). Every module then gives the loss the formulas give on
  a naive float64 full-logits oracle, with finite gradients equal to the oracle's. ORPO is the one
  loss whose *value* is not finite there, by its definition: an empty completion has log-prob 0,
  probability 1 and infinite odds, so an empty rejected completion gives +inf and both empty NaN
  (∞/∞); TRL and Liger give NaN in both cases. An odd batch for a paired module raises a
  ValueError (never a silent re-pairing).

The regressions at the end pin the bugs these rules found in ``dpo_kernels.losses``: the
α-divergence clamp that gave -inf log-probs a finite loss, discopop's NaN at large finite margins,
and ORPO's NaN gradients at average log-probs at or next to 0.
"""

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from dpo_kernels import losses as L
from dpo_kernels import modules as M

from .helpers import IGNORE, naive_logprobs

INF, NAN = math.inf, math.nan


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of a few elements: one intra-op thread. Idle OpenMP workers spin, and on a busy
    2-core machine that makes these thousands of tiny ops ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- scalar oracle
#
# Extended-real float64 scalars: ±inf are values, NaN means "no limit". Python's own arithmetic
# gives inf − inf = nan and 0·inf = nan; the helpers below resolve the removable cases of the
# formulas (σ(x)·log σ(x) → 0, an absent ε-term) and nothing else.


def isnan(x):
    return x != x


def logsig(x):
    """log σ(x), exact at ±inf."""
    if isnan(x):
        return NAN
    if x == INF:
        return 0.0
    if x == -INF:
        return -INF
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def exp_(x):
    """e^x, +inf past the float64 range (math.exp raises there)."""
    return INF if x > 709.0 else math.exp(x)


def qlog(q, log_q, const):
    """q·(log q − const), 0 where q = 0 (q·log q → 0 as q → 0)."""
    return 0.0 if q == 0 else q * (log_q - const)


def smoothed(x, eps):
    """−(1−ε)·log σ(x) − ε·log σ(−x); the ε-term is absent at ε = 0."""
    v = -(1 - eps) * logsig(x)
    return v - eps * logsig(-x) if eps else v


def log1mexp(x):
    """log(1 − e^x) for x ≤ 0: −inf at 0, 0 at −inf."""
    if isnan(x):
        return NAN
    if x == 0:
        return -INF
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def fscore(t, kind, a, clamp=None):
    """f'(u) at u = e^t (f-DPO): reverse KL t; forward KL 1 − e^(−t) (−inf at t = −inf, 1 at
    +inf); JS log 2 + log σ(t) (−inf, log 2); α: (e^((α−1)t) − 1)/(α−1), unclamped (with
    ``clamp``, a finite exponent ``(α−1)t`` is capped there, as TRL 1.16 and the package do)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(a - 1) < 1e-6):
        return t
    if kind == "forward_kl":
        return 1 - exp_(-t)
    if kind == "js_divergence":
        return math.log(2) + logsig(t)
    x = (a - 1) * t
    if clamp is not None and x != INF:
        x = min(x, clamp)
    return (exp_(x) - 1) / (a - 1)


def per_token(s, n):
    return s / max(n, 1)


def sq(x):
    return x * x  # ** 2 raises OverflowError past the float64 range


def dpo_oracle(
    kind, pc, pr, rc, rr, nc, nr, *, beta, eps, tau, fk="reverse_kl", fa=0.5, sft=None, clamp=None
):
    """Per-pair losses (list) of ``preference_loss``; aot/aot_unpaired per sorted position."""
    n = len(pc)
    c = [pc[i] - rc[i] for i in range(n)]
    r = [pr[i] - rr[i] for i in range(n)]
    cs = [fscore(x, fk, fa, clamp) for x in c]
    rs = [fscore(x, fk, fa, clamp) for x in r]
    if kind == "sft":
        return [(-sum(pc) / max(sum(nc), 1)) if sft is None else sft] * n
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            pol, ref = [pc[i] - pr[i] for i in range(n)], [rc[i] - rr[i] for i in range(n)]
        else:
            pol, ref = c, r
        if any(isnan(v) for v in pol + ref):
            return [NAN] * n
        return [smoothed(beta * (x - y), eps) for x, y in zip(sorted(pol), sorted(ref))]
    out = []
    for i in range(n):
        x = beta * (cs[i] - rs[i])
        bc, br = beta * c[i], beta * r[i]
        if kind == "sigmoid":
            v = smoothed(x, eps)
        elif kind == "hinge":
            v = NAN if isnan(x) else max(0.0, 1 - x)
        elif kind == "ipo":
            v = sq(per_token(cs[i], nc[i]) - per_token(rs[i], nr[i]) - 1 / (2 * beta))
        elif kind == "exo_pair":
            v = qlog(sig(x), logsig(x), math.log1p(-eps)) + qlog(sig(-x), logsig(-x), math.log(eps))
        elif kind == "nca_pair":
            v = -logsig(bc) - 0.5 * logsig(-bc) - 0.5 * logsig(-br)
        elif kind == "robust":
            v = -(1 - eps) * logsig(x) + (eps * logsig(-x) if eps else 0.0)
            v = v / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -logsig(bc) - logsig(-br)
        elif kind == "sppo_hard":
            v = sq(c[i] - 0.5 / beta) + sq(r[i] + 0.5 / beta)
        elif kind == "apo_zero":
            v = 1 - sig(bc) + sig(br)
        elif kind == "apo_down":
            v = sig(bc) + 1 - sig(beta * (c[i] - r[i]))
        elif kind == "discopop":
            # −log σ(x)·(1 − m) + e^(−x)·m, m = σ(x/τ): at x = −∞ the first term is +∞ and the
            # second ≥ 0; elsewhere e^(−x)·m = exp(log σ(x/τ) − x).
            if x == -INF:
                v = INF
            else:
                v = -logsig(x) * (1 - sig(x / tau)) + exp_(logsig(x / tau) - x)
        elif kind == "sigmoid_norm":
            v = -logsig(beta * (per_token(cs[i], nc[i]) - per_token(rs[i], nr[i])))
        else:
            raise AssertionError(kind)
        out.append(v)
    return out


def simpo_oracle(c, r, *, beta, gamma, eps):
    return [smoothed(beta * (x - y) - gamma, eps) for x, y in zip(c, r)]


def cpo_oracle(kind, c, r, *, beta, eps, gamma):
    out = []
    for x, y in zip(c, r):
        d = x - y
        if kind == "sigmoid":
            out.append(smoothed(beta * d, eps))
        elif kind == "hinge":
            out.append(NAN if isnan(d) else max(0.0, 1 - beta * d))
        elif kind == "ipo":
            out.append(sq(d - 1 / (2 * beta)))
        else:
            out.append(smoothed(beta * d - gamma, eps))
    return out


def orpo_oracle(c, r, *, beta):
    """−β·log σ(log-odds), log-odds = (c − r) − (log(1 − e^c) − log(1 − e^r))."""
    return [-beta * logsig((x - y) - (log1mexp(x) - log1mexp(y))) for x, y in zip(c, r)]


def kto_oracle(kind, logps, ref, labels, *, beta, z, wd, wu):
    out = []
    for i, (p, lab) in enumerate(zip(logps, labels)):
        x = p - (0.0 if ref is None else ref[i])
        if kind == "kto":
            v = 1 - sig(beta * (x - z)) if lab else 1 - sig(beta * (z - x))
        else:
            v = 1 - sig(beta * x) if lab else sig(beta * x)
        out.append(v * (wd if lab else wu))
    return out


def mean(vals):
    return sum(vals) / len(vals)


# ----------------------------------------------------------------------------- the limits table

# Which log-probs of pair 0 are -inf, and what that does to c = chosen − ref_chosen and
# r = rejected − ref_rejected: (pc) c → −∞; (pr) r → −∞; (rc) c → +∞; (rr) r → +∞; two of them
# in one log-ratio (pc, rc) leave it undetermined (∞ − ∞).
SCENARIOS = {
    "chosen": ("pc",),
    "rejected": ("pr",),
    "ref_chosen": ("rc",),
    "ref_rejected": ("rr",),
    "chosen+rejected": ("pc", "pr"),
    "both_refs": ("rc", "rr"),
    "chosen+ref_chosen": ("pc", "rc"),
    "rejected+ref_rejected": ("pr", "rr"),
    "chosen+ref_rejected": ("pc", "rr"),
    "rejected+ref_chosen": ("pr", "rc"),
}

# (loss_type, label_smoothing): every DPO loss type, and the smoothing values that change a limit.
VARIANTS = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.15),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("exo_pair", 1e-3),
    ("nca_pair", 0.0),
    ("robust", 0.0),
    ("robust", 0.2),
    ("bco_pair", 0.0),
    ("sppo_hard", 0.0),
    ("aot", 0.0),
    ("aot", 0.1),
    ("aot_unpaired", 0.0),
    ("aot_unpaired", 0.1),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
    ("discopop", 0.0),
    ("sft", 0.0),
    ("sigmoid_norm", 0.0),
]
assert {k for k, _ in VARIANTS} == set(L.LOSS_TYPES)

# The limit of pair 0's loss (for aot, aot_unpaired and sft, which couple the pairs: of the batch
# mean) under each scenario, in SCENARIOS' order, with the reverse KL: "+inf", "-inf", "0", "fin"
# (finite, nonzero: the formula with σ(±∞) = 1, 0 and log σ(+∞) = 0), "nan" (no limit). With
# Δ = c − r, the Δ-losses (sigmoid, hinge, robust, discopop, sigmoid_norm, and ipo per token) see
# Δ → −∞, +∞, +∞, −∞, ?, ?, ?, ?, −∞, +∞.
#                           pc    pr    rc    rr    pc+pr rc+rr pc+rc pr+rr pc+rr pr+rc
LIMITS = {
    ("sigmoid", 0.0): "     +inf  0     0     +inf  nan   nan   nan   nan   +inf  0",
    ("sigmoid", 0.15): "    +inf  +inf  +inf  +inf  nan   nan   nan   nan   +inf  +inf",
    ("hinge", 0.0): "       +inf  0     0     +inf  nan   nan   nan   nan   +inf  0",
    ("ipo", 0.0): "         +inf  +inf  +inf  +inf  nan   nan   nan   nan   +inf  +inf",
    ("exo_pair", 1e-3): "   fin   fin   fin   fin   nan   nan   nan   nan   fin   fin",
    ("nca_pair", 0.0): "    +inf  fin   +inf  +inf  +inf  +inf  nan   nan   +inf  +inf",
    ("robust", 0.0): "      +inf  0     0     +inf  nan   nan   nan   nan   +inf  0",
    ("robust", 0.2): "      +inf  -inf  -inf  +inf  nan   nan   nan   nan   +inf  -inf",
    ("bco_pair", 0.0): "    +inf  fin   fin   +inf  +inf  +inf  nan   nan   +inf  0",
    ("sppo_hard", 0.0): "   +inf  +inf  +inf  +inf  +inf  +inf  nan   nan   +inf  +inf",
    ("aot", 0.0): "         +inf  fin   fin   +inf  nan   nan   nan   nan   +inf  fin",
    ("aot", 0.1): "         +inf  +inf  +inf  +inf  nan   nan   nan   nan   +inf  +inf",
    ("aot_unpaired", 0.0): "+inf  fin   fin   +inf  nan   nan   nan   nan   +inf  fin",
    ("aot_unpaired", 0.1): "+inf  +inf  +inf  +inf  nan   nan   nan   nan   +inf  +inf",
    ("apo_zero", 0.0): "    fin   fin   fin   fin   fin   fin   nan   nan   fin   0",
    ("apo_down", 0.0): "    fin   fin   fin   fin   nan   nan   nan   nan   fin   fin",
    ("discopop", 0.0): "    +inf  0     0     +inf  nan   nan   nan   nan   +inf  0",
    ("sft", 0.0): "         +inf  fin   fin   fin   +inf  fin   +inf  fin   +inf  fin",
    ("sigmoid_norm", 0.0): "+inf  0     0     +inf  nan   nan   nan   nan   +inf  0",
}
assert set(LIMITS) == set(VARIANTS)

BETA, TAU = 0.1, 0.05
COUPLED = {k for k, s in L.LOSS_SPECS.items() if s.couples_pairs}
SORTED = {"aot", "aot_unpaired"}
# Pair 0 takes the non-finite values; pairs 1 and 2 stay finite.
BASE = {
    "pc": [-12.0, -7.0, -20.0],
    "pr": [-15.0, -9.0, -16.0],
    "rc": [-11.0, -8.0, -18.5],
    "rr": [-14.0, -9.5, -17.0],
}
NC, NR = [5, 3, 6], [4, 7, 2]
# f-divergences: every one TRL defines, α on both sides of 1 (the limits of f' swap sides).
FDIVS = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.5),
]
CASES = [
    (kind, eps, fk, fa)
    for kind, eps in VARIANTS
    for fk, fa in FDIVS
    if fk == "reverse_kl" or L.LOSS_SPECS[kind].f_divergence_ok
]


def case_id(kind, eps, fk, fa):
    return f"{kind}-eps{eps:g}-{fk}" + (f"{fa:g}" if fk == "alpha_divergence" else "")


def oracle_for(kind, eps, fk, fa, vals, clamp=None):
    kw = dict(beta=BETA, eps=eps, tau=TAU, fk=fk, fa=fa, clamp=clamp)
    return dpo_oracle(kind, **vals, nc=NC, nr=NR, **kw)


def with_values(scenario, value):
    """BASE with pair 0's log-probs named by ``scenario`` set to ``value`` (or values)."""
    vals = {k: list(v) for k, v in BASE.items()}
    keys = SCENARIOS[scenario]
    values = value if isinstance(value, (tuple, list)) else [value] * len(keys)
    for k, v in zip(keys, values):
        vals[k][0] = v
    return vals


# Slopes of the paths to -inf of two log-probs: (−S, −S·m). m = 1 keeps a log-ratio of two of them
# bounded; m = 0.8 = NR[0]/NC[0] keeps the per-token Δ of ipo and sigmoid_norm bounded.
PATH_SLOPES = (0.5, 0.8, 1.0, 1.25, 2.0)


def limit_class(v):
    if isnan(v):
        return "nan"
    if v in (INF, -INF):
        return "+inf" if v > 0 else "-inf"
    return "0" if v == 0 else "fin"


def watched(kind, losses):
    """What LIMITS describes: pair 0's loss, or the batch mean for the coupled losses."""
    return mean(losses) if kind in COUPLED else losses[0]


def test_limits_table_is_what_the_oracle_gives():
    for (kind, eps), row in LIMITS.items():
        want = row.split()
        assert len(want) == len(SCENARIOS), (kind, eps)
        for scenario, w in zip(SCENARIOS, want):
            got = limit_class(
                watched(kind, oracle_for(kind, eps, "reverse_kl", 0.5, with_values(scenario, -INF)))
            )
            assert got == w, f"{kind} eps={eps} {scenario}: oracle {got}, table {w}"


@pytest.mark.parametrize("kind, eps, fk, fa", CASES, ids=[case_id(*c) for c in CASES])
def test_oracle_limits_match_large_finite_inputs(kind, eps, fk, fa):
    """The extended-real oracle at -inf against the same formulas at large finite log-probs: the
    -inf log-probs at −S·(1, m) for m in PATH_SLOPES. A finite limit is approached on every path,
    an infinite one grown towards as S doubles, and "no limit" means the paths disagree (checked
    where the scores are linear in the log-ratio at −∞, reverse KL and JS; the forward-KL and α
    scores exponentiate it, and the paths on which their ∞ − ∞ stays bounded are too thin for a
    grid)."""
    # The forward-KL and α scores exponentiate the log-ratio: S·2 must stay below log(max float).
    scale = 1e5 if fk in ("reverse_kl", "js_divergence") else 150.0
    for scenario in SCENARIOS:
        lim = watched(kind, oracle_for(kind, eps, fk, fa, with_values(scenario, -INF)))
        k = len(SCENARIOS[scenario])

        def at(s, m, scenario=scenario, k=k):
            vals = with_values(scenario, [-s, -s * m][:k])
            return watched(kind, oracle_for(kind, eps, fk, fa, vals))

        what = f"{case_id(kind, eps, fk, fa)} {scenario}: limit {lim}"
        big = [at(scale, m) for m in PATH_SLOPES]
        bigger = [at(2 * scale, m) for m in PATH_SLOPES]
        assert not any(isnan(v) for v in big + bigger), what
        if isnan(lim):
            if fk in ("reverse_kl", "js_divergence"):
                lo, hi = min(bigger), max(bigger)
                assert lo != hi and not hi - lo <= 1e-3 * (1 + abs(lo)), (what, bigger)
        elif lim == INF:
            assert all(b2 > b + 0.1 for b, b2 in zip(big, bigger)), (what, big, bigger)
        elif lim == -INF:
            assert all(b2 < b - 0.1 for b, b2 in zip(big, bigger)), (what, big, bigger)
        else:
            assert all(abs(v - lim) <= 1e-9 * (1 + abs(lim)) for v in bigger), (what, bigger)


# ----------------------------------------------------------------------------- the rule


def assert_limit_or_nan(got, want, what, rtol):
    """Each element of ``got`` is NaN or ``want``'s (exact at ±inf); NaN where ``want`` has no
    limit."""
    got = got.double().tolist() if isinstance(got, torch.Tensor) else got
    got = got if isinstance(got, list) else [got]
    want = want if isinstance(want, list) else [want]
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        if isnan(g):
            continue
        assert not isnan(w), f"{what}[{i}]: {g} where the limit does not exist (must be NaN)"
        if math.isinf(w) or math.isinf(g):
            assert g == w, f"{what}[{i}]: {g}, limit {w}"
        else:
            assert abs(g - w) <= rtol * max(1.0, abs(w)), f"{what}[{i}]: {g}, limit {w}"


RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def tensors(vals, dtype):
    return {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in vals.items()}


def run_dpo(kind, eps, fk, fa, t):
    kw = dict(loss_type=kind, beta=BETA, label_smoothing=eps, discopop_tau=TAU)
    kw.update(f_divergence_type=fk, f_alpha_divergence_coef=fa)
    n = dict(chosen_num_tokens=torch.tensor(NC), rejected_num_tokens=torch.tensor(NR))
    return L.preference_loss(t["pc"], t["pr"], t["rc"], t["rr"], **kw, **n).losses


def grads(losses, t):
    return torch.autograd.grad(
        losses.mean(), list(t.values()), allow_unused=True, retain_graph=True
    )


def assert_other_pairs_untouched(kind, losses, clean, t, tc, what, bad=0):
    """Separable losses: every pair but ``bad`` has the clean batch's loss and gradients."""
    if kind in COUPLED:
        return
    keep = [i for i in range(losses.shape[0]) if i != bad]
    assert torch.equal(losses[keep], clean[keep]), what
    for name, g, gc in zip(t, grads(losses, t), grads(clean, tc)):
        if gc is None:
            assert g is None, (what, name)
            continue
        assert torch.isfinite(g[keep]).all(), f"{what}: d{name} {g}"
        assert torch.equal(g[keep], gc[keep]), f"{what}: d{name} {g} vs {gc}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, eps, fk, fa", CASES, ids=[case_id(*c) for c in CASES])
def test_minus_inf_gives_the_limit_or_nan(kind, eps, fk, fa, dtype):
    """Every scenario of SCENARIOS on pair 0: the limit or NaN, pair by pair and for the mean; the
    other pairs' losses and gradients (separable losses) exactly those of the finite batch."""
    tc = tensors(BASE, dtype)
    clean = run_dpo(kind, eps, fk, fa, tc)
    for scenario in SCENARIOS:
        vals = with_values(scenario, -INF)
        want = oracle_for(kind, eps, fk, fa, vals)
        t = tensors(vals, dtype)
        losses = run_dpo(kind, eps, fk, fa, t)
        what = f"{case_id(kind, eps, fk, fa)} {scenario}"
        # aot's per-pair losses are per sorted position: with one value undetermined, so is every
        # position (torch.sort puts NaN last); the loss is their mean.
        if kind not in SORTED or not any(isnan(w) for w in want):
            assert_limit_or_nan(losses, want, what, RTOL[dtype])
        assert_limit_or_nan(losses.mean().item(), mean(want), f"{what} mean", RTOL[dtype])
        assert_other_pairs_untouched(kind, losses, clean, t, tc, what)


# Which log-probs each loss type reads (a NaN elsewhere must not reach it).
def depends_on(kind):
    return {"pc"} if kind == "sft" else {"pc", "pr", "rc", "rr"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, eps, fk, fa", CASES, ids=[case_id(*c) for c in CASES])
def test_nan_propagates(kind, eps, fk, fa, dtype):
    """A NaN in each log-prob of pair 1 in turn."""
    tc = tensors(BASE, dtype)
    clean = run_dpo(kind, eps, fk, fa, tc)
    for name in ("pc", "pr", "rc", "rr"):
        vals = {k: list(v) for k, v in BASE.items()}
        vals[name][1] = NAN
        t = tensors(vals, dtype)
        losses = run_dpo(kind, eps, fk, fa, t)
        what = f"{case_id(kind, eps, fk, fa)} NaN {name}"
        if name not in depends_on(kind):
            assert torch.equal(losses, clean), what
            continue
        assert torch.isnan(losses.mean()), what
        if kind == "sft":  # the batch's mean NLL: every pair
            assert torch.isnan(losses).all(), what
        elif kind not in COUPLED:
            assert torch.isnan(losses[1]), what
            assert_other_pairs_untouched(kind, losses, clean, t, tc, what, bad=1)


def test_nan_in_wpo_statistics_and_weights_propagates():
    tc = tensors(BASE, torch.float64)
    n = dict(chosen_num_tokens=torch.tensor(NC), rejected_num_tokens=torch.tensor(NR))
    lss = torch.tensor([-3.0, -2.0, -4.0], dtype=torch.float64)
    bad = lss.clone()
    bad[1] = NAN
    for kw in (
        dict(use_weighting=True, chosen_log_sum_sq_probs=bad, rejected_log_sum_sq_probs=lss),
        dict(use_weighting=True, chosen_log_sum_sq_probs=lss, rejected_log_sum_sq_probs=bad),
        dict(weights=torch.exp(bad)),
    ):
        clean_kw = {k: (lss if v is bad else v) for k, v in kw.items()}
        if "weights" in kw:
            clean_kw["weights"] = torch.exp(lss)
        args = (tc["pc"], tc["pr"], tc["rc"], tc["rr"])
        got = L.preference_loss(*args, **n, **kw).losses
        clean = L.preference_loss(*args, **n, **clean_kw).losses
        assert torch.isnan(got[1]) and torch.equal(got[[0, 2]], clean[[0, 2]]), kw.keys()


# ----------------------------------------------------------------------------- the other losses

PAIR_SCENARIOS = {"chosen": (0,), "rejected": (1,), "both": (0, 1)}  # which of (c, r) are -inf
C2, R2 = [-1.5, -0.7, -2.5], [-2.0, -0.4, -3.0]  # average log-probs: ORPO needs them < 0


def simpo_case(eps):
    def fn(c, r):
        return L.simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=eps)

    def oracle(c, r):
        return simpo_oracle(c, r, beta=2.0, gamma=0.5, eps=eps)

    return f"simpo-eps{eps:g}", fn, oracle


def cpo_case(kind, eps):
    def fn(c, r):
        return L.cpo_loss(c, r, beta=0.1, label_smoothing=eps, loss_type=kind, simpo_gamma=0.5)

    def oracle(c, r):
        return cpo_oracle(kind, c, r, beta=0.1, eps=eps, gamma=0.5)

    return f"cpo-{kind}-eps{eps:g}", fn, oracle


def orpo_case():
    def fn(c, r):
        return L.orpo_loss(c, r, beta=0.1)

    def oracle(c, r):
        return orpo_oracle(c, r, beta=0.1)

    return "orpo", fn, oracle


# (name, loss of (c, r) tensors, oracle of (c, r) lists): SimPO, every CPO type, ORPO.
OTHER = (
    [simpo_case(eps) for eps in (0.0, 0.1)]
    + [cpo_case(kind, eps) for kind in L.CPO_LOSS_TYPES for eps in (0.0, 0.1)]
    + [orpo_case()]
)

# The limits of pair 0's loss, in PAIR_SCENARIOS' order (c → −∞, r → −∞, both).
OTHER_LIMITS = {
    "simpo-eps0": "+inf 0 nan",
    "simpo-eps0.1": "+inf +inf nan",
    "cpo-sigmoid-eps0": "+inf 0 nan",
    "cpo-sigmoid-eps0.1": "+inf +inf nan",
    "cpo-hinge-eps0": "+inf 0 nan",
    "cpo-hinge-eps0.1": "+inf 0 nan",
    "cpo-ipo-eps0": "+inf +inf nan",
    "cpo-ipo-eps0.1": "+inf +inf nan",
    "cpo-simpo-eps0": "+inf 0 nan",
    "cpo-simpo-eps0.1": "+inf +inf nan",
    "orpo": "+inf 0 nan",
}
assert set(OTHER_LIMITS) == {name for name, *_ in OTHER}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, fn, oracle", OTHER, ids=[o[0] for o in OTHER])
def test_other_losses_minus_inf_and_nan(name, fn, oracle, dtype):
    def run(c, r):
        c = torch.tensor(c, dtype=dtype, requires_grad=True)
        r = torch.tensor(r, dtype=dtype, requires_grad=True)
        losses = fn(c, r).losses
        return losses, torch.autograd.grad(losses.mean(), [c, r])

    clean, clean_grads = run(C2, R2)
    for scenario, want_class in zip(PAIR_SCENARIOS, OTHER_LIMITS[name].split()):
        vals = [list(C2), list(R2)]
        for k in PAIR_SCENARIOS[scenario]:
            vals[k][0] = -INF
        want = oracle(*vals)
        assert limit_class(want[0]) == want_class, (name, scenario)
        losses, g = run(*vals)
        what = f"{name} -inf {scenario}"
        assert_limit_or_nan(losses, want, what, RTOL[dtype])
        assert torch.equal(losses[1:], clean[1:]), what
        assert all(torch.equal(a[1:], b[1:]) for a, b in zip(g, clean_grads)), what
    for k in (0, 1):
        vals = [list(C2), list(R2)]
        vals[k][1] = NAN
        losses, g = run(*vals)
        what = f"{name} NaN in {'cr'[k]}"
        assert torch.isnan(losses[1]) and torch.isnan(losses.mean()), what
        assert torch.equal(losses[[0, 2]], clean[[0, 2]]), what
        assert all(torch.equal(a[[0, 2]], b[[0, 2]]) for a, b in zip(g, clean_grads)), what


KTO_LOGPS, KTO_REF = [-12.0, -7.0, -20.0, -9.0], [-11.0, -8.0, -18.5, -9.5]
KTO_LABELS = [True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
def test_kto_minus_inf_and_nan(kind, dtype):
    """x = logps − ref: x → −∞ gives λ_D (desirable) or 0; x → +∞ gives 0 or λ_U; both -inf: no
    limit. The KL estimate max(0, mean(policy − ref)) is 0 when a policy KL log-prob is -inf and
    +inf when a reference one is (then desirable λ_D, undesirable 0 for kto)."""
    beta, wd, wu, z = 0.1, 1.5, 0.5, 0.3
    labels = torch.tensor(KTO_LABELS)

    def run(p, ref, kl):
        p_t = torch.tensor(p, dtype=dtype, requires_grad=True)
        ref_t = torch.tensor(ref, dtype=dtype)
        kl_t = kl if isinstance(kl, torch.Tensor) else torch.tensor(kl, dtype=dtype)
        kw = dict(beta=beta, kl=kl_t, desirable_weight=wd, undesirable_weight=wu, loss_type=kind)
        out = L.kto_loss(p_t, ref_t, labels, **kw)
        return out.losses, torch.autograd.grad(out.losses.mean(), p_t)[0]

    def want(p, ref, zz):
        return kto_oracle(kind, p, ref, KTO_LABELS, beta=beta, z=zz, wd=wd, wu=wu)

    clean, clean_g = run(KTO_LOGPS, KTO_REF, z)
    for ex in (0, 1):  # a desirable and an undesirable example
        for which in ("logps", "ref", "both"):
            p, ref = list(KTO_LOGPS), list(KTO_REF)
            if which in ("logps", "both"):
                p[ex] = -INF
            if which in ("ref", "both"):
                ref[ex] = -INF
            w = want(p, ref, z)
            assert limit_class(w[ex]) == (
                "nan" if which == "both" else "fin" if (which == "logps") == KTO_LABELS[ex] else "0"
            )
            losses, g = run(p, ref, z)
            what = f"{kind} -inf {which} example {ex}"
            assert_limit_or_nan(losses, w, what, RTOL[dtype])
            others = [i for i in range(4) if i != ex]
            assert torch.equal(losses[others], clean[others]), what
            assert torch.equal(g[others], clean_g[others]), what
        p = list(KTO_LOGPS)
        p[ex] = NAN
        losses, g = run(p, KTO_REF, z)
        others = [i for i in range(4) if i != ex]
        assert torch.isnan(losses[ex]) and torch.equal(losses[others], clean[others]), kind
        assert torch.equal(g[others], clean_g[others]), kind
    # The KL estimate from mismatched completions.
    pol_kl = torch.tensor([-10.0, -11.0, -9.0], dtype=dtype)
    ref_kl = torch.tensor([-10.5, -10.0, -9.2], dtype=dtype)
    for p_inf, r_inf, z_want in ((True, False, 0.0), (False, True, INF), (True, True, NAN)):
        a, b = pol_kl.clone(), ref_kl.clone()
        if p_inf:
            a[0] = -INF
        if r_inf:
            b[1 if p_inf else 0] = -INF  # two different examples: mean of −∞ and +∞
        kl = L.kto_kl(a, b)
        assert_limit_or_nan(kl.item(), z_want, f"kto_kl {p_inf} {r_inf}", 0.0)
        losses, _ = run(KTO_LOGPS, KTO_REF, kl)
        w = want(KTO_LOGPS, KTO_REF, z_want if kind == "kto" else 0.0)
        assert_limit_or_nan(losses, w, f"{kind} with kl={kl.item()}", RTOL[dtype])
    nan_kl = L.kto_kl(
        torch.tensor([NAN, -1.0], dtype=dtype), torch.tensor([-1.0, -1.0], dtype=dtype)
    )
    assert torch.isnan(nan_kl)
    losses, _ = run(KTO_LOGPS, KTO_REF, nan_kl)
    assert torch.isnan(losses).all() if kind == "kto" else torch.equal(losses, clean)


# ----------------------------------------------------------------------------- regressions


def test_alpha_divergence_keeps_infinite_log_ratios():
    """Regression: the α-divergence score clamped (α−1)·log-ratio at 80 (TRL's guard for finite
    inputs), so a log-prob of -inf got the finite score (e^80 − 1)/(α − 1): the sigmoid loss was
    1.1e34 instead of +inf, and -inf chosen and rejected gave log 2 instead of NaN (∞ − ∞)."""
    z = torch.zeros(2, dtype=torch.float64)
    kw = dict(
        reference_free=True, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5
    )
    out = L.preference_loss(torch.tensor([-INF, -5.0]), torch.tensor([-3.0, -4.0]), **kw).losses
    assert out[0] == INF and torch.isfinite(out[1])
    both = L.preference_loss(torch.tensor([-INF, -5.0]), torch.tensor([-INF, -4.0]), **kw).losses
    assert torch.isnan(both[0])
    # Finite log-ratios keep TRL's clamp: (e^80 − 1)/(α − 1) at a log-ratio of −1e6.
    big = L.preference_loss(z - 1e6, z - 3.0, **kw).losses
    want = -logsig(0.1 * ((math.exp(80.0) - 1) / -0.5 - (math.exp(1.5) - 1) / -0.5))
    torch.testing.assert_close(big, torch.full_like(big, want), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_discopop_is_finite_for_large_negative_margins(dtype):
    """Regression: discopop's e^(−x)·σ(x/τ) overflowed to inf·0 = NaN once β·Δ < −88 in float32
    (−709 in float64), a finite margin whose loss is ≈ −β·Δ; now exp(log σ(x/τ) − x)."""
    pc = torch.tensor([-1e3, -1e4, -12.0], dtype=dtype, requires_grad=True)
    z = torch.zeros(3, dtype=dtype)
    out = L.preference_loss(pc, z - 1, z, z, loss_type="discopop", beta=0.1).losses
    ones, zeros = [1] * 3, [0.0] * 3
    want = dpo_oracle(
        "discopop", pc.tolist(), [-1.0] * 3, zeros, zeros, ones, ones, beta=0.1, eps=0.0, tau=0.05
    )
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(out.sum(), pc)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[:2], torch.full_like(g[:2], -0.1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_orpo_gradient_near_and_at_zero_log_prob(dtype):
    """Regression: ORPO's log(1 − e^c) back-propagated NaN (0·∞ from the unused branch of a
    torch.where) wherever e^c rounds to 1 — average log-probs above −6e-8 in float32 — and at
    c = 0, a completion of probability 1 (its odds are infinite: the loss is 0). The gradient there
    is now the limit −β·odds(r) (just below 0) or 0 (at 0), and finite."""
    beta, r = 0.1, -1.0
    odds_r = math.exp(r) / -math.expm1(r)
    tiny = -1e-30 if dtype == torch.float64 else -1e-8
    c = torch.tensor([tiny, 0.0, -0.5], dtype=dtype, requires_grad=True)
    rr = torch.tensor([r, r, -2.0], dtype=dtype, requires_grad=True)
    out = L.orpo_loss(c, rr, beta=beta)
    gc, gr = torch.autograd.grad(out.losses.sum(), [c, rr])
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all(), (gc, gr)
    torch.testing.assert_close(gc[0].item(), -beta * odds_r, rtol=1e-5, atol=0)
    assert out.losses[1] == 0 and gc[1] == 0 and gr[1] == 0
    assert_limit_or_nan(out.losses, orpo_oracle(c.tolist(), rr.tolist(), beta=beta), "orpo", 1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_orpo_module_with_a_certain_chosen_completion(backend, monkeypatch):
    """Regression: a chosen completion the model is certain of (every token's fp32 log-prob
    exactly 0: its logit 60 above the rest) made every gradient of the ORPO module NaN."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 4, 8, generator=g)
    w = torch.randn(11, 8, generator=g) * 0.5
    b = torch.zeros(11)
    b[3] = 60.0
    t = torch.randint(0, 11, (4, 4), generator=g)
    t[:, 0] = IGNORE
    t[t == 3] = 4
    t[0, 1:] = 3
    for path in ("auto", "recompute"):
        monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", path)
        params = [x.clone().requires_grad_() for x in (h, w, b)]
        loss, out = M.FusedLinearORPOLoss(backend=backend)(params[1], params[0], t, params[2])
        assert out.chosen_logps[0] == 0 and torch.isfinite(loss)
        for p, gr in zip(("hidden", "weight", "bias"), torch.autograd.grad(loss, params)):
            assert torch.isfinite(gr).all(), f"{path}: d{p}"


# ----------------------------------------------------------------------------- modules

T_, D_, V_ = 6, 8, 13
BACKENDS = ["torch", "cpp"]
PATHS = ["auto", "recompute"]  # DPO_KERNELS_LOSS_PATH: the loss-level path, or the plain op
KL = 0.2
KTO_MODULE_LABELS = [True, False, True, True, False]
# float32 kernels against the float64 oracle: values and gradients to this relative accuracy (of
# the largest magnitude involved). Measured worst: 2.4e-7 on values, 1.4e-6 on gradients
# (discopop's).
MOD_RTOL = 1e-5


def module_inputs(n, ignored=(), seed=0):
    """``n`` sequences (chosen half first for the paired modules), a prompt and some padding, a
    reference model near the policy, and every token of the sequences ``ignored`` ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, T_, D_, generator=g)
    w = torch.randn(V_, D_, generator=g) * 0.5
    b = torch.randn(V_, generator=g) * 0.1
    t = torch.randint(0, V_, (n, T_), generator=g)
    t[:, :2] = IGNORE
    t[-1, -1] = IGNORE
    ref = tuple(x + 0.2 * torch.randn(x.shape, generator=g) for x in (h, w, b))
    t[list(ignored)] = IGNORE
    return h, w, b, t, ref


class Seqs(NamedTuple):
    """Naive float64 per-sequence values of a batch: the chosen and rejected halves' log-probs as
    the loss takes them (sums or averages; unpaired: ``c`` holds every sequence), their token
    counts, and the mean NLL of the chosen tokens (``−Σ sums / max(Σ n, 1)``)."""

    c: torch.Tensor
    r: torch.Tensor
    nc: torch.Tensor
    nr: torch.Tensor
    nll: torch.Tensor


def sequences(h, w, b, t, avg, paired=True):
    out = naive_logprobs(h, w, t, b)
    sums, n = out["logps"], out["num_tokens"]
    lp = sums / n.clamp(min=1) if avg else sums
    half = lp.shape[0] // 2 if paired else lp.shape[0]
    nll = -sums[:half].sum() / n[:half].sum().clamp(min=1)
    return Seqs(lp[:half], lp[half:], n[:half], n[half:], nll)


def fl(x):
    return x.detach().double().tolist()


class Case(NamedTuple):
    """A module configuration: ``make(backend)`` builds it, ``call(module, h, w, b, t, ref)``
    runs it, and the oracle's loss from the naive :class:`Seqs` of the policy and the reference is
    ``f64`` (dpo_kernels' functional losses on float64 tensors, for gradients) and ``scalar``
    (the scalar formulas above)."""

    name: str
    make: Callable
    call: Callable
    f64: Callable
    scalar: Callable
    avg: bool
    paired: bool = True


def policy_only(mod, h, w, b, t, ref):
    return mod(w, h, t, b)


def with_reference(mod, h, w, b, t, ref):
    return mod(w, h, t, b, *ref)


def kto_labels(n):
    return torch.tensor(KTO_MODULE_LABELS[:n])


def kto_call(mod, h, w, b, t, ref):
    return mod(h, w, t, b, kto_labels(h.shape[0]), *ref, torch.tensor(KL))


def dpo_case(kind, avg):
    eps = {"exo_pair": 1e-3, "robust": 0.2, "sigmoid": 0.15, "aot": 0.1}.get(kind, 0.0)
    opts = dict(beta=0.1, loss_type=kind, label_smoothing=eps)

    def make(backend):
        kw = dict(alpha=0.7, compute_nll_loss=True, average_log_prob=avg, backend=backend)
        return M.FusedLinearDPOLoss(**kw, **opts)

    def f64(p, ref):
        n = dict(chosen_num_tokens=p.nc, rejected_num_tokens=p.nr, sft_loss=p.nll)
        return L.preference_loss(p.c, p.r, ref.c, ref.r, **opts, **n).losses.mean() + 0.7 * p.nll

    def scalar(p, ref):
        args = (fl(p.c), fl(p.r), fl(ref.c), fl(ref.r), fl(p.nc), fl(p.nr))
        v = dpo_oracle(kind, *args, beta=0.1, eps=eps, tau=0.05, sft=p.nll.item())
        return mean(v) + 0.7 * p.nll.item()

    return Case(f"dpo-{kind}-avg{int(avg)}", make, with_reference, f64, scalar, avg)


def simpo_module_case(eps):
    def make(backend):
        return M.FusedLinearSimPOLoss(label_smoothing=eps, backend=backend)

    def f64(p, ref):
        return L.simpo_loss(p.c, p.r, label_smoothing=eps).losses.mean() + p.nll

    def scalar(p, ref):
        v = simpo_oracle(fl(p.c), fl(p.r), beta=0.1, gamma=0.5, eps=eps)
        return mean(v) + p.nll.item()

    return Case(f"simpo-eps{eps:g}", make, policy_only, f64, scalar, True)


def cpo_module_case(kind, avg):
    def make(backend):
        kw = dict(alpha=0.5, label_smoothing=0.1, average_log_prob=avg, loss_type=kind)
        return M.FusedLinearCPOLoss(**kw, backend=backend)

    def f64(p, ref):
        return L.cpo_loss(p.c, p.r, label_smoothing=0.1, loss_type=kind).losses.mean() + 0.5 * p.nll

    def scalar(p, ref):
        v = cpo_oracle(kind, fl(p.c), fl(p.r), beta=0.1, eps=0.1, gamma=0.5)
        return mean(v) + 0.5 * p.nll.item()

    return Case(f"cpo-{kind}-avg{int(avg)}", make, policy_only, f64, scalar, avg)


def orpo_module_case():
    def make(backend):
        return M.FusedLinearORPOLoss(backend=backend)

    def f64(p, ref):
        return L.orpo_loss(p.c, p.r).losses.mean() + p.nll

    def scalar(p, ref):
        return mean(orpo_oracle(fl(p.c), fl(p.r), beta=0.1)) + p.nll.item()

    return Case("orpo", make, policy_only, f64, scalar, True)


def kto_module_case(kind, avg):
    opts = dict(desirable_weight=1.5, undesirable_weight=0.5, loss_type=kind)

    def make(backend):
        return M.FusedLinearKTOLoss(
            use_ref_model=True, average_log_prob=avg, backend=backend, **opts
        )

    def f64(p, ref):
        kl = torch.tensor(KL, dtype=torch.float64)
        return L.kto_loss(p.c, ref.c, kto_labels(p.c.shape[0]), kl=kl, **opts).losses.mean()

    def scalar(p, ref):
        labels = KTO_MODULE_LABELS[: p.c.shape[0]]
        return mean(kto_oracle(kind, fl(p.c), fl(ref.c), labels, beta=0.1, z=KL, wd=1.5, wu=0.5))

    return Case(f"kto-{kind}-avg{int(avg)}", make, kto_call, f64, scalar, avg, paired=False)


# Every paired module: each DPO loss type with sums and averages (RPO's NLL on, a reference
# model), SimPO, each CPO type with sums and averages, ORPO.
PAIRED = (
    [dpo_case(kind, avg) for kind in L.LOSS_TYPES for avg in (False, True)]
    + [simpo_module_case(eps) for eps in (0.0, 0.1)]
    + [cpo_module_case(kind, avg) for kind in L.CPO_LOSS_TYPES for avg in (False, True)]
    + [orpo_module_case()]
)
KTO = [kto_module_case(kind, avg) for kind in L.KTO_LOSS_TYPES for avg in (False, True)]
SEPARABLE = [c for c in PAIRED if not any(k in c.name for k in ("aot", "sft"))]


def run_module(case, backend, h, w, b, t, ref):
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    loss, out = case.call(case.make(backend), *params, t, ref)
    return loss, out, params


def close(got, want, what, rtol=MOD_RTOL):
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{what}: error {err:.3g} > {rtol:g} x {scale:.3g}"


def check_module(case, backend, h, w, b, t, ref):
    """The module's loss against the scalar oracle (the limit or NaN where that is not finite),
    its gradients finite and, where the loss is finite, equal to the float64 oracle's."""
    loss, out, params = run_module(case, backend, h, w, b, t, ref)
    f64 = [x.double().requires_grad_() for x in (h, w, b)]
    pol = sequences(*f64, t, case.avg, case.paired)
    with torch.no_grad():
        refs = sequences(*(x.double() for x in ref), t, case.avg, case.paired)
    want = case.scalar(pol, refs)
    assert_limit_or_nan(loss.item(), want, f"{case.name} loss", MOD_RTOL)
    got = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in got), f"{case.name}: non-finite gradients"
    if math.isfinite(want):
        f64_loss = case.f64(pol, refs)
        close(
            f64_loss.detach(),
            torch.tensor(want, dtype=torch.float64),
            f"{case.name}: the two oracles",
            1e-9,
        )
        for name, g, og in zip(
            ("hidden", "weight", "bias"), got, torch.autograd.grad(f64_loss, f64)
        ):
            close(g, og, f"{case.name} d{name}")
    return loss, out, got


# (pairs, which sequences have every token ignored), sequence i < pairs being chosen.
PAIRED_SCENARIOS = {
    "B3-rejected_all_ignored": (3, (3, 4, 5)),
    "B3-one_rejected_ignored": (3, (3,)),
    "B3-chosen_all_ignored": (3, (0, 1, 2)),
    "B3-one_chosen_ignored": (3, (0,)),
    "B3-all_ignored": (3, tuple(range(6))),
    "B1": (1, ()),
    "B1-rejected_ignored": (1, (1,)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", PAIRED_SCENARIOS)
def test_paired_modules_on_degenerate_batches(scenario, backend, path, monkeypatch):
    """Every paired module, fp32, against the float64 oracle. A sequence with no token has
    log-prob 0 (sum and average) and the NLL over no chosen token is 0: losses and gradients
    finite, all-zero gradients when nothing is scored. ORPO's empty rejected completion gives
    +inf and all-empty NaN, by its definition (see the module docstring); its gradients stay
    finite."""
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", path)
    pairs, ignored = PAIRED_SCENARIOS[scenario]
    h, w, b, t, ref = module_inputs(2 * pairs, ignored)
    for case in PAIRED:
        loss, out, grads = check_module(case, backend, h, w, b, t, ref)
        what = f"{case.name} {scenario}"
        for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
            assert torch.isfinite(getattr(out, field)).all(), f"{what}: {field}"
        assert all(torch.isfinite(v) for k, v in out.metrics.items() if "log_odds" not in k), what
        if scenario == "B3-all_ignored":
            assert all(torch.all(g == 0) for g in grads), what
        empty_rejected = any(i >= pairs for i in ignored)
        if case.name == "orpo" and empty_rejected:
            empty_chosen = any(i < pairs and i + pairs in ignored for i in ignored)
            assert torch.isnan(loss) if empty_chosen else loss.item() == INF, what
        else:
            assert torch.isfinite(loss), what


KTO_SCENARIOS = {"N5": (5, ()), "N5-one_ignored": (5, (0,)), "N4-all_ignored": (4, range(4))}
KTO_SCENARIOS.update({"N1": (1, ()), "N1-ignored": (1, (0,))})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", KTO_SCENARIOS)
def test_kto_module_on_degenerate_batches(scenario, backend):
    """KTO is unpaired: any N (odd too), sequences without a token (log-prob 0, average 0)."""
    n, ignored = KTO_SCENARIOS[scenario]
    h, w, b, t, ref = module_inputs(n, ignored)
    for case in KTO:
        loss, out, grads = check_module(case, backend, h, w, b, t, ref)
        assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in out), case.name
        if len(ignored) == n:
            assert all(torch.all(g == 0) for g in grads), case.name


def test_odd_batches_raise_for_paired_modules():
    """2B + 1 sequences cannot be split into chosen and rejected halves: a ValueError, never a
    silent re-pairing (also with a reference model, LD-DPO, precomputed reference log-probs, an
    NLL target)."""
    h, w, b, t, ref = module_inputs(5)
    zeros = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(3))
    calls = [
        (M.FusedLinearDPOLoss(), lambda m: m(w, h, t, b, *ref)),
        (M.FusedLinearDPOLoss(use_ref_model=False), lambda m: m(w, h, t, b)),
        (M.FusedLinearDPOLoss(ld_alpha=0.5), lambda m: m(w, h, t, b, *ref)),
        (M.FusedLinearDPOLoss(), lambda m: m(w, h, t, b, **zeros)),
        (M.FusedLinearSimPOLoss(), lambda m: m(w, h, t, b)),
        (M.FusedLinearCPOLoss(), lambda m: m(w, h, t, b)),
        (M.FusedLinearORPOLoss(), lambda m: m(w, h, t, b)),
        (M.FusedLinearORPOLoss(), lambda m: m(w, h, t, b, nll_target=t)),
    ]
    for mod, call in calls:
        mod.backend = "torch"
        with pytest.raises(ValueError, match=r"chosen and rejected halves.*odd batch of 5"):
            call(mod)
    # An even batch with a reference batch, or precomputed reference log-probs, of another size.
    h, w, b, t, ref = module_inputs(4)
    with pytest.raises(ValueError, match="ref_input"):
        M.FusedLinearDPOLoss(backend="torch")(w, h, t, b, ref[0][:3], ref[1], ref[2])
    zeros = dict(ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(2,\)"):
        M.FusedLinearDPOLoss(backend="torch")(w, h, t, b, **zeros)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_nan_hidden_state(backend, path, monkeypatch):
    """A NaN hidden state at a scored token of pair 1's rejected completion: the loss is NaN, and a
    separable loss leaves the other pairs' hidden-state gradients as they are without it."""
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", path)
    h, w, b, t, ref = module_inputs(6)
    bad = h.clone()
    bad[4, 3] = NAN  # sequence 4: pair 1's rejected completion
    assert t[4, 3] != IGNORE
    keep = [0, 2, 3, 5]  # the sequences of pairs 0 and 2
    for case in SEPARABLE:
        clean_loss, _, params = run_module(case, backend, h, w, b, t, ref)
        (clean_g,) = torch.autograd.grad(clean_loss, params[0])
        loss, out, params = run_module(case, backend, bad, w, b, t, ref)
        (g,) = torch.autograd.grad(loss, params[0])
        assert torch.isnan(loss) and torch.isnan(out.rejected_logps[1]), case.name
        assert torch.isfinite(out.rejected_logps[[0, 2]]).all(), case.name
        close(g[keep], clean_g[keep], f"{case.name}: other pairs' d_hidden", 1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_modules_minus_inf_log_prob_from_a_masked_token(side, backend, path, monkeypatch):
    """A token the policy's head masks out (bias -inf) in pair 0's chosen or rejected completion:
    its log-prob is -inf, and every module's loss is the limit the formulas give, or NaN."""
    monkeypatch.setenv("DPO_KERNELS_LOSS_PATH", path)
    h, w, b, t, ref = module_inputs(6)
    masked = V_ - 1
    t[t == masked] = 0
    seq = 0 if side == "chosen" else 3
    t[seq, 3] = masked
    b = b.clone()
    b[masked] = -INF
    for case in PAIRED:
        loss, out, _ = run_module(case, backend, h, w, b, t, ref)
        with torch.no_grad():
            pol = sequences(*(x.double() for x in (h, w, b)), t, case.avg)
            refs = sequences(*(x.double() for x in ref), t, case.avg)
        assert getattr(pol, side[0])[0] == -INF == getattr(out, f"{side}_logps")[0], case.name
        assert_limit_or_nan(loss.item(), case.scalar(pol, refs), case.name, MOD_RTOL)


# ----------------------------------------------------------------------------- fuzzing
#
# The tables above put one non-finite value at a time on pair 0. Here Hypothesis draws whole
# batches — any mix of finite log-probs (0 and values next to it included), -inf and NaN on any
# pair — for every loss type and variant, and holds each pair's loss (and the batch mean) to the
# float64 scalar oracle: the oracle's value where it is finite, its limit or NaN where not.

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the test extra installs it; without it only this test is skipped
    given = None

LOGP = (
    None
    if given is None
    else st.one_of(
        st.floats(-60.0, 0.0),
        st.sampled_from([0.0, -1e-12, -1e-6, -300.0, -INF, NAN]),
    )
)


def _rounding_allowance(kind, eps, fk, fa, vals, dtype):
    """Per pair, how far the oracle moves when the log-ratios ``c``, ``r`` the loss computes in
    ``dtype`` carry that dtype's rounding (2^-23 relative in float32): the loss's conditioning,
    not its error. (The exponential f-divergence scores turn a log-ratio of -12 into e^6·(1 ±
    1e-6), and Δ = f'(c) − f'(r) of two such scores cancels: float32 inputs decide Δ to ~1e-4 of
    itself there.) 0 in float64, where the test asks for 1e-12."""
    n = len(vals["pc"])
    if dtype == torch.float64:
        return [0.0] * n
    base = oracle_for(kind, eps, fk, fa, vals, clamp=80.0)
    allow = [0.0] * n
    for fc in (1 - 2**-23, 1 + 2**-23):
        for fr in (1 - 2**-23, 1 + 2**-23):
            moved = {k: list(v) for k, v in vals.items()}
            for i in range(n):
                if all(math.isfinite(vals[k][i]) for k in vals):
                    moved["rc"][i] = vals["pc"][i] - (vals["pc"][i] - vals["rc"][i]) * fc
                    moved["rr"][i] = vals["pr"][i] - (vals["pr"][i] - vals["rr"][i]) * fr
            for i, (w, m) in enumerate(zip(base, oracle_for(kind, eps, fk, fa, moved, 80.0))):
                if math.isfinite(w) and math.isfinite(m):
                    allow[i] = max(allow[i], abs(m - w))
    return allow


def _fuzz_losses(kind, eps, fk, fa, dtype, data):
    n = len(BASE["pc"])
    vals = {k: data.draw(st.lists(LOGP, min_size=n, max_size=n), label=k) for k in BASE}
    # The oracle on the very inputs the loss sees (rounded to the dtype): a float32 log-prob of
    # -32 is off by ~1e-6, and e^32 of it by 3e-5 relative — the input's error, not the loss's.
    vals = {k: torch.tensor(v, dtype=dtype).tolist() for k, v in vals.items()}
    # α-divergence: the finite exponent capped at 80 (TRL's parity clamp; see losses.py).
    want = oracle_for(kind, eps, fk, fa, vals, clamp=80.0)
    losses = run_dpo(kind, eps, fk, fa, tensors(vals, dtype))
    what = f"{case_id(kind, eps, fk, fa)} {vals}"
    # The oracle's float64 value rounded to the dtype: past its range the dtype's ±inf is right.
    rounded = [torch.tensor(w, dtype=dtype).item() for w in want]
    allow = _rounding_allowance(kind, eps, fk, fa, vals, dtype)
    got = losses.double().tolist()
    per_pair = kind not in SORTED or not any(isnan(w) for w in want)

    def check(g, w, allowance, where):
        # A finite answer: within the rounding allowance of the float64 oracle (which may lie
        # past the dtype's range when the allowance is that large); else the limit rule against
        # the oracle rounded to the dtype.
        if math.isfinite(g) and math.isfinite(w):
            tol = RTOL[dtype] * max(1.0, abs(w)) + 2 * allowance
            assert abs(g - w) <= tol, f"{where}: {g}, oracle {w} (allowance {tol:.3g})"
        else:
            assert_limit_or_nan(g, torch.tensor(w, dtype=dtype).item(), where, RTOL[dtype])

    for i in range(n if per_pair else 0):
        check(got[i], want[i], allow[i], f"{what}[{i}]")
    check(losses.mean().item(), mean(want), mean(allow), f"{what} mean")
    # Where every log-prob the pair's loss reads is finite (the whole batch's for the coupled
    # losses) and the oracle is finite in the dtype, NaN is not an answer.
    finite = [all(math.isfinite(vals[k][i]) for k in depends_on(kind)) for i in range(n)]
    if kind in COUPLED:
        finite = [all(finite)] * n
    for i in range(n if kind not in SORTED else 0):
        if finite[i] and math.isfinite(rounded[i]):
            assert not isnan(got[i]), f"{what}[{i}]: NaN where the oracle is {rounded[i]}"


@pytest.mark.skipif(given is None, reason="hypothesis is not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, eps, fk, fa", CASES, ids=[case_id(*c) for c in CASES])
def test_fuzz_losses_against_the_oracle(kind, eps, fk, fa, dtype):
    """Random batches with -inf, NaN and near-0 log-probs anywhere: the oracle's value, limit or
    NaN, pair by pair and for the mean (25 examples per case, derandomized: reproducible;
    ``DPO_KERNELS_FUZZ_LONG=1``: 1000 fresh ones)."""
    long = os.environ.get("DPO_KERNELS_FUZZ_LONG", "0") == "1"

    @settings(max_examples=1000 if long else 25, deadline=None, derandomize=not long, database=None)
    @given(data=st.data())
    def run(data):
        _fuzz_losses(kind, eps, fk, fa, dtype, data)

    run()
