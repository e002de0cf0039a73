"""Padding-free DPO: ``DPOConfig(padding_free=True)`` in dpo_kernels.integrations.trl.DPOTrainer
packs each batch's chosen and rejected sequences into one row and runs the backbone once on it.

On tiny random Llama and Qwen2 (its second layer with a sliding window) in fp32 on the CPU, with
sequences of 4 to 67 tokens: one batch gives the loss, logged metrics and parameter gradients of
``padding_free=False`` and of stock ``trl.DPOTrainer`` (which pads), for several loss types and
for eager and sdpa attention; so do the PEFT reference, precomputed reference log-probs and the
MoE router loss. A short training run works; unsupported set-ups are errors. And the packed mode
of ``sequence_logprobs`` against its padded one.
"""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402
from dpo_kernels.integrations.transformers import (  # noqa: E402
    pack_padded,
    packed_attention_implementation,
    sequence_logprobs,
    sequence_pair_loss,
)

from .helpers import (  # noqa: E402
    assert_trl_parity,
    make_dpo_trainer,
    max_rel,
    tiny_causal_lm_and_reference,
    tiny_moe_policy_and_reference,
    tiny_tokenizer,
    tiny_varied_preference_dataset,
    trl_one_batch,
)

# The bound. Measured (CPU, fp32): loss and metrics equal padding_free=False's exactly,
# gradients within 7e-7 relative (fp32 summation order); against stock TRL, loss 5e-7, gradients
# 2e-6, metrics 4e-5 relative on rewards near zero (held with 1e-5 absolute).
RTOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return tiny_varied_preference_dataset()


def _trainer(cls, tokenizer, dataset, tmp_path, *, models=None, peft_config=None, **config):
    policy, reference = models if models is not None else tiny_causal_lm_and_reference(tokenizer)
    return make_dpo_trainer(
        cls, policy, reference, tokenizer, dataset, tmp_path, peft_config=peft_config, **config
    )


_one_batch, _rel = trl_one_batch, max_rel


def _assert_parity(ours, theirs):
    assert_trl_parity(ours, theirs, RTOL)


@pytest.fixture
def passes(monkeypatch):
    """How the drop-in calls sequence_logprobs and sequence_pair_loss (its policy pass where the
    loss is known): "packed" (one (1, N) row, no attention mask) or "padded", one entry a call;
    ``calls.fused`` says, per sequence_pair_loss call, whether the loss-level path ran."""

    class Calls(list):
        fused: list

    calls = Calls()
    calls.fused = []

    def spying(real, pair):
        def spy(model, input_ids, attention_mask=None, *args, **kwargs):
            packed = kwargs.get("cu_seqlens") is not None
            assert not packed or (input_ids.shape[0] == 1 and attention_mask is None)
            calls.append("packed" if packed else "padded")
            out = real(model, input_ids, attention_mask, *args, **kwargs)
            if pair:
                calls.fused.append(out[0] is not None)
            return out

        return spy

    monkeypatch.setattr(dk_trl, "sequence_logprobs", spying(dk_trl.sequence_logprobs, False))
    monkeypatch.setattr(dk_trl, "sequence_pair_loss", spying(dk_trl.sequence_pair_loss, True))
    return calls


# ----------------------------------------------------------------------------- one batch

LOSSES = {
    "sigmoid": {},
    "ipo": {"loss_type": ["ipo"]},  # length-normalised by the completion lengths
    "hinge": {"loss_type": ["hinge"]},
    "apo_zero": {"loss_type": ["apo_zero"]},
    "mpo_list": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "ld_dpo": {"ld_alpha": 0.4},  # per packed token, back in each sequence's order
    "wpo": {"use_weighting": True},
}
# (family, attention, loss, also against stock TRL): every case against padding_free=False of
# the drop-in (itself held to stock TRL by test_trl_trainer.py); stock TRL's own CPU pass is the
# slow one, so it joins one case of each family and attention (four loss types).
CASES = [
    ("llama", "sdpa", "sigmoid", True),
    ("llama", "sdpa", "ipo", False),
    ("llama", "sdpa", "hinge", False),
    ("llama", "sdpa", "apo_zero", False),
    ("llama", "sdpa", "mpo_list", False),
    ("llama", "sdpa", "ld_dpo", False),
    ("llama", "sdpa", "wpo", False),
    ("llama", "eager", "ld_dpo", True),
    ("qwen2", "sdpa", "sigmoid", False),
    ("qwen2", "sdpa", "mpo_list", True),
    ("qwen2", "eager", "ipo", True),
]


