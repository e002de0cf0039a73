"""torch.compile(fullgraph=True) traces through linear_logprobs with no graph break."""

import pytest
import torch

import dpo_kernels as dk

from .helpers import make_inputs


def dpo_like_step(hidden, weight, labels, bias, backend):
    stats = dk.linear_logprobs(
        hidden,
        weight,
        labels,
        bias,
        reduction="mean",
        return_stats=True,
        backend=backend,
        softcap=30.0,
    )
    half = stats.logps.shape[0] // 2
    margin = stats.logps[:half] - stats.logps[half:]
    loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    return loss, stats.entropy_sum.sum(), stats.num_tokens


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_fullgraph_compile_matches_eager(case, compiler):
    backend, device = case
    torch._dynamo.reset()
    results = []
    for fn in (dpo_like_step, torch.compile(dpo_like_step, fullgraph=True, backend=compiler)):
        hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device, b=4)
        loss, entropy, num_tokens = fn(hidden, weight, labels, bias, backend)
        grads = torch.autograd.grad(loss, [hidden, weight, bias])
        results.append((loss, entropy, num_tokens, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_opcheck(case):
    """Schema, fake (meta) implementation and autograd registration of both custom ops."""
    backend, device = case
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, device)
    n, d = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
    cu = torch.arange(hidden.shape[0] + 1, device=device) * hidden.shape[1]
    for reduction in ("sum", "mean", "none"):
        args = (
            hidden.reshape(n, d),
            weight,
            bias,
            labels.reshape(n),
            cu,
            -100,
            1.0,
            1.0,
            0.0,
            False,  # allow_tf32
            False,  # autotune
            reduction,
            backend,
            True,
            False,  # jacobian
        )
        torch.library.opcheck(torch.ops.dpo_kernels.linear_logprobs_fwd.default, args)
