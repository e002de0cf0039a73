"""The ``trainer_step`` workload: one optimizer step of a whole DPO trainer on a small real model.

The model is a Llama (``transformers.LlamaForCausalLM``, random weights from a config, nothing
downloaded) with a small backbone — ``layers`` decoder layers (default 2) of ``intermediate``
MLP width (default 2·D), head dimension 128 where D allows, 4 query heads per key/value head —
and the preset's head: vocab ``V`` always real; hidden ``D`` real unless the row says it was
reduced (``real_hidden``, ``note``): a 2-core CPU has neither the memory nor the time for a
D = 4096 model with its 128k-row embedding and head under AdamW. The reference model is a
separate frozen copy of the policy with noise on its weights but the input embedding (as after
some training: the loss is not log 2 for every method, so the loss check has teeth).

The batch is ``pairs`` preference pairs of random token ids whose prompt and chosen/rejected
completion lengths are drawn from skewed (log-normal) distributions with a fixed seed
(:func:`draw_lengths`), the longest sequence exactly ``seq_len`` tokens, so that right padding
to it wastes a third to a half of the batch (``pad_fraction``). The token ids go through a
word-level tokenizer over the whole vocabulary and the trainer's own dataset preparation and
collator, so every method sees what a user's batch would be.

Methods (each in its own process, :mod:`dpo_kernels.bench.worker`):

- ``dpo_kernels``: :class:`dpo_kernels.integrations.trl.DPOTrainer`, padded batches (the policy
  pass on the loss-level fast path of :mod:`dpo_kernels.loss_path` where it applies);
- ``dpo_kernels_recompute``: the same with ``DPO_KERNELS_LOSS_PATH=recompute`` (the plain op:
  recompute in the backward);
- ``dpo_kernels_packed``: the same trainer with ``DPOConfig(padding_free=True)``: each batch's
  sequences packed into one row, no padding (its policy pass on the loss-level path too);
- ``trl``: stock ``trl.DPOTrainer`` (padded; its own chunked fused LM head, as a user gets it).

Every method gets the same ``trl.DPOConfig``: TRL's defaults (sigmoid loss, beta 0.1, AdamW
``adamw_torch_fused``, ``max_grad_norm`` 1.0, gradient checkpointing on) except: fp32 on a CPU
(``bf16=False``; a bf16 or fp16 run is TRL's mixed precision, ``bf16=True`` / ``fp16=True``
autocast over fp32 weights), no truncation (``max_length=None``), nothing logged or saved, and
learning rate 0. At rate 0 every timed step starts from the same weights, so the steps and their
losses are identical, and comparable across methods whatever number of steps each ran; AdamW
does the same arithmetic (moments, bias correction, the update) as at any other rate.

The first step is ``trainer.train()`` with ``max_steps=1``: the set-up a user gets (gradient
checkpointing, optimizer and scheduler) and one step, on the same batch. Each later step is the
body of the Trainer's loop for one optimizer step: ``training_step`` (forward, backward),
gradient clipping, ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad()``. With the
worker's one warm-up step, the timed steps are those, and a step's peak memory is what it adds
to what lives between steps (weights, the reference, AdamW's moments): the gradients (freed by
``zero_grad``), activations and the LM head's buffers.

Work (:func:`dpo_kernels.bench.methods.work`): the LM head's useful FLOPs only, as for
``dpo_step``: 8·Nv·D·V over the ``Nv`` scored (completion) tokens, the same for every method.
The backbone, attention, embedding, gradient clipping and optimizer are not counted, nor what a
method does beyond the useful head work (stock TRL's fused head on a CPU scores every position,
prompt and padding included; packing runs the backbone on ``real_tokens`` instead of
``tokens``), so the rate is the useful head work over a whole step's time.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import warnings

import torch

from .methods import TRAINER_METHODS, loss_path_env

#: Pad fraction the drawn lengths must give (the issue's "a third to a half").
PAD_RANGE = (1 / 3, 1 / 2)
#: Relative medians and log-normal spreads of prompt and completion lengths before scaling.
PROMPT_MEDIAN, PROMPT_SIGMA = 0.3, 0.8
COMPLETION_MEDIAN, COMPLETION_SIGMA = 0.45, 0.7
SPECIALS = ("<pad>", "<eos>", "<unk>")
REF_NOISE = 0.1


# ----------------------------------------------------------------------------- the batch


def draw_lengths(pairs: int, seq_len: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of ``pairs`` pairs (completions include the
    EOS TRL appends): log-normal draws scaled so that the longest sequence (prompt +
    completion) is exactly ``seq_len``, prompts >= 1 and completions >= 2 tokens. Draws repeat
    (deterministically from ``seed``) until the pad fraction of the padded batch is in
    :data:`PAD_RANGE`."""
    if pairs < 1 or seq_len < 8:
        raise ValueError(f"trainer_step needs pairs >= 1 and seq_len >= 8, got {pairs}, {seq_len}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        p = (torch.randn(pairs, generator=g) * PROMPT_SIGMA + math.log(PROMPT_MEDIAN)).exp()
        c = torch.randn(2, pairs, generator=g) * COMPLETION_SIGMA + math.log(COMPLETION_MEDIAN)
        c = c.exp()
        scale = seq_len / float((p + c.max(dim=0).values).max())
        prompt = (p * scale).round().clamp(1, seq_len - 2).long()
        comp = (c * scale).round().clamp(min=2).long()
        comp = torch.minimum(comp, seq_len - prompt)  # no sequence longer than seq_len
        total = prompt + comp  # (2, pairs)
        k = int(total.argmax())
        comp.view(-1)[k] += seq_len - int(total.view(-1)[k])  # the longest: exactly seq_len
        lens = [(int(prompt[i]), int(comp[0, i]), int(comp[1, i])) for i in range(pairs)]
        if PAD_RANGE[0] <= batch_counts(lens, seq_len)["pad_fraction"] <= PAD_RANGE[1]:
            return lens
    raise ValueError(
        f"trainer_step: no draw of {pairs} pairs at seq_len {seq_len} pads a third to a half "
        "of the batch; use more pairs"
    )


def batch_counts(lens: list[tuple[int, int, int]], seq_len: int) -> dict:
    """Token counts of the padded batch: ``tokens`` (2·pairs·seq_len, what padding runs),
    ``real_tokens`` (what packing runs), ``pad_fraction``, ``scored_tokens`` (completion
    tokens: the ones the loss scores) and ``prompt_tokens``."""
    real = sum(2 * p + c + r for p, c, r in lens)
    tokens = 2 * len(lens) * seq_len
    return dict(
        tokens=tokens,
        real_tokens=real,
        pad_fraction=1 - real / tokens,
        scored_tokens=sum(c + r for _, c, r in lens),
        prompt_tokens=sum(2 * p for p, _, _ in lens),
    )


def token_ids(lens, vocab: int, seed: int = 0) -> list[dict]:
    """Random ids (never a special token) for :func:`draw_lengths`' lengths: one dict per pair
    with ``prompt``, ``chosen``, ``rejected`` id lists (the completions without their EOS)."""
    g = torch.Generator().manual_seed(seed + 1)
    lo = len(SPECIALS)

    def ids(n):
        return torch.randint(lo, vocab, (n,), generator=g).tolist()

    return [dict(prompt=ids(p), chosen=ids(c - 1), rejected=ids(r - 1)) for p, c, r in lens]


def _tokenizer(vocab: int):
    """A word-level tokenizer over the whole vocabulary: ``<pad> <eos> <unk>``, then ``t3`` ...
    ``t{V-1}``, so token ``i`` is the word ``t{i}``."""
    import tokenizers
    import transformers

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update((f"t{i}", i) for i in range(len(SPECIALS), vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _dataset(pairs_ids):
    """The preference dataset whose tokenization gives ``pairs_ids`` (TRL appends the EOS)."""
    import datasets

    def text(ids):
        return "".join(f" t{i}" for i in ids)  # completions start with a space, as in TRL's data

    return datasets.Dataset.from_list(
        [
            dict(
                prompt=text(x["prompt"]).lstrip(),
                chosen=text(x["chosen"]),
                rejected=text(x["rejected"]),
            )
            for x in pairs_ids
        ]
    )


# ----------------------------------------------------------------------------- the model


def llama_config(hidden: int, vocab: int, layers: int, intermediate: int, seq_len: int):
    """A Llama config: ``layers`` decoder layers, head dimension 128 where ``hidden`` is a
    multiple of 512 (else 4 heads), 4 query heads per key/value head where the heads allow."""
    import transformers

    heads = hidden // 128 if hidden % 512 == 0 else 4
    if hidden % heads:
        raise ValueError(f"trainer_step: hidden {hidden} must be a multiple of 4")
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def build_models(config, dtype: torch.dtype, device: str, seed: int = 0):
    """(policy, reference): random weights from ``config`` (seeded), the reference a frozen
    copy with noise of :data:`REF_NOISE` relative size on every weight but the input
    embedding (decoder layers, final norm, LM head)."""
    import copy

    import transformers

    torch.manual_seed(seed)
    policy = transformers.LlamaForCausalLM(config)
    policy.set_attn_implementation("sdpa")
    policy = policy.to(device=device, dtype=dtype)
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name == "model.embed_tokens.weight":
                continue
            noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
            p.add_(noise.mul_(REF_NOISE * p.float().std().clamp(min=1e-3)))
    reference.requires_grad_(False).eval()
    return policy, reference


# ----------------------------------------------------------------------------- the trainers


def _config(spec: dict, out_dir: str, padding_free: bool):
    import trl

    cpu = spec["device"] == "cpu"
    return trl.DPOConfig(
        output_dir=out_dir,
        report_to="none",
        use_cpu=cpu,
        bf16=spec["dtype"] == "bfloat16",
        fp16=spec["dtype"] == "float16",
        per_device_train_batch_size=spec["pairs"],
        learning_rate=0.0,
        max_length=None,
        max_steps=1,
        padding_free=padding_free,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec.get("seed", 0),
    )


def build(spec: dict):
    """``step()`` for ``spec["method"]`` (see the module docstring); ``step.info`` holds what
    the row records of the model (``backbone_params``, ``model_params``)."""
    import transformers
    import trl

    method = spec["method"]
    if method not in TRAINER_METHODS:
        raise ValueError(f"trainer_step has no method {method!r}")
    if method == "trl":
        cls = trl.DPOTrainer
    else:
        from ..integrations.trl import DPOTrainer as cls
    seed = spec.get("seed", 0)
    hidden, vocab, seq_len = spec["hidden"], spec["vocab"], spec["seq_len"]
    lens = draw_lengths(spec["pairs"], seq_len, seed)
    config = llama_config(
        hidden, vocab, spec.get("layers", 2), spec.get("intermediate") or 2 * hidden, seq_len
    )
    # fp32 weights: a 16-bit run is TRL's mixed precision (bf16=True / fp16=True autocast).
    policy, reference = build_models(config, torch.float32, spec["device"], seed)
    transformers.logging.set_verbosity_error()
    out_dir = tempfile.mkdtemp(prefix="dk-trainer-step-")  # nothing is saved in it
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=policy,
            ref_model=reference,
            args=_config(spec, out_dir, method == "dpo_kernels_packed"),
            train_dataset=_dataset(token_ids(lens, vocab, seed)),
            processing_class=_tokenizer(vocab),
        )
    got = [
        (len(x["prompt_ids"]), len(x["chosen_ids"]), len(x["rejected_ids"]))
        for x in trainer.train_dataset
    ]
    if got != lens:  # the tokenizer and TRL's preparation must give the drawn batch
        raise RuntimeError(f"trainer_step: prepared lengths {got} != drawn {lens}")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(lens))])
    if tuple(batch["input_ids"].shape) != (2 * len(lens), seq_len):
        raise RuntimeError(f"trainer_step: batch {tuple(batch['input_ids'].shape)}")
    mode = "recompute" if method == "dpo_kernels_recompute" else None
    state = {"trained": False}

    def step():
        with loss_path_env(mode), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not state["trained"]:  # the set-up train() does, and its one step
                state["trained"] = True
                return torch.tensor(trainer.train().training_loss)
            model = trainer.model_wrapped
            trainer.current_gradient_accumulation_steps = 1
            loss = trainer.training_step(model, batch)
            if trainer.args.max_grad_norm > 0:
                trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad()
            return loss.detach()

    step.info = dict(
        backbone_params=sum(p.numel() for p in policy.model.layers.parameters()),
        model_params=sum(p.numel() for p in policy.parameters()),
    )
    return step
