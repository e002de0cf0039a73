"""Mixture-of-Experts models in dpo_kernels.integrations.trl.DPOTrainer: the router
load-balancing loss (``output_router_logits`` / ``router_aux_loss_coef``) is added and logged as
stock trl.DPOTrainer does. Tiny random Mixtral / Qwen2-MoE / Qwen3-MoE in fp32 on CPU: one batch
gives the same loss, logged metrics (``aux_loss`` included) and parameter gradients."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import dpo_kernels as dk  # noqa: E402
from dpo_kernels.integrations import transformers as dk_hf  # noqa: E402
from dpo_kernels.integrations import trl as dk_trl  # noqa: E402

from .helpers import (  # noqa: E402
    assert_trl_parity,
    make_dpo_trainer,
    max_rel,
    perturbed_copy,
    tiny_lm_config,
    tiny_policy_and_reference,
    tiny_preference_dataset,
    tiny_tokenizer,
    trainer_batch,
    trl_one_batch,
)

RTOL = 1e-4  # the bound

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 32},
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return tiny_preference_dataset()


def _moe_policy_and_reference(tokenizer, family, seed=0, **config):
    """A tiny random fp32 MoE causal LM (4 experts, top 2, router logits on, aux coefficient 0.1
    in its config) and a reference differing from it by small noise."""
    config_cls, model_cls, extra = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(seed)
    moe = tiny_lm_config(
        tokenizer,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        # fixed GEMM shapes: the default grouped_mm makes new per-expert shapes for every
        # model (seconds of one-off kernel set-up on CPU); the aux loss does not depend on it
        experts_implementation="batched_mm",
    )
    cfg = getattr(transformers, config_cls)(**{**moe, **extra, **config})
    policy = getattr(transformers, model_cls)(cfg).float()
    return policy, perturbed_copy(policy)


def _trainer(cls, tokenizer, dataset, tmp_path, family="mixtral", model_config=None, **config):
    policy, reference = _moe_policy_and_reference(tokenizer, family, **(model_config or {}))
    return make_dpo_trainer(cls, policy, reference, tokenizer, dataset, tmp_path, **config)


def _assert_parity(ours, stock):
    """Returns the largest relative differences (loss, metric, gradient) for the report."""
    loss_diff, metric_diff, worst = assert_trl_parity(ours, stock, RTOL)
    aux_diff = abs(ours[1].get("aux_loss", 0.0) - stock[1].get("aux_loss", 0.0))
    return loss_diff, metric_diff, aux_diff, worst


_batch, _one_batch, _max_rel = trainer_batch, trl_one_batch, max_rel


def _router_weights(grads):
    return {n: g for n, g in grads.items() if n.endswith("mlp.gate.weight")}


CASES = {
    # the config's coefficient (DPOConfig.router_aux_loss_coef=None), the loss-level path
    "mixtral": ("mixtral", {}, {}),
    "qwen2_moe": ("qwen2_moe", {}, {}),
    "qwen3_moe": ("qwen3_moe", {}, {}),
    # the plain (per-token) path carries it too
    "mixtral_ld_dpo": ("mixtral", {}, {"ld_alpha": 0.4}),
    # DPOConfig's coefficient wins; TRL enables the loss whenever the config has the field
    "mixtral_args_coef": (
        "mixtral",
        {"output_router_logits": False},
        {"router_aux_loss_coef": 0.3},
    ),
    # off: coefficient 0, no aux_loss metric
    "mixtral_off": ("mixtral", {}, {"router_aux_loss_coef": 0.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_batch_matches_stock_trl(name, tokenizer, dataset, tmp_path, monkeypatch):
    family, model_config, config = CASES[name]
    stock_trainer = _trainer(
        trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", family, model_config, **config
    )
    stock = _one_batch(stock_trainer)
    calls = []
    real, real_pair = dk_trl.sequence_logprobs, dk_trl.sequence_pair_loss

    def seq(*a, **k):
        calls.append(("plain", k["router_aux_loss"]))
        return real(*a, **k)

    def pair(*a, **k):
        out = real_pair(*a, **k)
        calls.append(("loss-level" if out[0] is not None else "plain", k["router_aux_loss"]))
        return out

    monkeypatch.setattr(dk_trl, "sequence_logprobs", seq)
    monkeypatch.setattr(dk_trl, "sequence_pair_loss", pair)
    trainer = _trainer(  # constructing it no longer raises NotImplementedError
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", family, model_config, **config
    )
    on = name != "mixtral_off"
    assert trainer.aux_loss_enabled is stock_trainer.aux_loss_enabled is on
    ours = _one_batch(trainer)
    # The reference never asks for the aux loss; the policy does (when it is on).
    policy_path = "plain" if "ld_alpha" in config else "loss-level"
    assert calls == [("plain", False), (policy_path, on)]
    diffs = _assert_parity(ours, stock)
    print(
        f"{name}: loss rel {diffs[0]:.1e}, worst metric abs {diffs[1][0]:.1e} ({diffs[1][1]}), "
        f"aux_loss abs {diffs[2]:.1e}, gradients rel {diffs[3]:.1e}"
    )
    metrics, grads = ours[1], ours[2]
    assert ("aux_loss" in metrics) is on
    if on:
        assert metrics["aux_loss"] > 0
    assert metrics["rewards/margins"] != 0  # the reference differs: the comparison has teeth
    routers = _router_weights(grads)
    assert len(routers) == 2 and all(g.abs().max() > 0 for g in routers.values())


def test_aux_loss_is_the_models_own_and_reaches_the_routers(tokenizer, dataset, tmp_path):
    """With the coefficient on, the logged aux_loss is the model forward's ``aux_loss`` and the
    gradients are the coefficient-0 ones plus ``coef · ∇aux_loss`` (from the model's forward)."""
    coef = 0.1
    on = _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "on")
    off = _trainer(
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "off", router_aux_loss_coef=0.0
    )
    loss_on, metrics, grads_on = _one_batch(on)
    loss_off, _, grads_off = _one_batch(off)

    model = on.model
    batch = _batch(on)
    model.zero_grad(set_to_none=True)
    aux = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
        use_cache=False,
    ).aux_loss
    aux.backward()
    assert math.isclose(metrics["aux_loss"], aux.item(), rel_tol=1e-6)
    torch.testing.assert_close(loss_on, loss_off + coef * aux.detach(), rtol=1e-6, atol=1e-6)
    aux_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    routers = _router_weights(aux_grads)
    assert len(routers) == 2 and all(g.abs().max() > 0 for g in routers.values())
    for name, g in grads_on.items():
        want = grads_off[name] + coef * aux_grads.get(name, torch.zeros_like(g))
        assert _max_rel(g, want) <= RTOL, name
    for name in routers:  # the router weights got the aux-loss gradient
        assert not torch.allclose(grads_on[name], grads_off[name])


