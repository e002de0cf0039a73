"""Unit tests of the Triton device functions, outside any full kernel."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dpo_kernels.triton.tile import cast_for_store, tanh  # noqa: E402

from .helpers import HAS_CUDA, INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton cannot run here")
DEVICE = "cuda" if HAS_CUDA else "cpu"


@triton.jit
def _tanh_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tanh(tl.load(X + offs)))


@triton.jit
def _cast_kernel(X, Y, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, cast_for_store(tl.load(X + offs), Y.dtype.element_ty, INTERPRETER))


def _padded(x):
    return torch.nn.functional.pad(x, (0, -x.numel() % 1024)).to(DEVICE)


def test_tanh_within_two_ulps():
    """The tanh built from exp, over the range softcap feeds it, against float64."""
    x = _padded(
        torch.cat(
            [
                torch.linspace(-12, 12, 4096),
                torch.linspace(-0.6, 0.6, 4096),
                torch.tensor([0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4]),
            ]
        )
    )
    y = torch.empty_like(x)
    _tanh_kernel[(x.numel() // 1024,)](x, y, BLOCK=1024)
    exact = torch.tanh(x.double())
    err = (y.double() - exact).abs()
    # 2 float32 ulps (2 * 2**-23 relative), about what torch.tanh itself achieves.
    assert torch.all(err <= 2 * 2**-23 * exact.abs().clamp(min=2**-126)), err.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_for_store_rounds_to_nearest_even(dtype):
    """Kernel stores in bf16/fp16 round like torch (and a GPU), also under the interpreter."""
    g = torch.Generator().manual_seed(0)
    x = _padded(
        torch.cat(
            [
                torch.randn(8192, generator=g) * 10,
                torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)]),
            ]
        )
    )
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(x.numel() // 1024,)](x, y, BLOCK=1024, INTERPRETER=INTERPRET)
    assert torch.equal(y, x.to(dtype))
