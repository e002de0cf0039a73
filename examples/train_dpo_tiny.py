"""A tiny DPO run that learns something, on a CPU in a few minutes.

The task is addition with a word-level tokenizer (one token per number; built here, nothing is
downloaded): the prompt ``"12 + 7 ="`` is completed with ``" 19"``. A small random-weight Llama

1. is trained with SFT (a plain loop) on demonstrations from a careless teacher, who answers
   every problem twice, once right and once one too high: the model learns the format and the
   sum, give or take one;
2. is trained with DPO on pairs "right answer (chosen) over one too high (rejected)", by
   ``dpo_kernels.integrations.trl.DPOTrainer``, the drop-in subclass of ``trl.DPOTrainer``
   (same constructor, same ``trl.DPOConfig``), with an NLL term on the chosen answers (RPO,
   ``loss_type=["sigmoid", "sft"]``) that keeps DPO from lowering both answers;
3. is trained with DPO again by the stock ``trl.DPOTrainer``, from the same weights with the
   same data and seed, to compare peak memory and step time.

A fifth of the problems are held out of SFT and DPO, and everything printed is measured on them,
with plain logits (independently of both trainers), before and after DPO:

- reward accuracy: the fraction of held-out pairs whose chosen reward beats the rejected one,
  reward = beta * (policy log-prob - reference log-prob) of the completion, summed over its
  tokens, the reference being the model DPO starts from. Before DPO the policy *is* the
  reference, so every reward is 0; ties count half, hence 0.50;
- log-prob margin: the mean over held-out pairs of the policy's log p(chosen) - log p(rejected);
- answer accuracy: how often the most likely token after ``=`` is the right sum.

Each DPO run happens in a fresh Python process (this script with ``--worker``), so that its memory
figure is its own: the peak resident set size during ``trainer.train()`` (``VmHWM`` in
``/proc/self/status``, reset when ``train()`` starts) minus the resident size at that start, i.e.
what training adds at its worst (optimizer state, gradients, activations, log-prob buffers). Linux
only (elsewhere it reads nan). Step time is the median wall time of an optimizer step (policy
forward and backward, reference forward, update), the first step left out. Both are for this toy
model, with a 32,000-row LM head as in Llama-2 (``--vocab-size``; the tokenizer uses 56), on a
CPU, where TRL 1.16's chunked LM head scores every position (prompt and padding included; it
drops them first only on CUDA/XPU): a GPU gives other ratios.

    python examples/train_dpo_tiny.py            # full run: a few minutes on 2 CPU cores
    python examples/train_dpo_tiny.py --quick    # shortened run (tests/test_examples.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

try:
    from dpo_kernels import linear_logprobs
except ImportError:  # run from a source checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dpo_kernels import linear_logprobs
from dpo_kernels.bench.worker import PeakMeter  # the benchmark's meter: same memory figure

# Full run (the defaults) and the shortened one (--quick), both tuned on a 2-core CPU.
FULL = dict(max_operand=25, sft_steps=600, dpo_steps=120, batch_size=32)
QUICK = dict(max_operand=16, sft_steps=200, dpo_steps=30, batch_size=16)


# ----------------------------------------------------------------------------- trainer class


def dpo_trainer_class(which: str):
    """The trainer class for ``which`` in ``{"dpo_kernels", "trl"}``."""
    if which == "trl":
        import trl

        return trl.DPOTrainer
    from dpo_kernels.integrations.trl import DPOTrainer

    return DPOTrainer


# ----------------------------------------------------------------------------- tokenizer, data


def build_tokenizer(max_operand: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<pad>``, ``<eos>``, ``<unk>``, ``+``, ``=`` and one token per
    number up to ``2 * max_operand``."""
    words = ["<pad>", "<eos>", "<unk>", "+", "="] + [str(i) for i in range(2 * max_operand + 1)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()  # "12 + 7 = 19<eos>": special tokens split first
    # TRL's DPOTrainer documents padding_side="left" for its processing class (its collator pads
    # the training batches on the right itself); the evaluation below pads by hand.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_splits(max_operand: int, seed: int):
    """SFT rows (``prompt``/``completion``), DPO training pairs and held-out pairs
    (``prompt``/``chosen``/``rejected``) over problems ``a + b``, ``0 <= a, b < max_operand``.
    A fifth of the problems (at most 150) are held out of both SFT and DPO."""
    problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(problems)
    n_held = min(len(problems) // 5, 150)

    def pairs(part):
        return {
            "prompt": [f"{a} + {b} =" for a, b in part],
            "chosen": [f" {a + b}" for a, b in part],  # right
            "rejected": [f" {a + b + 1}" for a, b in part],
        }  # one too high

    train, held = pairs(problems[n_held:]), pairs(problems[:n_held])
    # The careless teacher: each training problem twice, answered right and one too high.
    sft_rows = {"prompt": train["prompt"] * 2, "completion": train["chosen"] + train["rejected"]}
    return sft_rows, train, held


def encode(tok, prompts, completions):
    """Right-padded ``prompt + completion + eos``: input ids, attention and completion masks."""
    seqs, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids = tok(p)["input_ids"]
        ids = tok(p + c + tok.eos_token)["input_ids"]
        assert ids[: len(p_ids)] == p_ids, (p, c)
        seqs.append(ids)
        masks.append([0] * len(p_ids) + [1] * (len(ids) - len(p_ids)))
    input_ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
    attention, completion = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        completion[i, : len(s)] = torch.tensor(m)
    return input_ids, attention, completion


# ----------------------------------------------------------------------------- model, SFT, eval


def build_model(tok, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A 2-layer random Llama. ``vocab_size`` rows of embedding and LM head (at least the
    tokenizer's); the rows past the tokenizer's are never used, as in real models' padded
    tables, but the LM head computes their logits like any others."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(tok)),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def sft(model, tok, rows, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Plain-loop SFT on prompt + completion (+ eos), loss on the completion tokens only. The
    log-probs come from the fused op DPO uses (``linear_logprobs``): no [tokens x vocab] logits."""
    input_ids, attention, completion = encode(tok, rows["prompt"], rows["completion"])
    labels = input_ids.masked_fill(completion == 0, -100)[:, 1:]  # hidden[:, t] -> token t + 1
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(input_ids), (batch_size,), generator=gen)
        hidden = model.model(input_ids[idx], attention_mask=attention[idx]).last_hidden_state
        logps = linear_logprobs(hidden[:, :-1], model.lm_head.weight, labels[idx])  # (batch,)
        loss = -logps.sum() / (labels[idx] != -100).sum()  # mean NLL per completion token
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            print(f"  SFT step {step:4d}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def completion_logps(model, tok, prompts, completions):
    """Summed log-prob of each completion (+ eos) after its prompt, from plain logits, and
    whether the completion's first token is the model's most likely next token."""
    input_ids, attention, completion = encode(tok, prompts, completions)
    logits = model(input_ids, attention_mask=attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    mask = completion[:, 1:].bool()
    first = mask.int().argmax(dim=1)  # the position that predicts the first completion token
    rows = torch.arange(len(prompts))
    top1 = logits[rows, first].argmax(dim=-1) == input_ids[rows, first + 1]
    return (logp * mask).sum(dim=1), top1


def evaluate(policy, reference, tok, rows, beta: float) -> dict:
    policy.eval()
    reference.eval()
    pc, top1 = completion_logps(policy, tok, rows["prompt"], rows["chosen"])
    pr, _ = completion_logps(policy, tok, rows["prompt"], rows["rejected"])
    rc, _ = completion_logps(reference, tok, rows["prompt"], rows["chosen"])
    rr, _ = completion_logps(reference, tok, rows["prompt"], rows["rejected"])
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    wins = (chosen_rewards > rejected_rewards).float()
    ties = (chosen_rewards == rejected_rewards).float()
    return {
        "reward_accuracy": (wins + 0.5 * ties).mean().item(),
        "logp_margin": (pc - pr).mean().item(),
        "answer_accuracy": top1.float().mean().item(),
    }


# ----------------------------------------------------------------------------- DPO (worker)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run_dpo(trainer_cls, init_dir: str, tok, train_rows, held_rows, opts: dict) -> dict:
    """DPO with ``trainer_cls`` (``trl.DPOTrainer`` or a drop-in subclass) from the weights in
    ``init_dir``: step times, peak memory and the held-out evaluation."""
    from trl import DPOConfig

    model = LlamaForCausalLM.from_pretrained(init_dir)
    ref_model = LlamaForCausalLM.from_pretrained(init_dir)  # frozen copy of the starting point
    # TRL turns checkpointing on by default; this model is too small to need it.
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    no_ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    rpo = opts["rpo_alpha"] > 0
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo_tiny_"),
        per_device_train_batch_size=opts["batch_size"],
        max_steps=opts["dpo_steps"],
        learning_rate=opts["dpo_lr"],
        lr_scheduler_type="constant",
        beta=opts["beta"],
        # RPO: DPO plus alpha * the NLL of the chosen answers (TRL's "sft" loss type).
        loss_type=["sigmoid", "sft"] if rpo else ["sigmoid"],
        loss_weights=[1.0, opts["rpo_alpha"]] if rpo else None,
        seed=opts["seed"],
        logging_steps=max(1, opts["dpo_steps"] // 4),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; this tiny model trains in float32
        **{no_ckpt: False},
        disable_tqdm=False,
        dataloader_num_workers=0,
        # The reference model runs at every step (TRL's default), so a timed step is a whole
        # DPO step; precompute_ref_log_probs=True would run it once over the data instead.
        precompute_ref_log_probs=False,
    )
    timer = StepTimer()
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_dict(train_rows),
        processing_class=tok,
        callbacks=[timer],
    )
    meter = PeakMeter(cuda=False)  # VmHWM reset here; the peak above the RSS at this point
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peak_mb = meter.delta_mb()
    reference = LlamaForCausalLM.from_pretrained(init_dir)
    return {
        "trainer": f"{trainer_cls.__module__}.{trainer_cls.__qualname__}",
        "median_step_ms": 1e3 * statistics.median(timer.times[1:] or timer.times),
        "train_s": train_s,
        "peak_rss_delta_mb": peak_mb,
        **evaluate(trainer.model, reference, tok, held_rows, opts["beta"]),
    }


def worker(spec_path: str) -> None:
    """``--worker SPEC``: one DPO run in this (fresh) process; writes ``SPEC.out``."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["opts"]["threads"])
    cls = dpo_trainer_class(spec["which"])
    tok = build_tokenizer(spec["opts"]["max_operand"])
    out = run_dpo(cls, spec["init_dir"], tok, spec["train_rows"], spec["held_rows"], spec["opts"])
    Path(spec_path + ".out").write_text(json.dumps(out))


def run_in_subprocess(which: str, init_dir: str, train_rows, held_rows, opts, tmp) -> dict:
    spec_path = os.path.join(tmp, f"{which}.json")
    Path(spec_path).write_text(
        json.dumps(
            dict(
                which=which,
                init_dir=init_dir,
                opts=opts,
                train_rows=train_rows,
                held_rows=held_rows,
            )
        )
    )
    env = dict(os.environ)
    # The child imports what this process imports (e.g. an uninstalled checkout of dpo_kernels).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env, check=True
    )
    return json.loads(Path(spec_path + ".out").read_text())


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shortened run (for tests)")
    p.add_argument("--max-operand", type=int, help="problems a + b with a, b below this")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--dpo-steps", type=int)
    p.add_argument("--batch-size", type=int, help="preference pairs per DPO step")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument(
        "--rpo-alpha", type=float, default=1.0, help="weight of the chosen-NLL term (0: plain DPO)"
    )
    p.add_argument("--vocab-size", type=int, default=32000, help="rows of the LM head")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip the stock-TRL run")
    p.add_argument("--json", help="also write the results here (with versions and command)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}

    opts = dict(QUICK if args.quick else FULL)
    for key in opts:
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    opts.update(
        dpo_lr=args.dpo_lr,
        beta=args.beta,
        rpo_alpha=args.rpo_alpha,
        seed=args.seed,
        threads=args.threads,
    )
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tok = build_tokenizer(opts["max_operand"])
    sft_rows, train_rows, held_rows = make_splits(opts["max_operand"], args.seed)
    n_held = len(held_rows["prompt"])
    print(
        f"{len(train_rows['prompt'])} training problems, {n_held} held out; a pair: "
        f"{train_rows['prompt'][0]!r} chosen {train_rows['chosen'][0]!r} rejected "
        f"{train_rows['rejected'][0]!r}"
    )

    model = build_model(tok, args.vocab_size, args.seed)
    print(
        f"SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama "
        f"(LM head {model.config.vocab_size} x {model.config.hidden_size}) on the careless "
        f"teacher's answers:",
        flush=True,
    )
    sft(model, tok, sft_rows, opts["sft_steps"], args.sft_lr, 64, args.seed)
    before = evaluate(model, model, tok, held_rows, args.beta)

    runs = {}
    with tempfile.TemporaryDirectory(prefix="dpo_tiny_") as tmp:
        init_dir = os.path.join(tmp, "init")
        model.save_pretrained(init_dir)
        for which in ("dpo_kernels", "trl")[: 1 if args.no_compare else 2]:
            name = "dpo_kernels.integrations.trl" if which == "dpo_kernels" else "trl"
            print(
                f"\nDPO with {name}.DPOTrainer, {opts['dpo_steps']} steps of "
                f"{opts['batch_size']} pairs (in a fresh process):",
                flush=True,
            )
            runs[which] = run_in_subprocess(which, init_dir, train_rows, held_rows, opts, tmp)
    after = {k: runs["dpo_kernels"][k] for k in before}
    total_s = time.perf_counter() - t_start

    print(f"\nHeld-out problems ({n_held})        before DPO   after DPO")
    for key, name in (
        ("reward_accuracy", "reward accuracy"),
        ("logp_margin", "log-prob margin (nats)"),
        ("answer_accuracy", "answer accuracy"),
    ):
        print(f"  {name:<30} {before[key]:10.3f}  {after[key]:10.3f}")
    print("\nDPO run                  median step   peak RSS above   held-out reward accuracy")
    print("                              (ms)     train() start (MB)")
    for which, r in runs.items():
        print(
            f"  {which:<22} {r['median_step_ms']:10.1f}   {r['peak_rss_delta_mb']:14.1f}"
            f"   {r['reward_accuracy']:14.3f}"
        )
    print(f"\ntotal {total_s:.0f} s")
    result = {"before": before, "after": after, "runs": runs, "opts": opts, "total_s": total_s}
    if args.json:
        import transformers
        import trl

        from dpo_kernels.bench.suite import device_name

        given = sys.argv[1:] if argv is None else list(argv)
        meta = {
            "command": " ".join(["python", "examples/train_dpo_tiny.py", *given]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name("cpu"),
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
        }
        Path(args.json).write_text(json.dumps({**meta, **result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