def test_two_training_steps(tokenizer, dataset, tmp_path):
    trainer = _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path, max_steps=2)
    routers = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if n.endswith("mlp.gate.weight")
    }
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"]) and h["aux_loss"] > 0
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(routers[n], params[n].detach()) for n in routers)


def test_sequence_functions_return_the_aux_loss_only_when_asked(tokenizer):
    model, _ = _moe_policy_and_reference(tokenizer, "mixtral")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (4, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding: masked out of the load-balancing loss
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    want = model(input_ids=ids, attention_mask=attention, use_cache=False).aux_loss

    stats = dk_hf.sequence_logprobs(model, ids, attention, completion)
    assert isinstance(stats, dk.LogProbStats)  # unchanged without the keyword
    stats_aux, aux = dk_hf.sequence_logprobs(
        model, ids, attention, completion, router_aux_loss=True
    )
    torch.testing.assert_close(stats_aux.logps, stats.logps)
    torch.testing.assert_close(aux, want, rtol=1e-6, atol=0)
    assert aux.requires_grad

    def chunk_loss(stats, pairs):
        chosen, rejected = stats.logps.chunk(2, dim=0)
        return -torch.nn.functional.logsigmoid(chosen[pairs] - rejected[pairs]).sum() / 2

    assert len(dk_hf.sequence_pair_loss(model, ids, attention, completion, chunk_loss)) == 2
    *_, aux = dk_hf.sequence_pair_loss(
        model, ids, attention, completion, chunk_loss, router_aux_loss=True
    )
    torch.testing.assert_close(aux, want, rtol=1e-6, atol=0)


def test_aux_loss_of_a_dense_model_is_an_error(tokenizer):
    dense, _ = tiny_policy_and_reference(tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 6))
    with pytest.raises(TypeError, match="declares no num_experts"):
        dk_hf.sequence_logprobs(dense, ids, router_aux_loss=True)
