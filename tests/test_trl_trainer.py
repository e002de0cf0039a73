"""dpo_kernels.integrations.trl.DPOTrainer against stock trl.DPOTrainer on a tiny random Llama
(fp32, CPU): one batch gives the same loss, logged metrics and parameter gradients; training,
precomputed reference log-probs and LoRA runs work."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from dpo_kernels.integrations import trl as dk_trl  # noqa: E402

from .helpers import (  # noqa: E402
    assert_trl_parity,
    make_dpo_trainer,
    tiny_policy_and_reference,
    tiny_preference_dataset,
    tiny_tokenizer,
    trl_one_batch,
)

RTOL = 1e-4  # the bound; measured differences are ~1e-6 (fp32 summation order)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return tiny_preference_dataset()


def _trainer(cls, tokenizer, dataset, tmp_path, *, ref=True, peft_config=None, **config):
    policy, reference = tiny_policy_and_reference(tokenizer)
    reference = reference if ref else None
    return make_dpo_trainer(
        cls, policy, reference, tokenizer, dataset, tmp_path, peft_config=peft_config, **config
    )


_one_batch = trl_one_batch


def _assert_parity(ours, stock):
    assert_trl_parity(ours, stock, RTOL)


CONFIGS = {
    "sigmoid": {},
    "hinge": {"loss_type": ["hinge"]},
    "ipo": {"loss_type": ["ipo"]},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "aot": {"loss_type": ["aot"], "label_smoothing": 0.05},
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
    "discopop": {"loss_type": ["discopop"]},
    "mpo_list": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    # one loss call: TRL smooths robust and not sigmoid
    "sigmoid_robust": {
        "loss_type": ["sigmoid", "robust"],
        "loss_weights": [0.6, 0.4],
        "label_smoothing": 0.1,
    },
    "js_divergence": {"f_divergence_type": "js_divergence", "beta": 0.5},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "wpo": {"use_weighting": True},
    "ld_dpo": {"ld_alpha": 0.4},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_batch_matches_stock_trl(name, tokenizer, dataset, tmp_path, monkeypatch):
    config = CONFIGS[name]
    stock = _one_batch(_trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", **config))
    calls = []
    real, real_pair = dk_trl.sequence_logprobs, dk_trl.sequence_pair_loss
    monkeypatch.setattr(
        dk_trl, "sequence_logprobs", lambda *a, **k: calls.append(k["reduction"]) or real(*a, **k)
    )

    def pair(*a, **k):
        carrier, stats = real_pair(*a, **k)
        calls.append("loss-level path" if carrier is not None else "plain op")
        return carrier, stats

    monkeypatch.setattr(dk_trl, "sequence_pair_loss", pair)
    ours = _one_batch(_trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", **config))
    # The reference first, one fused pass; then the policy through the loss-level path (its
    # loss known: no recompute), or per token for LD-DPO.
    assert calls == (["none"] * 2 if "ld_alpha" in config else ["sum", "loss-level path"])
    _assert_parity(ours, stock)
    assert ours[1]["rewards/margins"] != 0  # the reference differs: the comparison has teeth


def test_precomputed_reference_logps_match(tokenizer, dataset, tmp_path):
    config = {"precompute_ref_log_probs": True}
    stock = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", **config)
    ours = _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", **config)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[column]),
            torch.tensor(stock.train_dataset[column]),
            rtol=RTOL,
            atol=1e-5,
        )
    _assert_parity(_one_batch(ours), _one_batch(stock))


def test_lora_matches_stock_and_trains(tokenizer, dataset, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():  # random B so the adapted policy differs from the base (the reference)
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )

    stock = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", peft_config=lora())
    ours = _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", peft_config=lora())
    got = _one_batch(ours)
    _assert_parity(got, _one_batch(stock))
    assert got[1]["rewards/margins"] != 0
    assert all("lora_" in n for n in got[2])  # only the adapters train

    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    ours.args.max_steps = 2
    ours.train()
    after = dict(ours.model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed and all("lora_" in n for n in changed)


def test_a_few_optimizer_steps_learn_the_batch(tokenizer, dataset, tmp_path):
    trainer = _trainer(
        dk_trl.DPOTrainer, tokenizer, dataset, tmp_path, max_steps=6, learning_rate=5e-3, beta=0.5
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert all(math.isfinite(h["loss"]) for h in logs)
    # Two alternating batches of 4: after 6 steps each has been seen 3 times and the DPO loss
    # has gone down from log 2 at the first visit.
    assert logs[-1]["loss"] < logs[1]["loss"] < math.log(2) + 0.05
    logged = {"rewards/accuracies", "logps/chosen", "entropy", "mean_token_accuracy"}
    assert logged <= logs[-1].keys()


def test_evaluate_matches_stock_trl(tokenizer, dataset, tmp_path):
    results = []
    for cls, sub in ((trl.DPOTrainer, "s"), (dk_trl.DPOTrainer, "o")):
        trainer = _trainer(cls, tokenizer, dataset, tmp_path / sub, per_device_eval_batch_size=4)
        results.append(trainer.evaluate(dataset))
    ours, stock = results[1], results[0]
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy"):
        assert math.isclose(ours[key], stock[key], rel_tol=RTOL, abs_tol=1e-5), key


def test_sigmoid_label_smoothing_follows_trl_with_a_warning(tokenizer, dataset, tmp_path):
    policy, reference = tiny_policy_and_reference(tokenizer)
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, label_smoothing=0.2
    )
    with pytest.warns(UserWarning, match="ignores label_smoothing"):
        dk_trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def _import_again():
    """Run dpo_kernels/integrations/trl.py once more as a new module (its import-time checks),
    leaving the imported one alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dpo_kernels.integrations._trl_again", dk_trl.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["1.17.0", "1.17.0rc1", "1.15.2", "2.0.0"])
