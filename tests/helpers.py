"""What the tests share: the machine flags, random inputs, and an independent oracle (every
logit materialised, in float64 or the input dtype) with the tolerance rules of DESIGN.md.

Tests import from here only (never from another test or from ``conftest``).
"""

import math
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dpo_kernels as dk
from dpo_kernels import logprobs as _logprobs

HAS_CUDA = torch.cuda.is_available()
# Triton chooses compiled vs interpreted kernels when they are decorated, so this must be set
# before dpo_kernels.triton's kernels are imported. With a GPU the kernels run compiled on CUDA.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

IGNORE = -100


def naive_logprobs(
    hidden,
    weight,
    labels,
    bias=None,
    *,
    cu_seqlens=None,
    reduction="sum",
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=IGNORE,
    dtype=torch.float64,
):
    """Per-sequence (or per-token) log-probs and stats with full logits.

    ``dtype=None`` is "torch in the input dtype": the matmul runs in the input dtype (logits
    rounded to it, as a trainer's ``lm_head`` would), the softmax in float32.
    """
    if dtype is None:
        x = hidden @ weight.T
        if bias is not None:
            x = x + bias
        x = x.float()
    else:
        x = hidden.to(dtype) @ weight.to(dtype).T
        if bias is not None:
            x = x + bias.to(dtype)
    if softcap is None:
        z = x * logit_scale / temperature
    else:
        z = softcap * torch.tanh(x * logit_scale / softcap) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    tok = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    stats = {
        "logits_sum": z.mean(-1),
        # p·log p → 0 where p = 0 (a -inf logit: a masked vocabulary lane), as its limit
        "entropy_sum": -torch.where(p == 0, 0.0, p * logp_all).sum(-1),
        "top1_correct": (z.argmax(-1) == safe).to(z.dtype),
        "log_sum_sq_probs_sum": torch.logsumexp(2 * logp_all, dim=-1),
    }
    vals = {"logps": tok, **stats}
    vals = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in vals.items()}
    vals["num_tokens"] = valid.to(z.dtype)
    if reduction == "none":
        return vals
    if cu_seqlens is None:
        out = {k: v.sum(-1) if v.dim() == 2 else v.sum().reshape(1) for k, v in vals.items()}
    else:
        bounds = cu_seqlens.tolist()
        out = {
            k: torch.stack([v[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
            for k, v in vals.items()
        }
    if reduction == "mean":
        out["logps"] = out["logps"] / out["num_tokens"].clamp(min=1)
    return out


def assert_close(ours, oracle, same=None, *, tol, atol=0.0, what=""):
    """``max|ours − oracle| <= max|same − oracle| + tol·max|oracle| + atol`` (DESIGN.md's rule).

    ``same`` is torch computing the same thing in the input dtype: we must be at least as
    accurate as it, up to ``tol`` relative to the magnitude of the values.
    """
    ours, oracle = ours.double(), oracle.double()
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values {ours}"
    err = (ours - oracle).abs().max().item() if ours.numel() else 0.0
    base = (same.double() - oracle).abs().max().item() if same is not None and ours.numel() else 0.0
    scale = oracle.abs().max().item() if ours.numel() else 0.0
    assert err <= base + tol * scale + atol, (
        f"{what}: max error {err:.3g} > torch-in-dtype error {base:.3g} + {tol:g} x {scale:.3g}"
        f" + {atol:.3g}"
    )


# Log-probs are float32 whatever the input dtype: fp32 logits of exactly representable inputs.
# Measured worst over the grid and 300 random configurations: 1.3e-7 relative; 15x headroom.
VALUE_TOL = 2e-6
# float32 gradients: measured worst 7.8e-7 relative beyond torch's own error; 2.5x headroom.
FP32_GRAD_TOL = 2e-6
# Half-precision gradients pass through G (the logit gradient) stored in the input dtype, as
# DESIGN.md's backward does for tensor-core GEMMs, then are rounded again on output: that double
# rounding reaches one ulp of the output at an element where torch's own (equally double-rounded)
# result happened to land within a fifth of an ulp (measured over 300 random configurations).
# So: torch's error plus 2 ulps of the output dtype at the largest value, one for the double
# rounding and one for which of the two got lucky.
HALF_GRAD_ULPS = 2


def check_logps(ours, oracle, what="logps"):
    """Values: float32 accuracy for every input dtype (no torch-in-dtype allowance)."""
    assert ours.dtype == torch.float32, what
    assert_close(ours, oracle, tol=VALUE_TOL, what=what)


def check_grad(ours, oracle, same, dtype, what):
    assert ours.dtype == dtype and ours.shape == oracle.shape, what
    if dtype == torch.float32:
        assert_close(ours, oracle, same, tol=FP32_GRAD_TOL, what=what)
        return
    top = oracle.abs().max().item() if oracle.numel() else 0.0
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
    assert_close(ours, oracle, same, tol=0.0, atol=HALF_GRAD_ULPS * ulp, what=what)


# ----------------------------------------------------------------------------- inputs

B, T, D, V = 3, 13, 48, 1001  # 37-ish valid rows, several vocab tiles and splits, odd sizes


def make_inputs(
    layout, bias, dtype, device, *, b=B, t=T, d=D, v=V, seed=0, h_scale=1.0, w_scale=None
):
    g = torch.Generator().manual_seed(seed)
    w_scale = d**-0.5 if w_scale is None else w_scale
    if layout == "padded":
        hidden = torch.randn(b, t, d, generator=g) * h_scale
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[:, : t // 4] = IGNORE  # a prompt
        labels[-1, -2:] = IGNORE  # padding
        cu = None
    else:
        lens = torch.tensor([5, 0, 17, 1, 11])  # an empty sequence, a one-token sequence
        n = int(lens.sum())
        hidden = torch.randn(n, d, generator=g) * h_scale
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.3] = IGNORE
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
    weight = torch.randn(v, d, generator=g) * w_scale
    bias_t = torch.randn(v, generator=g) if bias else None
    cast = lambda x: x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return (
        cast(hidden),
        cast(weight),
        labels.to(device),
        None if bias_t is None else cast(bias_t),
        cu,
    )


def run_case(backend, device, dtype, layout, reduction, bias, opts, **shape):
    hidden, weight, labels, bias_t, cu = make_inputs(layout, bias, dtype, device, **shape)
    params = [hidden, weight] + ([bias_t] if bias_t is not None else [])
    kw = dict(reduction=reduction, cu_seqlens=cu, **opts)
    out = dk.linear_logprobs(hidden, weight, labels, bias_t, backend=backend, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(out, params, grad_out)

    ref = naive_logprobs(hidden, weight, labels, bias_t, **kw)["logps"]
    ref_grads = torch.autograd.grad(ref, params, grad_out.double())
    same = naive_logprobs(hidden, weight, labels, bias_t, dtype=None, **kw)["logps"]
    same_grads = torch.autograd.grad(same, params, grad_out.float())
    check_logps(out, ref)
    for name, g, rg, sg in zip(["hidden", "weight", "bias"], grads, ref_grads, same_grads):
        check_grad(g, rg, sg, dtype, f"d{name}")
    return out, grads


# ----------------------------------------------------------------------------- memory

# The Python functions behind the two custom ops, keyed by the op the dispatcher sees.
_OP_BODIES = {
    _logprobs._fwd_op._opoverload: _logprobs._forward,
    _logprobs._bwd_op._opoverload: _logprobs._backward,
}


class AllocationRecorder(TorchDispatchMode):
    """Records the largest new storage an op returns: ``largest`` (elements), ``largest_bytes``
    and ``where`` (the op).

    A dispatch mode is switched off while a custom op runs, so the ops of dpo_kernels are
    replaced by their Python bodies run under this mode: their inner allocations count too, the
    C++ backend's own (made on the calling thread) included. Work inside one op (a dtype widening
    inside ``sum``) is not seen: measure the resident size for that.
    """

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0
        self.where = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OP_BODIES:
            with self:
                return _OP_BODIES[func](*args, **kwargs)
        out = func(*args, **kwargs)
        seen = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.largest_bytes:
                    self.largest_bytes, self.where = nbytes, str(func)
                    self.largest = nbytes // t.element_size()
        return out


# ----------------------------------------------------------------------------- processes


def run_ranks(fn, world_size, *args, timeout=240.0):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one gloo
    process group, and returns when all have finished. A rank's exception fails the caller with
    that rank's traceback; past ``timeout`` seconds every rank is killed and ``TimeoutError``
    raised, so a hung collective cannot hang the suite. ``fn`` must be a module-level function
    (the ranks import it by name)."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _rank_main,
            args=(fn, world_size, os.path.join(tmp, "pg"), timeout, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()


def _rank_main(rank, fn, world_size, init_file, timeout, args):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    for key in ("RANK", "LOCAL_RANK"):  # what torchrun sets (DeepSpeed reads them)
        os.environ[key] = str(rank)
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ[key] = str(world_size)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        fn(rank, world_size, *args)
        # Every rank done before any tears its connections down: a rank that destroyed its group
        # while a peer's gloo threads still talked to it aborted that peer once in a loaded full
        # run ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- a tiny TRL setup

TRL_WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer():
    """A word-level tokenizer over ``<pad> <eos> <unk>`` and TRL_WORDS (built in code)."""
    import tokenizers
    import transformers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *TRL_WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_preference_dataset(rows=8):
    """``rows`` random prompt / chosen / rejected triples of TRL_WORDS (fixed seed)."""
    import datasets

    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(TRL_WORDS[i] for i in torch.randint(0, len(TRL_WORDS), (n,), generator=g))

    out = []
    for _ in range(rows):
        p, c, r = (int(x) for x in torch.randint(2, 9, (3,), generator=g))
        out.append({"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)})
    return datasets.Dataset.from_list(out)


def tiny_lm_config(tokenizer, **extra) -> dict:
    """The config fields every tiny test LM shares (2 layers of width 32, 4 query and 2
    key/value heads, the tokenizer's special ids), with ``extra`` on top."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def tiny_policy_and_reference(tokenizer, seed=0):
    """A tiny random fp32 Llama and a reference that differs from it by small noise (so
    rewards and margins are not all zero)."""
    return tiny_causal_lm_and_reference(tokenizer, "llama", seed=seed)


def perturbed_copy(policy):
    """A reference model: a copy of ``policy`` with small noise on every parameter (so rewards
    and margins are not all zero)."""
    import copy

    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return reference


def tiny_dpo_config(output_dir, **config):
    """The ``trl.DPOConfig`` of the one-batch TRL tests: fp32 on the CPU, 4 sequences a device,
    every step logged, nothing saved; ``config`` overrides."""
    import trl

    return trl.DPOConfig(
        **{
            "output_dir": str(output_dir),
            "report_to": "none",
            "use_cpu": True,
            "bf16": False,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
            "learning_rate": 1e-3,
            "disable_tqdm": True,
            **config,
        }
    )


# ----------------------------------------------------------------------------- padding-free TRL

# Token counts (prompt, chosen, rejected) of tiny_varied_preference_dataset: from 1 to 48 words,
# chosen and rejected of one pair far apart, so packed rows mix very short and long sequences.
VARIED_LENGTHS = [
    (1, 40, 2),
    (30, 1, 25),
    (5, 12, 1),
    (18, 3, 48),
    (2, 28, 6),
    (40, 2, 9),
    (9, 47, 4),
    (3, 7, 33),
]


def tiny_varied_preference_dataset():
    """Preference triples of TRL_WORDS with the very different lengths of VARIED_LENGTHS (fixed
    seed)."""
    import datasets

    g = torch.Generator().manual_seed(1)

    def words(n):
        return " ".join(TRL_WORDS[i] for i in torch.randint(0, len(TRL_WORDS), (n,), generator=g))

    return datasets.Dataset.from_list(
        [
            {"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
            for p, c, r in VARIED_LENGTHS
        ]
    )


def tiny_causal_lm_and_reference(tokenizer, family="llama", attn_implementation="sdpa", seed=0):
    """A tiny random fp32 causal LM of ``family`` ("llama"; or "qwen2", whose second layer has a
    sliding window of 8 tokens) with ``attn_implementation``, and a reference differing from it
    by small noise."""
    import transformers

    torch.manual_seed(seed)
    common = tiny_lm_config(tokenizer)
    if family == "llama":
        policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        config = transformers.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=8, max_window_layers=1
        )
        policy = transformers.Qwen2ForCausalLM(config)
    else:
        raise KeyError(family)
    policy.set_attn_implementation(attn_implementation)
    policy = policy.float()
    return policy, perturbed_copy(policy)


def tiny_moe_policy_and_reference(tokenizer, seed=0):
    """A tiny random fp32 Mixtral (4 experts, top 2, router logits on, aux coefficient 0.1 in
    its config) and a reference differing from it by small noise."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        **tiny_lm_config(
            tokenizer,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.1,
            experts_implementation="batched_mm",  # fixed GEMM shapes: no per-shape CPU set-up
        )
    )
    policy = transformers.MixtralForCausalLM(config).float()
    return policy, perturbed_copy(policy)


# ----------------------------------------------------------------------------- TRL parity


def make_dpo_trainer(
    cls, policy, reference, tokenizer, dataset, tmp_path, *, peft_config=None, **config
):
    """``cls`` (stock ``trl.DPOTrainer`` or the drop-in) on ``policy`` and ``reference`` (None:
    none; with a PEFT config the reference is the adapter-disabled policy) with
    :func:`tiny_dpo_config`'s arguments, TRL's construction warnings silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            model=policy,
            ref_model=None if peft_config is not None else reference,
            args=tiny_dpo_config(tmp_path, **config),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )


def trainer_batch(trainer, n=4):
    """The collated, device-placed batch of the first ``n`` training examples."""
    return trainer._prepare_inputs(
        trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    )


def trl_one_batch(trainer, n=4):
    """Loss, logged metrics (the last value of each) and parameter gradients of one training
    batch of the first ``n`` examples, through the trainer's own ``compute_loss``."""
    batch = trainer_batch(trainer, n)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads


def max_rel(a, b) -> float:
    """``max |a − b| / max |b|``."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def assert_trl_parity(ours, theirs, rtol=1e-4):
    """Two :func:`trl_one_batch` results agree: the loss and every gradient within ``rtol``
    relative, the same metrics logged in the same order, each within ``rtol`` (1e-5 absolute
    near 0). Returns the largest differences ``(loss, (metric, name), gradient)``."""
    import math

    loss, metrics, grads = ours
    want_loss, want_metrics, want_grads = theirs
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=1e-6)
    assert list(metrics) == list(want_metrics)  # the same metrics, logged in the same order
    for k, want in want_metrics.items():
        assert math.isclose(metrics[k], want, rel_tol=rtol, abs_tol=1e-5), (k, metrics[k], want)
    assert grads.keys() == want_grads.keys() and grads
    worst = 0.0
    for name, g in want_grads.items():
        worst = max(worst, max_rel(grads[name], g))
        assert max_rel(grads[name], g) <= rtol, name
    metric_diff = max(((abs(metrics[k] - v), k) for k, v in want_metrics.items()), default=None)
    return max_rel(loss, want_loss), metric_diff, worst
