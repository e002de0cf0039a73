"""pytest-benchmark suite for the op on the CPU: ``linear_logprobs`` forward + backward.

    pip install ".[bench]"
    python -m pytest benchmarks/test_op_cpu.py --benchmark-only [--benchmark-json FILE]

Not part of ``pytest`` (tests/ only): timing lives here, correctness in tests/. Each case also
times the naive ``log_softmax(h @ Wᵀ)`` on the same inputs, so the table shows the gain on this
machine. Shapes: W1 (2048 tokens, D = 256, V = 32,000) and a real Mistral-7B head (256 tokens,
D = 4096, V = 32,768), a quarter of each sequence prompt (ignored).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import dpo_kernels as dk  # noqa: E402
from dpo_kernels.bench.methods import naive_token_logprobs  # noqa: E402

SHAPES = {"W1": (8, 256, 256, 32000), "mistral-7b": (2, 128, 4096, 32768)}


def _inputs(shape, dtype):
    seqs, seq_len, dim, vocab = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seqs, seq_len, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (seqs, seq_len), generator=g)
    labels[:, : seq_len // 4] = -100
    return hidden, weight, labels


METHODS = {
    "dpo_kernels": lambda h, w, y: dk.linear_logprobs(h, w, y),
    "naive": lambda h, w, y: naive_token_logprobs(h, w, y).sum(-1),  # 0 at ignored positions
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_fwd_bwd(benchmark, method, shape, dtype):
    if method == "naive" and dtype == torch.bfloat16:
        pytest.skip("naive bf16 logits take ~1 min a step on CPUs without bf16 units (see README)")
    hidden, weight, labels = _inputs(shape, dtype)
    fn = METHODS[method]

    def step():
        out = fn(hidden, weight, labels)
        torch.autograd.grad(out.sum(), [hidden, weight])
        return out

    benchmark.group = f"{shape} {str(dtype).split('.')[-1]}"
    out = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(out).all()