def test_unsupported_trl_versions_are_refused(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(ImportError, match=rf"supports trl>=1.16,<1.17 .*found trl {version}\."):
        _import_again()


@pytest.mark.parametrize("version", ["1.16.0", "1.16.2", "1.16.3.dev0"])
def test_supported_trl_versions_import(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    assert issubclass(_import_again().DPOTrainer, trl.DPOTrainer)


def test_missing_trl_is_an_import_error_naming_the_range(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(ImportError, match=r"needs TRL: pip install 'trl>=1.16,<1.17'"):
        _import_again()


def test_loss_options_built_once_with_trl_quirks(tokenizer, dataset, tmp_path):
    """The options come from the DPOConfig at construction, TRL-flavoured: sigmoid drops the
    label smoothing that robust keeps (test_one_batch_matches_stock_trl["sigmoid_robust"])."""
    import dataclasses

    from dpo_kernels.losses import PreferenceOptions

    trainer = _trainer(
        dk_trl.DPOTrainer,
        tokenizer,
        dataset,
        tmp_path,
        loss_type=["sigmoid", "robust"],
        loss_weights=[0.6, 0.4],
        label_smoothing=0.1,
        beta=0.3,
    )
    assert trainer.loss_options == PreferenceOptions(
        loss_type=("sigmoid", "robust"),
        loss_weights=(0.6, 0.4),
        label_smoothing=0.1,
        beta=0.3,
        discopop_tau=trainer.args.discopop_tau,
        trl=True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.loss_options.beta = 1.0


def test_bf16_mixed_precision_autocasts_the_passes(tokenizer, dataset, tmp_path):
    """``bf16=True``: accelerate autocasts the prepared model's forward; the drop-in runs the
    backbone in that forward's place, so it must enter the autocast itself. The projections
    then run in bf16, as in stock TRL."""
    dtypes = []

    def record(trainer):
        # What Trainer.train() / evaluate() do first: accelerate wraps the model's forward in
        # the autocast of its mixed precision.
        trainer.model = trainer.accelerator.prepare_model(trainer.model)
        for name, module in trainer.model.named_modules():
            if name.endswith("q_proj"):
                module.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))

    stock_trainer = _trainer(trl.DPOTrainer, tokenizer, dataset, tmp_path / "s", bf16=True)
    record(stock_trainer)
    stock = _one_batch(stock_trainer)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # what stock TRL does
    dtypes.clear()
    ours_trainer = _trainer(dk_trl.DPOTrainer, tokenizer, dataset, tmp_path / "o", bf16=True)
    record(ours_trainer)
    ours = _one_batch(ours_trainer)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    # Both ran their projections in bf16 (above; without the autocast ours ran them in fp32).
    # The heads differ in rounding (TRL rounds the logits to bf16, ours keeps them fp32): the
    # losses agree to bf16's resolution, not fp32's.
    assert abs(ours[0].item() - stock[0].item()) <= 2**-8 * abs(stock[0].item()), (ours, stock)
