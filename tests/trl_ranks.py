"""One rank of tests/test_trl_distributed.py, started by torchrun (2 CPU processes over gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/trl_ranks.py {ddp,fsdp2} OUT.pt

Trains stock ``trl.DPOTrainer`` and then ``dpo_kernels.integrations.trl.DPOTrainer`` for two
optimizer steps, each from a fresh copy of the same tiny random Llama, under plain multi-process
data parallelism (``ddp``) or FSDP2 (``fsdp2``: ``fully_shard`` set up through
``DPOConfig(fsdp=True, fsdp_config={"fsdp_version": 2, ...})``, as a user configures it). Rank 0
saves the logged losses, the whole initial and final parameters of both runs, the number of
fused-path calls, and what the engine looked like (world size, backend, DTensor parameters).
Everything is built in-process: nothing is downloaded.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
import trl
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dpo_kernels.integrations import trl as dk_trl
from tests.helpers import tiny_policy_and_reference, tiny_preference_dataset, tiny_tokenizer


def _config(mode, output_dir):
    extra = {}
    if mode == "fsdp2":
        extra = {
            "fsdp": True,  # transformers 5: the sharding is configured in fsdp_config
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        }
    return trl.DPOConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        optim="sgd",
        learning_rate=1.0,  # SGD: a parameter's change is lr x its (clipped) gradient
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        disable_tqdm=True,
        **extra,
    )


def _allow_fsdp_on_cpu():
    """accelerate 1.16 turns an FSDP plugin into ``DistributedType.FSDP`` only for accelerator
    process groups (MULTI_GPU, MULTI_XPU, ...): on a CPU-only host (``use_cpu=True``, gloo) the
    plugin from ``DPOConfig(fsdp=..., fsdp_config=...)`` or from ACCELERATE_USE_FSDP is silently
    dropped and the run is plain DDP; without ``use_cpu`` there is no process group at all. Do on
    MULTI_CPU exactly what ``AcceleratorState.__init__`` does on a GPU host; everything after
    (``Accelerator.prepare``'s FSDP2 path, TRL's ``prepare_fsdp`` of the reference) is
    accelerate's and TRL's own code, unchanged."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def _full(p):
    p = p.detach()
    full = getattr(p, "full_tensor", None)  # DTensor under FSDP2: gather it whole (collective)
    return (full() if callable(full) else p).clone().cpu()


def _run(cls, mode, out_dir, tokenizer, dataset):
    policy, reference = tiny_policy_and_reference(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=policy,
            ref_model=reference,
            args=_config(mode, out_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    state = trainer.accelerator.state
    params = list(trainer.model.named_parameters())
    engine = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "distributed_type": str(state.distributed_type),
        "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        "model_type": type(trainer.model).__name__,
        "wrapped_type": type(trainer.model_wrapped).__name__,
        "ref_type": type(trainer.ref_model).__name__,
        "fsdp_modules": [n for n, m in trainer.model.named_modules() if isinstance(m, FSDPModule)],
        "n_params": len(params),
        "n_dtensor": sum(isinstance(p, DTensor) for _, p in params),
        "ref_n_dtensor": sum(isinstance(p, DTensor) for p in trainer.ref_model.parameters()),
        # this rank's share of each parameter (elements), against the whole
        "local_numel": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for _, p in params
        ),
        "full_numel": sum(p.numel() for _, p in params),
    }
    # Fail fast here too (the test asserts the same from the saved record).
    assert engine["world_size"] == 2 and engine["backend"] == "gloo", engine
    if mode == "fsdp2":
        assert engine["distributed_type"] == "DistributedType.FSDP", engine
        assert engine["fsdp_version"] == 2, engine
        assert engine["n_dtensor"] == engine["n_params"] == engine["ref_n_dtensor"], engine
        assert {"", "model.layers.0", "model.layers.1"} <= set(engine["fsdp_modules"]), engine
    else:
        assert engine["wrapped_type"] == "DistributedDataParallel", engine
        assert engine["n_dtensor"] == len(engine["fsdp_modules"]) == 0, engine
    final = {name: _full(p) for name, p in params}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "losses": losses,
        "global_step": trainer.state.global_step,
        "final": final,
        "engine": engine,
    }


def main():
    mode, out_path = sys.argv[1], sys.argv[2]
    assert mode in ("ddp", "fsdp2"), mode
    if mode == "fsdp2":
        _allow_fsdp_on_cpu()
    tokenizer, dataset = tiny_tokenizer(), tiny_preference_dataset()
    out_dir = os.path.dirname(os.path.abspath(out_path))

    stock = _run(trl.DPOTrainer, mode, os.path.join(out_dir, "stock"), tokenizer, dataset)

    calls = []
    real_logprobs, real_pair = dk_trl.sequence_logprobs, dk_trl.sequence_pair_loss

    def logprobs(*a, **k):
        calls.append("sequence_logprobs")
        return real_logprobs(*a, **k)

    def pair(*a, **k):
        carrier, stats = real_pair(*a, **k)
        calls.append("loss-level path" if carrier is not None else "sequence_pair_loss")
        return carrier, stats

    dk_trl.sequence_logprobs, dk_trl.sequence_pair_loss = logprobs, pair
    ours = _run(dk_trl.DPOTrainer, mode, os.path.join(out_dir, "ours"), tokenizer, dataset)
    ours["calls"] = calls

    if dist.get_rank() == 0:
        initial = {
            n: p.detach().clone()
            for n, p in tiny_policy_and_reference(tokenizer)[0].named_parameters()
        }
        torch.save({"mode": mode, "initial": initial, "stock": stock, "ours": ours}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
