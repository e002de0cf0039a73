"""Parity with TRL 1.16 itself: its loss methods run unbound on stub trainers and stub models.

TRL's DPO/KTO losses consume the per-token outputs of a model's fused LM head. The stub model
computes those from naive logits ``h @ W.T + b`` of hidden states it holds, so TRL's loss is
differentiable w.r.t. the same ``h``, ``W``, ``b`` our fused modules take: losses, gradients and
the logged metrics are compared one to one, in float64 unless a case says otherwise.
"""

import types
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpo_kernels.losses import F_DIVERGENCES, LOSS_TYPES, cpo_loss, orpo_loss
from dpo_kernels.modules import FusedLinearDPOLoss, FusedLinearKTOLoss

trl = pytest.importorskip("trl")

IGNORE = -100
B, T, D, V = 3, 9, 8, 37
BETA = 0.1
DISCOPOP_TAU = 0.05  # our default, passed to TRL through args
ACCEL = types.SimpleNamespace(
    device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
)
DPO_METRICS = (
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
)
KTO_METRICS = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
)
# Our metrics are float32 (cheap to log); TRL's are Python floats from float64 tensors.
METRIC_TOL = 2e-6


def _experimental(name):
    """Import ``trl.experimental.<name>`` without its "unstable API" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(f"trl.experimental.{name}")


# ----------------------------------------------------------------------------- stub model


class StubLM(nn.Module):
    """A causal LM under TRL's ``fused_lm_head=True``: per-token outputs at positions 1..T-1 from
    naive full logits of the hidden states held for each ``input_ids`` batch."""

    is_gradient_checkpointing = False  # read by TRL's disable_gradient_checkpointing

    def __init__(self, weight, bias, batches):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.batches = batches  # [(input_ids, hidden (n, T-1, D))]

    def _hidden(self, input_ids):
        for ids, hidden in self.batches:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                return hidden
        raise AssertionError("StubLM called with input_ids it holds no hidden states for")

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache, **kw):
        assert fused_lm_head and not use_cache and not kw, kw
        z = self._hidden(input_ids) @ self.weight.T + self.bias
        logp = z.log_softmax(-1)
        target = labels[:, 1:]
        valid = target != IGNORE
        safe = target.clamp(min=0)
        tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        # Only log_probs is zeroed off the completion: TRL must mask the other fields itself.
        return types.SimpleNamespace(
            log_probs=torch.where(valid, tok, torch.zeros_like(tok)),
            entropy=-(logp.exp() * logp).sum(-1),
            mean_logits=z.mean(-1),
            is_top1=z.argmax(-1) == safe,
            log_sum_sq_probs=torch.logsumexp(2 * logp, dim=-1),
        )


def _ids_and_mask(n, gen):
    """Random ids; completion mask = prompt (≥1 zeros), completion (≥1 ones), padding (zeros)."""
    ids = torch.randint(0, V, (n, T), generator=gen)
    mask = torch.zeros(n, T, dtype=torch.int64)
    for i in range(n):
        prompt = int(torch.randint(1, T, (), generator=gen))
        comp = int(torch.randint(1, T - prompt + 1, (), generator=gen))
        mask[i, prompt : prompt + comp] = 1
    return ids, mask


def _targets(ids, mask):
    """Our kernel's labels: aligned with the hidden states of positions 0..T-2."""
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)


def _head(gen, dtype, grad):
    """(h, W, b) with logits of O(1), so log-ratios stay moderate."""

    def leaf(*shape, scale=1.0):
        return (
            (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)
            .to(dtype)
            .requires_grad_(grad)
        )

    return leaf(2 * B, T - 1, D), leaf(V, D, scale=0.5), leaf(V, scale=0.5)