@pytest.mark.parametrize(
    "family,attn,loss,vs_stock", CASES, ids=["-".join(c[:3]) + "-stock" * c[3] for c in CASES]
)
def test_one_batch_matches_padded_and_stock_trl(
    family, attn, loss, vs_stock, tokenizer, dataset, tmp_path, passes
):
    config = LOSSES[loss]

    def models():
        return tiny_causal_lm_and_reference(tokenizer, family, attn)

    packed = _trainer(
        dk_trl.DPOTrainer,
        tokenizer,
        dataset,
        tmp_path / "p",
        models=models(),
        padding_free=True,
        **config,
    )
    assert packed.padding_free and packed.args.padding_free
    rows = []
    for model in (packed.ref_model, packed.model):
        model.model.register_forward_pre_hook(
            lambda m, a, k: rows.append((k["input_ids"].shape, k.get("attention_mask"))),
            with_kwargs=True,
        )
    got = _one_batch(packed)
    # Reference, then policy: each one backbone call on the 8 sequences' 248 tokens (4 to 67
    # each: the padded batch has 8 × 67 = 536) laid in order into rows of the longest, 67 (eager
    # and sdpa attend over a whole row: never more than padding's attention).
    assert passes == ["packed", "packed"]
    # The packed policy pass takes the loss-level path (no recompute) but for LD-DPO, whose
    # per-token weights need the plain op.
    assert passes.fused == ([] if loss == "ld_dpo" else [True])
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0][1] is None
    n_rows, width = rows[0][0]
    assert width == 67 and 248 <= n_rows * width < 8 * 67, rows
    assert got[1]["rewards/margins"] != 0  # the reference differs: the comparison has teeth

    padded = _trainer(
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", models=models(), **config
    )
    _assert_parity(got, _one_batch(padded))
    assert "packed" not in passes[2:]
    if vs_stock:
        stock = _trainer(
            trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", models=models(), **config
        )
        _assert_parity(got, _one_batch(stock))


# ----------------------------------------------------------------------------- reference paths


def test_precomputed_reference_logps_are_packed_and_match(tokenizer, dataset, tmp_path, passes):
    config = {"precompute_ref_log_probs": True}
    ours = _trainer(
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", padding_free=True, **config
    )
    assert passes == ["packed", "packed"]  # the dataset's two batches of 4 pairs
    stock = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", **config)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[column]),
            torch.tensor(stock.train_dataset[column]),
            rtol=RTOL,
            atol=1e-5,
        )
    _assert_parity(_one_batch(ours), _one_batch(stock))
    assert passes == ["packed"] * 3  # and the policy only


def test_peft_reference_with_adapters_disabled_is_packed(tokenizer, dataset, tmp_path, passes):
    peft = pytest.importorskip("peft")

    def lora():  # random B so the adapted policy differs from the base (the reference)
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )

    ours = _trainer(
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", peft_config=lora(), padding_free=True
    )
    got = _one_batch(ours)
    assert passes == ["packed", "packed"]
    assert got[1]["rewards/margins"] != 0 and all("lora_" in n for n in got[2])
    stock = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", peft_config=lora())
    _assert_parity(got, _one_batch(stock))


