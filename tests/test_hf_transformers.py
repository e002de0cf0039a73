"""dpo_kernels.integrations.transformers on tiny random-weight models: our per-sequence log-probs
equal those from the model's own logits, and so do the gradients of every parameter."""

import os
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_kernels.integrations.transformers import (  # noqa: E402
    LMHeadSpec,
    lm_head_spec,
    sequence_logprobs,
    sequence_pair_loss,
    unwrap_model,
)

V, D = 89, 32
SMALL = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _config(arch):
    """(config class, kwargs) of a tiny model exercising one head / logit transform."""
    if arch == "llama":
        return transformers.LlamaConfig(**SMALL)
    if arch == "qwen2_tied":
        return transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
    if arch == "gemma2_softcap":  # a small cap so tanh is far from linear at these logits
        return transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.7)
    if arch == "mistral":
        return transformers.MistralConfig(**SMALL, sliding_window=4)
    if arch == "cohere_scale":
        return transformers.CohereConfig(**SMALL, logit_scale=3.0)
    if arch == "granite_scaling":
        return transformers.GraniteConfig(**SMALL, logits_scaling=0.25)
    if arch == "phi_bias":
        return transformers.PhiConfig(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    if arch == "minicpm3_hidden_scale":
        return transformers.MiniCPM3Config(
            **{**SMALL, "num_key_value_heads": 4},
            dim_model_base=8,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
        )
    raise KeyError(arch)


ARCHS = [
    "llama",
    "qwen2_tied",
    "gemma2_softcap",
    "mistral",
    "cohere_scale",
    "granite_scaling",
    "phi_bias",
    "minicpm3_hidden_scale",
]


def _model(arch, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = _config(arch)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # random head with larger logits, so every transform is exercised
        model.get_output_embeddings().weight.normal_(0, 0.5)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.normal_(0, 0.5)
    return model


def _batch(seed=1, batch=4, seq=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, seq), generator=g)
    attention = torch.ones_like(ids)
    attention[1, seq - 3 :] = 0  # right padding
    attention[2, seq - 1 :] = 0
    completion = torch.zeros_like(ids)
    prompt = torch.randint(1, seq // 2, (batch,), generator=g)
    for b in range(batch):
        completion[b, prompt[b] :] = 1
    completion[3] = 0  # a sequence with nothing to score
    return ids, attention, completion


def _model_logps(model, ids, attention, completion):
    """What every trainer computes: log_softmax of the model's own logits, gathered, masked."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = (attention * completion)[:, 1:].bool()
    return (per_token * mask).sum(1), mask.sum(1)


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_logps_and_every_gradient_match_the_models_logits_float64(arch):
    model = _model(arch)
    ids, attention, completion = _batch()
    upstream = torch.randn(ids.shape[0], dtype=torch.float64)

    ref, ref_count = _model_logps(model, ids, attention, completion)
    (ref * upstream).sum().backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    stats = sequence_logprobs(model, ids, attention, completion, backend="torch")
    torch.testing.assert_close(stats.logps, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.num_tokens, ref_count)
    assert stats.logps[3] == 0 and stats.num_tokens[3] == 0
    (stats.logps * upstream).sum().backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma2_softcap", "phi_bias"])
def test_fp32_backends_match_the_float64_model(arch, case):
    backend, device = case
    model64 = _model(arch)
    ids, attention, completion = _batch(seed=3)
    oracle, _ = _model_logps(model64, ids, attention, completion)
    model32 = _model(arch, torch.float32).to(device)
    got = sequence_logprobs(
        model32, ids.to(device), attention.to(device), completion.to(device), backend=backend
    ).logps
    same_dtype, _ = _model_logps(
        model32, ids.to(device), attention.to(device), completion.to(device)
    )
    err = (got.double().cpu() - oracle).abs()
    budget = (same_dtype.double().cpu() - oracle).abs() + 1e-5 * (1 + oracle.abs())
    assert (err <= budget).all(), (err, budget)


def test_stats_follow_the_scored_tokens():
    model = _model("llama")
    ids, attention, completion = _batch()
    stats = sequence_logprobs(model, ids, attention, completion, backend="torch")
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].detach()
    mask = (attention * completion)[:, 1:].bool()
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    top1 = logits.gather(-1, ids[:, 1:, None])[..., 0] >= logits.max(-1).values
    torch.testing.assert_close(stats.entropy_sum, (entropy * mask).sum(1))
    torch.testing.assert_close(stats.logits_sum, (logits.mean(-1) * mask).sum(1))
    torch.testing.assert_close(stats.top1_correct, (top1 & mask).sum(1))
    per_token = sequence_logprobs(
        model, ids, attention, completion, reduction="none", backend="torch"
    )
    assert per_token.logps.shape == (ids.shape[0], ids.shape[1] - 1)
    torch.testing.assert_close(per_token.logps.sum(1), stats.logps)


def test_default_masks_score_every_token_after_the_first():
    model = _model("llama")
    ids, _, _ = _batch()
    ones = torch.ones_like(ids)
    want, _ = _model_logps(model, ids, ones, ones)
    torch.testing.assert_close(sequence_logprobs(model, ids, backend="torch").logps, want)


def test_lm_head_spec_reads_head_and_transforms():
    spec = lm_head_spec(_model("gemma2_softcap"))
    assert isinstance(spec, LMHeadSpec) and spec.softcap == 0.7 and spec.logit_scale == 1.0
    tied = _model("qwen2_tied")
    assert lm_head_spec(tied).weight is tied.model.embed_tokens.weight
    assert lm_head_spec(_model("cohere_scale")).logit_scale == 3.0
    assert lm_head_spec(_model("granite_scaling")).logit_scale == 4.0
    assert lm_head_spec(_model("phi_bias")).bias is not None
    assert lm_head_spec(_model("minicpm3_hidden_scale")).hidden_scale == 8 / D
    llama = _model("llama")
    spec = lm_head_spec(llama)
    assert spec.weight is llama.lm_head.weight and spec.bias is None
    transforms = (spec.logit_scale, spec.softcap, spec.hidden_scale, spec.vocab_size)
    assert transforms == (1, None, 1, None)


def test_unknown_model_with_a_transform_field_is_refused():
    model = _model("llama")
    model.config.logit_scale = 2.0  # a field some models apply; llama would not: refuse to guess
    model.config.model_type = "not_a_known_type"
    with pytest.raises(NotImplementedError, match="logit_scale"):
        lm_head_spec(model)


def test_head_that_is_not_a_direct_linear_is_refused():
    config = transformers.RobertaConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        is_decoder=True,
    )
    model = transformers.RobertaForCausalLM(config)
    with pytest.raises(TypeError, match="not a direct submodule"):
        lm_head_spec(model)


def test_bad_inputs_raise_clear_errors():
    model = _model("llama")
    ids, attention, _ = _batch()
    with pytest.raises(ValueError, match="input_ids must be a"):
        sequence_logprobs(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        sequence_logprobs(model, ids, attention[:, :-1])
    with pytest.raises(ValueError, match="at least 2 positions"):
        sequence_logprobs(model, ids[:, :1])


def test_peft_lora_runs_the_adapted_backbone():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    assert unwrap_model(model) is model.get_base_model()
    ids, attention, completion = _batch()
    want, _ = _model_logps(model, ids, attention, completion)
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    got = sequence_logprobs(model, ids, attention, completion, backend="torch").logps
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    with model.disable_adapter():  # the reference of a LoRA run: adapters off
        base, _ = _model_logps(model, ids, attention, completion)
        off = sequence_logprobs(model, ids, attention, completion, backend="torch").logps
    torch.testing.assert_close(off, base, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(off, got)


def test_prompt_learning_peft_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        sequence_logprobs(model, _batch()[0])


@pytest.fixture
def process_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_ddp_wrapper_is_called_not_bypassed(process_group):
    model = _model("llama")
    ids, attention, completion = _batch()
    want, _ = _model_logps(model, ids, attention, completion)
    want.sum().backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = []
    ddp.register_forward_pre_hook(lambda *_: calls.append("ddp"))
    model.register_forward_pre_hook(lambda *_: calls.append("model"))
    got = sequence_logprobs(ddp, ids, attention, completion, backend="torch").logps
    assert calls == ["ddp", "model"]  # DDP's forward armed its reducer; hooks of the model ran
    assert "forward" not in model.__dict__  # the redirection was undone
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_dtensor_head_is_gathered(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    plain = _model("llama")
    ids, attention, completion = _batch()
    want, _ = _model_logps(plain, ids, attention, completion)
    want.sum().backward()

    sharded = _model("llama")
    mesh = init_device_mesh("cpu", (1,))
    sharded.lm_head.weight = torch.nn.Parameter(
        distribute_tensor(sharded.lm_head.weight.detach(), mesh, [Shard(0)])
    )
    got = sequence_logprobs(sharded, ids, attention, completion, backend="torch").logps
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    torch.testing.assert_close(sharded.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad)


@pytest.mark.parametrize("wrap", ["none", "ddp"])
def test_sequence_pair_loss_matches_the_models_logits(request, wrap):
    """The loss-level path through a model, bare and inside DDP (its reducer armed): the loss and
    every parameter's gradient equal those from the model's own logits."""
    model = _model("llama")
    ids, attention, completion = _batch()  # 4 sequences: pairs (0, 2) and (1, 3)
    ref = torch.tensor([-30.0, -25.0, -28.0, -20.0], dtype=torch.float64)

    def dpo(logps, pairs=slice(None)):
        c, r = logps.chunk(2)
        margin = (c - ref[:2][pairs]) - (r - ref[2:][pairs])
        return -torch.nn.functional.logsigmoid(0.1 * margin)

    want_logps, _ = _model_logps(model, ids, attention, completion)
    dpo(want_logps).mean().backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    if wrap == "ddp":
        request.getfixturevalue("process_group")
        model_in = torch.nn.parallel.DistributedDataParallel(model)
    else:
        model_in = model
    carrier, stats = sequence_pair_loss(
        model_in,
        ids,
        attention,
        completion,
        lambda st, pairs: dpo(st.logps, pairs).sum() / 2,
        backend="torch",
    )
    assert carrier is not None, "the loss-level path did not apply"
    loss = dpo(stats.logps).mean() + carrier
    torch.testing.assert_close(loss, dpo(want_logps.detach()).mean(), rtol=1e-10, atol=1e-10)
    loss.backward()
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