class DPOCase:
    """One random batch with a policy and a (different) reference head."""

    def __init__(self, seed=0, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.ids, self.mask = _ids_and_mask(2 * B, gen)
        self.h, self.w, self.b = _head(gen, dtype, grad=True)
        self.ref_h, self.ref_w, self.ref_b = _head(gen, dtype, grad=False)
        self.policy = StubLM(self.w, self.b, [(self.ids, self.h)])
        self.ref = StubLM(self.ref_w, self.ref_b, [(self.ids, self.ref_h)])
        self.target = _targets(self.ids, self.mask)

    def naive_logps(self, model):
        """Per-sequence sums from the stub (the naive oracle), chosen and rejected halves."""
        labels = self.ids.masked_fill(self.mask == 0, IGNORE)
        out = model(self.ids, None, labels, fused_lm_head=True, use_cache=False)
        return out.log_probs.sum(1).chunk(2)

    def inputs(self, precompute):
        inputs = {
            "input_ids": self.ids,
            "attention_mask": torch.ones_like(self.ids),
            "completion_mask": self.mask,
        }
        if precompute:
            with torch.no_grad():
                inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.naive_logps(
                    self.ref
                )
        return inputs

    def trl(
        self,
        *,
        loss_type,
        label_smoothing=0.0,
        loss_weights=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        use_weighting=False,
        ld_alpha=None,
        precompute=False,
    ):
        """TRL's ``DPOTrainer._compute_loss`` on a stub trainer: (loss, grads, metrics)."""
        kinds = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        stub = types.SimpleNamespace(
            model=self.policy,
            accelerator=ACCEL,
            aux_loss_enabled=False,
            ld_alpha=ld_alpha,
            precompute_ref_logps=precompute,
            ref_model=None if precompute else self.ref,
            args=types.SimpleNamespace(
                gradient_checkpointing_kwargs=None, discopop_tau=DISCOPOP_TAU
            ),
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            loss_types=kinds,
            loss_weights=list(loss_weights or [1.0] * len(kinds)),
            beta=BETA,
            label_smoothing=label_smoothing,
            use_weighting=use_weighting,
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
        )
        # exo_pair builds ε with torch.tensor(label_smoothing): under the float32 default its
        # log ε carries float32 rounding (3e-8 relative), so TRL runs with the case's dtype.
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.h.dtype)
        try:
            loss = trl.DPOTrainer._compute_loss(stub, self.policy, self.inputs(precompute), False)
        finally:
            torch.set_default_dtype(default)
        grads = torch.autograd.grad(loss, (self.h, self.w, self.b))
        metrics = {k: stub._metrics["train"][k][-1] for k in DPO_METRICS}
        return loss.detach(), grads, metrics

    def ours(
        self,
        *,
        loss_type,
        label_smoothing=0.0,
        loss_weights=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        use_weighting=False,
        ld_alpha=None,
        precompute=False,
    ):
        fn = FusedLinearDPOLoss(
            beta=BETA,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            discopop_tau=DISCOPOP_TAU,
            loss_weights=loss_weights,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            use_weighting=use_weighting,
            ld_alpha=ld_alpha,
            backend="torch",
        )
        if precompute:
            inputs = self.inputs(True)
            ref = dict(
                ref_chosen_logps=inputs["ref_chosen_logps"],
                ref_rejected_logps=inputs["ref_rejected_logps"],
            )
        else:
            ref = dict(ref_input=self.ref_h, ref_weight=self.ref_w, ref_bias=self.ref_b)
        loss, aux = fn(self.w, self.h, self.target, self.b, **ref)
        grads = torch.autograd.grad(loss, (self.h, self.w, self.b))
        metrics = {k: aux.metrics[k].item() for k in DPO_METRICS}
        return loss.detach(), grads, metrics


# ----------------------------------------------------------------------------- comparisons


def _close(ours, theirs, rtol, what):
    """Relative to the largest magnitude, so near-zero elements are not held to rtol alone."""
    theirs = theirs.to(ours.dtype)
    atol = rtol * max(theirs.abs().max().item(), 1e-30)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare(ours, theirs, *, loss_rtol=1e-10, grad_rtol=1e-9, metric_tol=METRIC_TOL):
    (loss, grads, metrics), (t_loss, t_grads, t_metrics) = ours, theirs
    _close(loss, t_loss, loss_rtol, "loss")
    for name, g, tg in zip(("h", "W", "b"), grads, t_grads):
        _close(g, tg, grad_rtol, f"grad {name}")
    for key in DPO_METRICS:
        assert metrics[key] == pytest.approx(t_metrics[key], rel=metric_tol, abs=metric_tol), key


