"""The scripts in ``examples/`` run, and do what they say.

They are loaded from their files (``examples/`` is not a package) and their ``main(argv)`` is
called with shortened settings.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"dpo_kernels_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_runs_and_fits():
    ex = load_example("dpo_plain_loop")
    history = ex.main(["--steps", "12", "--batches", "2"])["history"]
    assert len(history) == 12
    assert all(math.isfinite(h["loss"]) for h in history)
    # Step 1: policy == reference, so every reward is 0 and the loss is log 2.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["rewards/margins"] == 0.0
    # The same two batches cycle: the loss on them goes down.
    first, last = [sum(h["loss"] for h in pair) / 2 for pair in (history[:2], history[-2:])]
    assert last < first - 0.05
    assert history[-1]["rewards/accuracies"] == 1.0


def test_plain_loop_matches_logits():
    """The example's shifting and masking give the DPO loss that full logits give."""
    ex = load_example("dpo_plain_loop")
    from transformers import LlamaConfig, LlamaForCausalLM

    import dpo_kernels

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=ex.PAD,
    )
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)  # different weights
    batch = ex.make_batch(3, config.vocab_size, torch.Generator().manual_seed(1))
    input_ids, attention_mask, completion_mask = batch
    assert (input_ids[:, 0] != ex.PAD).all() and attention_mask.sum() < attention_mask.numel()

    hidden, labels = ex.shifted_inputs(policy, *batch)
    with torch.no_grad():
        ref_hidden, _ = ex.shifted_inputs(reference, *batch)
    loss, out = dpo_kernels.FusedLinearDPOLoss(beta=0.1, backend="torch")(
        policy.lm_head.weight,
        hidden,
        labels,
        ref_input=ref_hidden,
        ref_weight=reference.lm_head.weight,
    )

    def logps(model):
        logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        return (lp * completion_mask[:, 1:]).sum(1)

    pol = logps(policy)
    with torch.no_grad():
        ref = logps(reference)
    c, r = (pol - ref).chunk(2)
    expected = -F.logsigmoid(0.1 * (c - r)).mean()
    torch.testing.assert_close(
        out.chosen_logps.double(), pol.chunk(2)[0].detach(), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 45 s on 2 CPU cores: SFT, then two DPO runs in fresh processes
def test_train_dpo_tiny_learns():
    ex = load_example("train_dpo_tiny")
    res = ex.main(["--quick"])
    before, after = res["before"], res["after"]
    # Before DPO the policy is its reference: all rewards 0, ties counted half.
    assert before["reward_accuracy"] == 0.5
    # Measured with --quick on seeds 0-4: 0.75 to 0.96 after DPO, margins up by 0.6 to 1.0 nats.
    # The bounds leave room for other CPUs' float rounding.
    assert after["reward_accuracy"] >= 0.65
    assert after["logp_margin"] > before["logp_margin"] + 0.3
    runs = res["runs"]
    assert set(runs) == {"dpo_kernels", "trl"}
    for r in runs.values():
        assert r["median_step_ms"] > 0 and r["train_s"] > 0
        assert math.isnan(r["peak_rss_delta_mb"]) or r["peak_rss_delta_mb"] >= 0
    # Same data, seed and loss: stock TRL ends up in the same place (within rounding drift).
    assert runs["trl"]["trainer"] == "trl.trainer.dpo_trainer.DPOTrainer"
    assert abs(runs["trl"]["reward_accuracy"] - after["reward_accuracy"]) <= 0.1
    assert abs(runs["trl"]["logp_margin"] - after["logp_margin"]) <= 0.2
