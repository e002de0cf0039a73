"""DPO in a hand-written PyTorch loop with ``dpo_kernels.FusedLinearDPOLoss``.

For users whose trainer is not TRL: run the backbone yourself, hand the last hidden states and
the LM-head weight to the loss module, and the ``[tokens x vocab]`` logits are never built. The
model is a tiny random Llama and the preference pairs are random tokens (a few fixed batches,
cycled, so the loss has something to fit), so the point is the plumbing: shapes, shifting,
masking, the reference model. ``train_dpo_tiny.py`` trains on a task with a rule to learn.

    python examples/dpo_plain_loop.py            # a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from dpo_kernels import FusedLinearDPOLoss
except ImportError:  # run from a source checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dpo_kernels import FusedLinearDPOLoss

PAD = 0  # token id used for right padding


def make_batch(n_pairs: int, vocab: int, gen: torch.Generator):
    """``n_pairs`` random pairs as one ``(2 * n_pairs, T)`` batch, chosen half first.

    Each row is prompt + completion + right padding; a pair's two rows share the prompt.
    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on completion tokens).
    """
    rows, completion = [], []
    prompts = [
        torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        for _ in range(n_pairs)
    ]
    for _half in ("chosen", "rejected"):
        for prompt in prompts:
            answer = torch.randint(
                1, vocab, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen
            )
            rows.append(torch.cat([prompt, answer]))
            completion.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(answer)]))
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), PAD)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, completion)):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        completion_mask[i, : len(r)] = c
    return input_ids, attention_mask, completion_mask


def shifted_inputs(model, input_ids, attention_mask, completion_mask):
    """Hidden states and labels aligned for the loss: ``hidden[:, t]`` predicts ``labels[:, t]``."""
    hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)  # prompt, padding
    return hidden[:, :-1], labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per batch")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen initial copy

    loss_fn = FusedLinearDPOLoss(beta=0.1)  # sigmoid DPO; RPO: compute_nll_loss=True, alpha=...
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    batches = [make_batch(args.pairs, config.vocab_size, gen) for _ in range(args.batches)]
    history = []
    for step in range(1, args.steps + 1):
        batch = batches[(step - 1) % len(batches)]
        hidden, labels = shifted_inputs(policy, *batch)
        with torch.no_grad():  # the reference needs no autograd
            ref_hidden, _ = shifted_inputs(reference, *batch)
        # Liger's return: loss, (chosen_logps, rejected_logps, ..., chosen_rewards,
        # rejected_rewards), the tuple also carrying ``.metrics``.
        loss, outputs = loss_fn(
            policy.lm_head.weight,
            hidden,
            labels,
            policy.lm_head.bias,
            ref_input=ref_hidden,
            ref_weight=reference.lm_head.weight,
            ref_bias=reference.lm_head.bias,
        )
        chosen_logps, rejected_logps = outputs[:2]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        m = {k: v.item() for k, v in outputs.metrics.items()}  # detached 0-d tensors, TRL's names
        history.append({"loss": loss.item(), **m})
        print(
            f"step {step:3d}  loss {loss.item():.4f}  "
            f"rewards/chosen {m['rewards/chosen']:+.3f}  "
            f"rewards/rejected {m['rewards/rejected']:+.3f}  "
            f"rewards/accuracies {m['rewards/accuracies']:.2f}  "
            f"logps/chosen {chosen_logps.mean().item():.1f}  "
            f"logps/rejected {rejected_logps.mean().item():.1f}"
        )
    return {"history": history}


if __name__ == "__main__":
    main()