def _smoothing(loss_type):
    """ε where a loss type uses it (exo_pair needs ε > 0). Loss types that ignore ε get it too,
    to show both sides ignore it; sigmoid gets 0 (see test_sigmoid_label_smoothing_is_cdpo)."""
    return 0.0 if loss_type == "sigmoid" else 0.1


# ----------------------------------------------------------------------------- DPO family


def test_case_is_informative():
    """The batch exercises padding, unequal chosen/rejected lengths and mixed reward signs."""
    case = DPOCase()
    lens = case.mask.sum(1)
    assert (case.mask[:, -1] == 0).any()
    assert (lens[:B] != lens[B:]).any()
    _, _, metrics = case.trl(loss_type="sigmoid")
    assert 0.0 < metrics["rewards/accuracies"] < 1.0


@pytest.mark.parametrize("precompute", [False, True], ids=["ref_model", "precomputed"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_type(loss_type, precompute):
    case = DPOCase()
    kw = dict(loss_type=loss_type, label_smoothing=_smoothing(loss_type), precompute=precompute)
    _compare(case.ours(**kw), case.trl(**kw))


def test_sigmoid_label_smoothing_is_cdpo():
    """TRL 1.16 ignores label_smoothing for sigmoid; we apply conservative DPO. With ε = 0 we agree
    (test_loss_type); with ε > 0 ours is exactly −(1−ε)·log σ(x) − ε·log σ(−x), i.e. TRL's loss
    plus ε·mean(x), with x = β·(chosen − rejected log-ratio) from the naive oracle."""
    eps = 0.2
    case = DPOCase()
    loss, grads, _ = case.ours(loss_type="sigmoid", label_smoothing=eps)
    t_loss, _, _ = case.trl(loss_type="sigmoid", label_smoothing=eps)
    pc, pr = case.naive_logps(case.policy)
    with torch.no_grad():
        rc, rr = case.naive_logps(case.ref)
    x = BETA * ((pc - rc) - (pr - rr))
    cdpo = (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean()
    _close(loss, cdpo.detach(), 1e-10, "loss vs cDPO formula")
    _close(loss - t_loss, eps * x.detach().mean(), 1e-9, "loss − TRL vs ε·mean(x)")
    for name, g, tg in zip(
        ("h", "W", "b"), grads, torch.autograd.grad(cdpo, (case.h, case.w, case.b))
    ):
        _close(g, tg, 1e-9, f"grad {name} vs cDPO formula")


@pytest.mark.parametrize(
    "loss_type,loss_weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
        (["ipo", "apo_zero", "aot"], [0.5, 1.5, 0.3]),
    ],
)
def test_loss_type_list(loss_type, loss_weights):
    case = DPOCase(seed=1)
    kw = dict(loss_type=loss_type, loss_weights=loss_weights, label_smoothing=0.0)
    _compare(case.ours(**kw), case.trl(**kw))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize(
    "f_div,coef",
    [(f, 0.5) for f in F_DIVERGENCES if f != "alpha_divergence"]
    + [("alpha_divergence", 0.3), ("alpha_divergence", 1.0)],
)
def test_f_divergence(loss_type, f_div, coef):
    # TRL's alpha_divergence path picks its exp clamp from a dict keyed by dtype that has no
    # float64 entry (KeyError), so coef ≠ 1 runs in float32 on both sides; coef = 1 falls back to
    # reverse KL before that lookup and stays float64. float32 logits differ by rounding between
    # our torch backend and the naive stub, hence the looser tolerances (measured: loss 1.8e-7,
    # gradients 2.4e-6 relative to their largest element).
    f32 = f_div == "alpha_divergence" and coef != 1.0
    case = DPOCase(seed=2, dtype=torch.float32 if f32 else torch.float64)
    kw = dict(loss_type=loss_type, f_divergence_type=f_div, f_alpha_divergence_coef=coef)
    tol = dict(loss_rtol=1e-5, grad_rtol=1e-5, metric_tol=1e-5) if f32 else {}
    _compare(case.ours(**kw), case.trl(**kw), **tol)


# Not with "sft": TRL 1.16 then crashes (in-place *= on the expanded SFT loss tensor).
@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "ipo"]], ids=["sigmoid", "mpo"])
def test_wpo_weighting(loss_type):
    case = DPOCase(seed=3)
    kw = dict(
        loss_type=loss_type,
        use_weighting=True,
        loss_weights=None if isinstance(loss_type, str) else [1.0, 0.5],
    )
    _compare(case.ours(**kw), case.trl(**kw))


