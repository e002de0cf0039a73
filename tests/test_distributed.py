"""The fused head under real data-parallel engines: several processes over gloo on the CPU.

Every case runs the same tiny model twice under the same wrapper, once with plain logits
(``log_softmax(model(...).logits)``) and once through dpo_kernels, takes one SGD step (lr 1, so a
parameter's change is its gradient after the engine's own reduction; ZeRO-3's full gradients are
read directly) and compares the loss and every parameter. Nothing is mocked: DDP, FSDP2
(``fully_shard``), FSDP1 and DeepSpeed ZeRO-3 run for real.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from .helpers import run_ranks

transformers = pytest.importorskip("transformers")

V, D = 89, 32  # 89: the vocabulary splits unevenly over 2 and 3 ranks
PER_RANK = 4  # sequences per rank: 2 pairs, chosen first


def _hf(tied, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger logits than the init's, so the softmax is far from uniform
        model.lm_head.weight.normal_(0, 0.5)
    return model


def _rank_batch(rank, seq=11):
    """This rank's share of one global batch (chosen sequences first in each share), with
    right padding, prompts, and one sequence with nothing to score."""
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, V, (PER_RANK, seq), generator=g)
    attention = torch.ones_like(ids)
    attention[1, seq - 3 :] = 0
    attention[2, seq - 1 :] = 0
    completion = torch.zeros_like(ids)
    for b in range(PER_RANK):
        completion[b, int(torch.randint(1, seq // 2, (1,), generator=g)) :] = 1
    if rank == 0:
        completion[3] = 0
    ref = -20.0 - 10 * torch.rand(PER_RANK, generator=g)
    weights = torch.randn(PER_RANK, generator=g)
    return ids, attention, completion, ref, weights


def _plain_logps(logits, ids, attention, completion):
    per_token = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = (attention * completion)[:, 1:].bool()
    return (per_token * mask).sum(1)


def _dpo(logps, ref, pairs=slice(None), beta=0.1):
    """Sigmoid DPO of the pairs ``pairs``, ``logps`` chosen sequences first."""
    c, r = logps.chunk(2)
    rc, rr = ref.chunk(2)
    return -F.logsigmoid(beta * ((c - rc[pairs]) - (r - rr[pairs])))


class _WithLoss(torch.nn.Module):
    """A user's root module computing a loss in its forward with a ``FusedLinear*Loss`` module
    (DPO, SimPO or KTO), or the same loss from plain logits (the setup of a custom loop)."""

    def __init__(self, hf, loss, fused):
        super().__init__()
        import dpo_kernels as dk

        self.hf, self.loss = hf, loss
        modules = {
            "dpo": lambda: dk.FusedLinearDPOLoss(beta=0.1),
            "simpo": lambda: dk.FusedLinearSimPOLoss(beta=0.1, compute_nll_loss=False),
            "kto": lambda: dk.FusedLinearKTOLoss(beta=0.1),
        }
        self.loss_fn = modules[loss]() if fused else None

    def forward(self, ids, attention, completion, ref):
        import dpo_kernels as dk

        hidden = self.hf.model(input_ids=ids, attention_mask=attention).last_hidden_state
        mask = (attention * completion)[:, 1:].bool()
        desirable = torch.arange(ids.shape[0]) % 3 != 1
        if self.loss_fn is None:
            logps = _plain_logps(self.hf.lm_head(hidden), ids, attention, completion)
            if self.loss == "dpo":
                return _dpo(logps, ref).mean()
            if self.loss == "simpo":
                avg = logps / mask.sum(1).clamp(min=1)
                return dk.simpo_loss(*avg.chunk(2), beta=0.1).losses.mean()
            return dk.kto_loss(logps, ref, desirable, beta=0.1).losses.mean()
        target = ids[:, 1:].masked_fill(~mask, -100)
        weight, h = self.hf.lm_head.weight, hidden[:, :-1]
        if self.loss == "dpo":
            c, r = ref.chunk(2)
            return self.loss_fn(weight, h, target, ref_chosen_logps=c, ref_rejected_logps=r)[0]
        if self.loss == "simpo":
            return self.loss_fn(weight, h, target)[0]
        return self.loss_fn(h, weight, target, preference_labels=desirable, ref_logps=ref)[0]


def _wrap(engine, root, hf, opts, world):
    """``root`` (which holds ``hf``) wrapped as a user of ``engine`` would wrap it."""
    layer = type(hf.model.layers[0])
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(root)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        kw = dict(mesh=mesh, reshard_after_forward=opts.get("reshard", True))
        for block in hf.model.layers:
            fully_shard(block, **kw)
        if opts.get("head_unit"):
            fully_shard(hf.lm_head, **kw)
        return fully_shard(root, **kw)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        head = hf.lm_head if opts.get("head_unit") else None
        return FSDP(
            root,
            auto_wrap_policy=functools.partial(
                lambda_auto_wrap_policy,
                lambda_fn=lambda m: isinstance(m, layer) or m is head,
            ),
            use_orig_params=opts.get("orig", True),
            device_id=torch.device("cpu"),
        )
    if engine == "zero3":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": PER_RANK,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            # an optimizer makes the training engine (without one, ZeRO-3 builds its
            # inference-only offload engine and refuses a backward); it is never stepped
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        }
        sgd = torch.optim.SGD(root.parameters(), lr=1.0)
        engine, *_ = deepspeed.initialize(model=root, optimizer=sgd, config=config)
        if root is not hf:  # the loss module reads the head outside lm_head's forward
            deepspeed.zero.register_external_parameter(root, hf.lm_head.weight)
        return engine
    raise KeyError(engine)


def _full_params(engine, model):
    """Every parameter, whole, by its plain name (engine wrappers' prefixes removed)."""
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            state = model.state_dict()
        return {k: v.clone() for k, v in state.items()}
    out = {}
    for name, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[name.removeprefix("module.")] = (full() if callable(full) else p).detach().clone()
    return out


def _step(engine, kind, opts, rank, world, fused):
    """(loss, every parameter after one SGD step of lr 1) for one run."""
    from dpo_kernels.integrations.transformers import sequence_logprobs, sequence_pair_loss

    hf = _hf(opts.get("tied", False))
    ids, attention, completion, ref, weights = _rank_batch(rank)
    root = _WithLoss(hf, kind.split("_")[1], fused) if kind.startswith("module") else hf
    model = _wrap(engine, root, hf, opts, world)
    if kind.startswith("module"):
        loss = model(ids, attention, completion, ref)
    elif not fused:
        out = model(input_ids=ids, attention_mask=attention)
        logps = _plain_logps(out.logits, ids, attention, completion)
        loss = (logps * weights).sum() if kind == "logprobs" else _dpo(logps, ref).mean()
    elif kind == "logprobs":
        loss = (sequence_logprobs(model, ids, attention, completion).logps * weights).sum()
    else:
        n_pairs = PER_RANK // 2
        carrier, stats = sequence_pair_loss(
            model,
            ids,
            attention,
            completion,
            lambda st, pairs: _dpo(st.logps, ref, pairs).sum() / n_pairs,
        )
        assert carrier is not None, "the loss-level path did not apply"
        loss = _dpo(stats.logps, ref).mean() + carrier
    if engine == "zero3":
        from deepspeed.utils import safe_get_full_grad

        model.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in model.module.named_parameters()}
        return loss.detach(), grads
    loss.backward()
    before = _full_params(engine, model)  # read after the first forward (FSDP2's lazy init)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    after = _full_params(engine, model)
    return loss.detach(), {k: before[k] - after[k] for k in before}