def test_moe_router_aux_loss_is_packed_and_matches(tokenizer, dataset, tmp_path, passes):
    """Every packed token is a real one: the load-balancing loss over them is the padded
    batch's over its unpadded tokens."""
    kw = dict(models=tiny_moe_policy_and_reference(tokenizer), padding_free=True)
    got = _one_batch(_trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", **kw))
    assert passes == ["packed", "packed"]
    assert got[1]["aux_loss"] > 0
    stock = _trainer(
        trl.DPOTrainer,
        tokenizer,
        dataset,
        tmp_path / "s",
        models=tiny_moe_policy_and_reference(tokenizer),
    )
    _assert_parity(got, _one_batch(stock))


# ----------------------------------------------------------------------------- training


def test_a_short_training_run_and_evaluation(tokenizer, dataset, tmp_path):
    kw = dict(per_device_eval_batch_size=3, beta=0.5)
    trainer = _trainer(
        dk_trl.DPOTrainer,
        tokenizer,
        dataset,
        tmp_path / "o",
        padding_free=True,
        max_steps=4,
        learning_rate=5e-3,
        **kw,
    )
    # Evaluation in batches of 3, 3 and 2 pairs: the loss is averaged with the padded batches'
    # weights (2 × pairs), as stock TRL does.
    stock = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", **kw)
    want, got = stock.evaluate(dataset), trainer.evaluate(dataset)
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy"):
        assert math.isclose(got[key], want[key], rel_tol=RTOL, abs_tol=1e-5), key

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    # Two alternating batches: the second visit of each has a lower loss than its first.
    assert logs[2]["loss"] < logs[0]["loss"] and logs[3]["loss"] < logs[1]["loss"]
    assert {"rewards/accuracies", "logps/chosen", "entropy", "num_tokens"} <= logs[-1].keys()
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("attn", ["flex_attention", "dk_test_custom_attention"])
def test_an_unsupported_attention_implementation_is_refused(attn, tokenizer, dataset, tmp_path):
    """Refused at construction: flex attention, and a registered custom kernel (here plain sdpa
    with no mask function registered, so transformers would hand it no mask at all)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transformers.AttentionInterface.register("dk_test_custom_attention", sdpa_attention_forward)
    models = tiny_causal_lm_and_reference(tokenizer, attn_implementation=attn)
    with pytest.raises(NotImplementedError, match=f"attn_implementation='{attn}'"):
        _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path, models=models, padding_free=True)
    _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path, models=models)  # padded: fine


def test_a_model_whose_masks_ignore_packing_is_an_error(tokenizer, dataset, tmp_path):
    """BLOOM (ALiBi) builds its causal mask without the position ids, so a packed row would
    attend across its sequences: the first packed call sees that in its attention layers."""
    from .helpers import perturbed_copy

    torch.manual_seed(0)
    config = transformers.BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        n_layer=2,
        n_head=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    policy = transformers.BloomForCausalLM(config).float()
    trainer = _trainer(
        dk_trl.DPOTrainer,
        tokenizer,
        dataset,
        tmp_path,
        models=(policy, perturbed_copy(policy)),
        padding_free=True,
    )
    with pytest.raises(NotImplementedError, match=r"self_attention.*joins tokens of different"):
        _one_batch(trainer)


def test_recurrent_layers_are_refused(tokenizer):
    policy, _ = tiny_causal_lm_and_reference(tokenizer)
    policy.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(NotImplementedError, match=r"layer types \['linear_attention'\]"):
        packed_attention_implementation(policy)


# ----------------------------------------------------------------------------- sequence_logprobs


def _padded_batch(vocab, seed=0):
    """Six sequences of 1 to 57 tokens, right-padded, with random completion masks."""
    g = torch.Generator().manual_seed(seed)
    lens = [1, 45, 3, 20, 2, 57]
    ids = torch.randint(0, vocab, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    completion = (torch.rand(ids.shape, generator=g) < 0.7).long() * mask
    return ids, mask, completion


@pytest.mark.parametrize(
    "family,attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("qwen2", "sdpa")]
)
def test_packed_sequence_logprobs_match_padded(family, attn, tokenizer):
    model, _ = tiny_causal_lm_and_reference(tokenizer, family, attn)
    ids, mask, completion = _padded_batch(len(tokenizer))
    params = [p for p in model.parameters()]
    upstream = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(1))

    padded = sequence_logprobs(model, ids, mask, completion)
    want = torch.autograd.grad((padded.logps * upstream).sum(), params)
    cu, packed_ids, packed_completion = pack_padded(mask, ids, completion)
    assert packed_ids.shape == (1, int(mask.sum())) and cu.tolist()[-1] == int(mask.sum())
    packed = sequence_logprobs(model, packed_ids, None, packed_completion, cu_seqlens=cu)
    got = torch.autograd.grad((packed.logps * upstream).sum(), params)
    for field, a, b in zip(packed._fields, packed, padded):
        assert a.shape == b.shape and _rel(a.double(), b.double()) <= 1e-5, field
    assert padded.num_tokens[0] == 0 and padded.logps[1] != 0  # a one-token sequence scores none
    for p, a, b in zip(model.named_parameters(), got, want):
        assert _rel(a, b) <= RTOL, p[0]

    # Per token: shaped like input_ids (here (N,)), entry t for token t; the padded call's
    # (B, T − 1) entries for tokens 1..T-1 once scattered back.
    per_token = sequence_logprobs(
        model, packed_ids[0], None, packed_completion[0], cu_seqlens=cu, reduction="none"
    )
    want_tok = sequence_logprobs(model, ids, mask, completion, reduction="none")
    for field, a, b in zip(per_token._fields, per_token, want_tok):
        assert a.shape == packed_ids[0].shape, field
        back = b.new_zeros(ids.shape).masked_scatter(mask.bool(), a)[:, 1:]
        assert _rel(back.double(), b.double()) <= 1e-5, field
    assert (per_token.num_tokens[cu[:-1]] == 0).all()  # a sequence's first token: never scored


def test_packed_sequence_logprobs_refuse_bad_input(tokenizer):
    model, _ = tiny_causal_lm_and_reference(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 9))
    cu = torch.tensor([0, 4, 9])
    bad = [
        (dict(attention_mask=torch.ones_like(ids)), ValueError, "attention_mask must be None"),
        (dict(cu_seqlens=torch.tensor([0, 4, 8])), ValueError, "rise from 0 to the row's"),
        (dict(cu_seqlens=torch.tensor([0.0, 9.0])), TypeError, "integer tensor"),
        (dict(position_ids=torch.arange(9)[None]), ValueError, "position_ids must not be"),
        (dict(use_cache=True), ValueError, "use_cache=True"),
        (dict(token_type_ids=torch.zeros_like(ids)), NotImplementedError, "token_type_ids"),
    ]
    for extra, error, match in bad:
        kw = {"attention_mask": None, "cu_seqlens": cu, **extra}
        with pytest.raises(error, match=match):
            sequence_logprobs(model, ids, **kw)
    with pytest.raises(ValueError, match=r"one packed row \(N,\) or \(1, N\)"):
        sequence_logprobs(model, ids.expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="attention_mask must be None"):
        sequence_pair_loss(
            model, ids, torch.ones_like(ids), None, lambda st, pairs: st.logps.sum(), cu_seqlens=cu
        )


def test_packed_sequence_pair_loss_matches_padded(tokenizer):
    """sequence_pair_loss on the packed row: the loss-level path runs (a carrier comes back) and
    its gradients are the padded call's."""
    model, _ = tiny_causal_lm_and_reference(tokenizer)
    ids, mask, completion = _padded_batch(len(tokenizer))
    params = list(model.parameters())
    half = ids.shape[0] // 2

    def chunk_loss(stats, pairs):
        n = stats.logps.shape[0] // 2
        margin = stats.logps[:n] - stats.logps[n:]
        return -torch.nn.functional.logsigmoid(0.1 * margin).sum() / half

    grads = []
    for packed in (False, True):
        if packed:
            cu, p_ids, p_completion = pack_padded(mask, ids, completion)
            carrier, stats = sequence_pair_loss(
                model, p_ids, None, p_completion, chunk_loss, cu_seqlens=cu
            )
        else:
            carrier, stats = sequence_pair_loss(model, ids, mask, completion, chunk_loss)
        assert carrier is not None  # the loss-level path, packed or not
        grads.append((stats, torch.autograd.grad(carrier, params)))
    (ps, pg), (qs, qg) = grads
    for field, a, b in zip(ps._fields, qs, ps):
        assert _rel(a.double(), b.double()) <= 1e-5, field
    for (name, _), a, b in zip(model.named_parameters(), qg, pg):
        assert _rel(a, b) <= RTOL, name


def _varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """A stand-in for flash attention's varlen kernel on the CPU: causal attention within each
    sequence of ``cu_seq_lens_q``, as transformers' flash wrapper receives them."""
    assert attention_mask is None and query.shape[0] == 1
    cu = kw["cu_seq_lens_q"].tolist()
    assert kw["max_length_q"] == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
            )
            for a, b in zip(cu[:-1], cu[1:])
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def test_flash_attention_path_on_a_cpu_stand_in(tokenizer, monkeypatch):
    """The flash-attention route without a GPU: a varlen stand-in registered as the model's
    attention (with flash attention's mask function) gets the sequence offsets and maximum
    length and no mask, passes the first-call check, and gives the padded result."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from dpo_kernels.integrations import transformers as dk_hf

    transformers.AttentionInterface.register("dk_test_varlen", _varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("dk_test_varlen", flash_attention_mask)
    real = dk_hf._is_flash
    monkeypatch.setattr(dk_hf, "_is_flash", lambda impl: impl == "dk_test_varlen" or real(impl))
    model, _ = tiny_causal_lm_and_reference(tokenizer)  # (no sliding window: the stand-in has none)
    ids, mask, completion = _padded_batch(len(tokenizer))
    padded = sequence_logprobs(model, ids, mask, completion)
    model.set_attn_implementation("dk_test_varlen")
    assert packed_attention_implementation(model) == "dk_test_varlen"
    cu, packed_ids, packed_completion = pack_padded(mask, ids, completion)
    packed = sequence_logprobs(model, packed_ids, None, packed_completion, cu_seqlens=cu)
    assert "dk_test_varlen" in dk_hf._VERIFIED[model]
    for field, a, b in zip(packed._fields, packed, padded):
        assert _rel(a.double(), b.double()) <= 1e-5, field


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA device")
def test_packed_flash_attention_matches_padded(tokenizer):
    pytest.importorskip("flash_attn")
    model, _ = tiny_causal_lm_and_reference(tokenizer)
    model = model.to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    ids, mask, completion = (t.cuda() for t in _padded_batch(len(tokenizer)))
    padded = sequence_logprobs(model, ids, mask, completion)
    cu, packed_ids, packed_completion = pack_padded(mask, ids, completion)
    packed = sequence_logprobs(model, packed_ids, None, packed_completion, cu_seqlens=cu)
    # the same varlen kernel per sequence either way; bf16 hidden states round the same
    torch.testing.assert_close(packed.logps, padded.logps, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masked_attention_packs_into_rows_of_the_longest_sequence(attn, tokenizer):
    """eager / sdpa: lengths 5, 3, 2, 6, 1 in order go into rows of 6 as [5] [3 2] [6] [1]
    (a new row when the next does not fit; a row's tail continues its last sequence), so the
    masked attention costs at most padding's; the results are the padded call's."""
    model, _ = tiny_causal_lm_and_reference(tokenizer, "llama", attn)
    lengths = [5, 3, 2, 6, 1]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, len(tokenizer), (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    shapes = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, k: shapes.append((tuple(k["input_ids"].shape), k["position_ids"].tolist())),
        with_kwargs=True,
    )
    packed = sequence_logprobs(model, ids, None, None, cu_seqlens=cu)
    hook.remove()
    ((shape, positions),) = shapes
    assert shape == (4, 6)
    assert positions == [
        [0, 1, 2, 3, 4, 5],  # 5 tokens and a tail of 1
        [0, 1, 2, 0, 1, 2],  # 3 and 2, a tail of 1
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],  # 1 token and a tail of 5
    ]
    padded_ids = torch.zeros(len(lengths), 6, dtype=ids.dtype)
    mask = torch.zeros(len(lengths), 6, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        padded_ids[i, : b - a] = ids[a:b]
        mask[i, : b - a] = 1
    padded = sequence_logprobs(model, padded_ids, mask, None)
    for field, a, b in zip(packed._fields, packed, padded):
        assert _rel(a.double(), b.double()) <= 1e-5, field