@pytest.mark.parametrize("precompute", [False, True], ids=["ref_model", "precomputed"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_alpha(ld_alpha, precompute):
    case = DPOCase(seed=4)
    lens = case.mask.sum(1)
    assert (lens[:B] != lens[B:]).any()  # else LD-DPO has no tail to down-weight
    # Precomputed reference log-probs are used as given on both sides (TRL applies ld_alpha when
    # it precomputes them; here they are plain sums).
    kw = dict(loss_type="sigmoid", ld_alpha=ld_alpha, precompute=precompute)
    _compare(case.ours(**kw), case.trl(**kw))


# ----------------------------------------------------------------------------- CPO / ORPO


def _pairs(seed, dtype=torch.float64, scale=20.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    c, r = (-(torch.rand(8, generator=gen, dtype=torch.float64) * scale + offset) for _ in "cr")
    return c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_loss(loss_type, eps):
    cpo = _experimental("cpo")
    stub = types.SimpleNamespace(
        alpha=0.0,
        beta=BETA,
        loss_type=loss_type,
        simpo_gamma=0.7,
        label_smoothing=eps,
        accelerator=ACCEL,
    )
    c, r = _pairs(5)
    t_losses, t_cr, t_rr = cpo.CPOTrainer.cpo_loss(stub, c, r)
    out = cpo_loss(c, r, beta=BETA, label_smoothing=eps, loss_type=loss_type, simpo_gamma=0.7)
    _close(out.losses.detach(), t_losses.detach(), 1e-12, "losses")
    _close(out.chosen_rewards, t_cr, 1e-12, "chosen rewards")
    _close(out.rejected_rewards, t_rr, 1e-12, "rejected rewards")
    grads = torch.autograd.grad(out.losses.sum(), (c, r))
    for g, tg in zip(grads, torch.autograd.grad(t_losses.sum(), (c, r))):
        _close(g, tg, 1e-12, "grad")


def test_orpo_loss():
    # TRL casts the log-probs to float32 first, so both sides run in float32. Average log-probs
    # span (−3.01, −0.01]: both branches of log(1 − eᵡ) (split at −log 2) are hit.
    orpo = _experimental("orpo")
    stub = types.SimpleNamespace(beta=BETA, accelerator=ACCEL)
    c, r = _pairs(6, dtype=torch.float32, scale=3.0, offset=0.01)
    t_losses, t_cr, t_rr, t_ratio, t_log_odds = orpo.ORPOTrainer.odds_ratio_loss(stub, c, r)
    out = orpo_loss(c, r, beta=BETA)
    # TRL's "losses" are +β·log σ(log-odds), which its trainer subtracts; ours are the loss itself.
    _close(out.losses.detach(), -t_losses.detach(), 1e-6, "losses")
    _close(out.chosen_rewards, t_cr, 1e-6, "chosen rewards")
    _close(out.rejected_rewards, t_rr, 1e-6, "rejected rewards")
    _close(out.log_odds_ratio, t_ratio, 1e-6, "log_odds_ratio")
    _close(out.log_odds_chosen, t_log_odds, 1e-6, "log_odds_chosen")
    grads = torch.autograd.grad(out.losses.sum(), (c, r))
    for g, tg in zip(grads, torch.autograd.grad(-t_losses.sum(), (c, r))):
        _close(g, tg, 1e-5, "grad")


# ----------------------------------------------------------------------------- KTO


class _KTOStub(types.SimpleNamespace):
    """Stub KTOTrainer: ``_compute_loss`` calls ``self._compute_kl_logps``, so it is TRL's own."""

    _compute_kl_logps = trl.KTOTrainer._compute_kl_logps


@pytest.mark.parametrize(
    "loss_type,kl_case,undesirable_weight",
    [
        ("kto", "positive", 1.25),
        ("kto", "clamped", 1.25),
        ("apo_zero_unpaired", "none", 1.25),
        ("kto", "positive", 1.33),  # not exact in float32: the weights must stay in float64
    ],
)
def test_kto(loss_type, kl_case, undesirable_weight):
    """KTO loss, gradients and metrics against TRL's KTOTrainer, KL batch included."""
    n = 2 * B
    gen = torch.Generator().manual_seed(7)
    ids, mask = _ids_and_mask(n, gen)
    kl_ids, kl_mask = _ids_and_mask(n, gen)
    label = torch.tensor([True, False, True, True, False, False])
    h, w, b = _head(gen, torch.float64, grad=True)
    ref_h, ref_w, ref_b = _head(gen, torch.float64, grad=False)
    kl_h = torch.randn(n, T - 1, D, generator=gen, dtype=torch.float64)
    ref_kl_h = torch.randn(n, T - 1, D, generator=gen, dtype=torch.float64)
    # A near-uniform head scores random tokens better than a sharp one (Jensen): flattening the
    # policy's KL states makes the KL estimate positive, flattening the reference's clamps it at 0.
    if kl_case == "positive":
        kl_h = kl_h * 0.05
    elif kl_case == "clamped":
        ref_kl_h = ref_kl_h * 0.05
    policy = StubLM(w, b, [(ids, h), (kl_ids, kl_h)])
    ref = StubLM(ref_w, ref_b, [(ids, ref_h), (kl_ids, ref_kl_h)])
    use_kl = kl_case != "none"
    weights = dict(desirable_weight=1.0, undesirable_weight=undesirable_weight)

    stub = _KTOStub(
        model=policy,
        accelerator=ACCEL,
        calculate_KL=use_kl,
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        ref_model=ref,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        loss_type=loss_type,
        beta=BETA,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **weights,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_mask,
        "label": label,
    }
    t_loss = trl.KTOTrainer._compute_loss(stub, policy, inputs, False)
    t_grads = torch.autograd.grad(t_loss, (h, w, b))
    t_metrics = {k: stub._metrics["train"][k][-1] for k in KTO_METRICS}
    if kl_case == "positive":
        assert t_metrics["kl"] > 0.1
    else:
        assert t_metrics["kl"] == 0.0

    fn = FusedLinearKTOLoss(
        beta=BETA, use_ref_model=True, loss_type=loss_type, backend="torch", **weights
    )
    kl_inputs = (
        dict(kl_input=kl_h, kl_target=_targets(kl_ids, kl_mask), ref_kl_input=ref_kl_h)
        if use_kl
        else {}
    )
    loss, aux = fn(
        h,
        w,
        _targets(ids, mask),
        b,
        preference_labels=label,
        ref_input=ref_h,
        ref_weight=ref_w,
        ref_bias=ref_b,
        **kl_inputs,
    )
    grads = torch.autograd.grad(loss, (h, w, b))

    _close(loss.detach(), t_loss.detach(), 1e-10, "loss")
    for name, g, tg in zip(("h", "W", "b"), grads, t_grads):
        _close(g, tg, 1e-9, f"grad {name}")
    for key in KTO_METRICS:
        got = aux.metrics[key].item()
        assert got == pytest.approx(t_metrics[key], rel=METRIC_TOL, abs=METRIC_TOL), key
