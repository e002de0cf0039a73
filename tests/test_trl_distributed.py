"""dpo_kernels.integrations.trl.DPOTrainer against stock trl.DPOTrainer under torchrun: two CPU
processes over gloo, two optimizer steps, same logged losses and same final parameters.

Two engines, each configured as a user configures it:

- ``ddp``: plain multi-process ``DPOConfig(use_cpu=True)`` (accelerate's MULTI_CPU, DDP);
- ``fsdp2``: ``DPOConfig(fsdp=True, fsdp_config={"fsdp_version": 2,
  "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})``: accelerate's ``fully_shard`` of
  the policy (root, decoder layers, embeddings, norm and LM head as units) and TRL's
  ``prepare_fsdp`` of the reference (root). accelerate 1.16 drops the FSDP plugin
  on a CPU-only host (it enables FSDP only for GPU-like process groups), so tests/trl_ranks.py
  promotes MULTI_CPU to FSDP exactly as ``AcceleratorState`` does on a GPU host; the rest is
  accelerate's and TRL's own code. The run checks that every parameter is a DTensor shard.

tests/trl_ranks.py does the training on each rank; this file launches it and compares.
"""

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "trl_ranks.py"
RTOL = 1e-4  # measured differences are ~1e-7 (losses, parameters) and ~3e-6 (updates)
TIMEOUT_S = 150  # per launch; a launch takes ~10 s on 2 cores


@pytest.fixture(scope="module", autouse=True)
def _cpp_backend_built():
    """Build (or load) the C++ CPU backend once here, so that the ranks load it from the cache
    instead of both compiling it under the launch's timeout. Where it cannot be built, "auto"
    falls back to the torch backend in the ranks as well."""
    from dpo_kernels import cpu
    from dpo_kernels.backend import BackendUnavailable

    try:
        cpu.load()
    except BackendUnavailable:
        pass


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, tmp_path):
    out = tmp_path / "result.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(SCRIPT),
        mode,
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the launcher and both ranks
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun {mode} timed out after {TIMEOUT_S} s:\n{log[-6000:]}")
    assert proc.returncode == 0, f"torchrun {mode} failed ({proc.returncode}):\n{log[-6000:]}"
    return torch.load(out, weights_only=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_steps_match_stock_trl(mode, tmp_path):
    result = _launch(mode, tmp_path)
    stock, ours, initial = result["stock"], result["ours"], result["initial"]

    # The engine really is what the case says, on 2 gloo processes, for both trainers.
    for run in (stock, ours):
        engine = run["engine"]
        assert engine["world_size"] == 2 and engine["backend"] == "gloo", engine
        if mode == "fsdp2":
            assert engine["distributed_type"] == "DistributedType.FSDP", engine
            assert engine["fsdp_version"] == 2, engine
            # accelerate's FSDP2 auto-wrap: the decoder layers, the root, and (accelerate 1.16)
            # the embeddings, the final norm and the LM head as units of their own, so the head
            # is unsharded by its own hooks inside dpo_kernels' redirected head forward
            wrapped = {"", "model.layers.0", "model.layers.1", "lm_head"}
            assert wrapped <= set(engine["fsdp_modules"]), engine
            # every parameter of the policy and of the reference is a DTensor shard: this rank
            # holds about half of the elements
            assert engine["n_dtensor"] == engine["n_params"] == engine["ref_n_dtensor"] > 0
            assert engine["local_numel"] < 0.6 * engine["full_numel"], engine
        else:
            assert engine["distributed_type"] == "DistributedType.MULTI_CPU", engine
            assert engine["wrapped_type"] == "DistributedDataParallel", engine
            assert engine["n_dtensor"] == len(engine["fsdp_modules"]) == 0, engine

    # Ours went through the fused op: per step, the reference's log-probs, then the policy's
    # loss-level path.
    assert ours["calls"] == ["sequence_logprobs", "loss-level path"] * 2

    # Two optimizer steps, each logged, with the same loss.
    assert stock["global_step"] == ours["global_step"] == 2
    assert len(stock["losses"]) == len(ours["losses"]) == 2
    for got, want in zip(ours["losses"], stock["losses"]):
        assert math.isfinite(want)
        assert math.isclose(got, want, rel_tol=RTOL), (ours["losses"], stock["losses"])

    # The same final parameters; they moved (lr 1 SGD), so the comparison is not vacuous. The
    # change from the initial value is compared too: tighter for parameters that moved little.
    assert stock["final"].keys() == ours["final"].keys() == initial.keys()
    moved = []
    for name, want in stock["final"].items():
        got, init = ours["final"][name], initial[name]
        assert got.shape == want.shape == init.shape, name
        assert _rel(got, want) <= RTOL, (name, _rel(got, want))
        if not torch.equal(want, init):
            moved.append(name)
            assert _rel(got - init, want - init) <= RTOL, (name, _rel(got - init, want - init))
    assert len(moved) == len(initial), sorted(set(initial) - set(moved))
    assert _rel(stock["final"]["lm_head.weight"], initial["lm_head.weight"]) > 0.1


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _measure(path):
    """``python -m tests.test_trl_distributed OUT.json``: both launches, the measured
    differences written to OUT.json (the README's figures come from that file)."""
    import json
    import platform
    import tempfile

    import accelerate
    import trl

    rows = {}
    for mode in ("ddp", "fsdp2"):
        with tempfile.TemporaryDirectory() as tmp:
            result = _launch(mode, Path(tmp))
        stock, ours, initial = result["stock"], result["ours"], result["initial"]
        rows[mode] = {
            "losses_stock": stock["losses"],
            "losses_ours": ours["losses"],
            "loss_max_rel_diff": max(
                abs(a - b) / abs(b) for a, b in zip(ours["losses"], stock["losses"])
            ),
            "param_max_rel_diff": max(_rel(ours["final"][k], v) for k, v in stock["final"].items()),
            "update_max_rel_diff": max(
                _rel(ours["final"][k] - initial[k], v - initial[k])
                for k, v in stock["final"].items()
            ),
            "fused_calls": ours["calls"],
            "engine": {k: str(v) for k, v in ours["engine"].items()},
        }
    meta = {
        "cpu": _cpu_name() or platform.machine(),
        "threads": os.cpu_count(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "command": "python -m tests.test_trl_distributed " + str(path),
    }
    Path(path).write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    print(json.dumps({m: {k: r[k] for k in r if k.endswith("diff")} for m, r in rows.items()}))


if __name__ == "__main__":
    _measure(sys.argv[1])