def _engine_worker(rank, world, engine, cases):
    failures = []
    for kind, opts in cases:
        what = f"{engine} {kind} {opts}"
        want_loss, want = _step(engine, kind, opts, rank, world, fused=False)
        got_loss, got = _step(engine, kind, opts, rank, world, fused=True)
        if not torch.allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6):
            failures.append(f"{what}: loss {got_loss.item()} != {want_loss.item()}")
        assert set(got) == set(want), what
        for name, g in want.items():
            # fp32: the fused op and plain logits sum the same terms in different orders. Most
            # parameters agree to ~1e-6; a layer-0 k_proj under KTO (a small gradient through the
            # attention softmax) reaches 2.6e-5 under DDP and FSDP2 alike, so the bound is 1e-4,
            # the TRL parity tests' bound. A wrong head reduction is off by 0.8-1.0.
            err = (got[name] - g).norm() / g.norm().clamp_min(1e-30)
            if not err <= 1e-4:
                failures.append(f"{what}: {name} relative error {err.item():.2e}")
        head = "hf.lm_head.weight" if kind.startswith("module") else "lm_head.weight"
        if opts.get("tied"):
            head = head.replace("lm_head", "model.embed_tokens")
        assert want[head].norm() > 0, f"{what}: the head got no gradient, the test proves nothing"
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


KINDS = ("logprobs", "pair", "module_dpo", "module_simpo", "module_kto")


def _cases(*option_sets):
    return [(kind, opts) for opts in option_sets for kind in KINDS]


def test_ddp():
    run_ranks(_engine_worker, 2, "ddp", _cases({}, {"tied": True}))


def test_fsdp2():
    """Per-layer and root ``fully_shard``, resharding after forward or not, tied embeddings,
    and a head sharded as its own unit (the module case reads the head outside its own forward,
    so it has no plain counterpart there)."""
    cases = _cases(
        {"reshard": True},
        {"reshard": False},
        {"reshard": True, "tied": True},
    )
    cases += [(kind, {"head_unit": True}) for kind in ("logprobs", "pair")]
    run_ranks(_engine_worker, 2, "fsdp2", cases)


def test_fsdp2_three_ranks():
    """Three ranks: the vocabulary (89 rows) and every other dimension split unevenly."""
    run_ranks(_engine_worker, 3, "fsdp2", [("logprobs", {}), ("pair", {}), ("module_dpo", {})])


def test_deepspeed_zero3():
    pytest.importorskip("deepspeed")
    run_ranks(_engine_worker, 2, "zero3", _cases({}, {"tied": True}))


def test_fsdp1():
    cases = _cases({"orig": True}, {"orig": False}, {"orig": True, "tied": True})
    cases += [(kind, {"orig": False, "head_unit": True}) for kind in ("logprobs", "pair")]
    run_ranks(_engine_worker, 2, "fsdp1", cases)
