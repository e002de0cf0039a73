import os

import pytest
import torch

# First: helpers sets TRITON_INTERPRET before any Triton kernel is decorated.
from .helpers import HAS_CUDA, HAS_TRITON, INTERPRET


def _case(backend, device):
    marks = []
    if device == "cuda" and not HAS_CUDA:
        marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
    elif backend == "triton" and not HAS_TRITON:
        marks.append(pytest.mark.skip(reason="triton is not installed"))
    elif backend == "triton" and device == "cpu" and not INTERPRET:
        marks.append(pytest.mark.skip(reason="a GPU is present, so Triton runs compiled on CUDA"))
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


#: Every (backend, device) pair the oracle suite runs on. The C++ backend is never skipped: if it
#: cannot be built here, its tests fail with the reason (set DPO_KERNELS_NO_CPP=1 to leave it out
#: deliberately).
CASES = [
    _case("torch", "cpu"),
    _case("triton", "cpu"),
    _case("cpp", "cpu"),
    _case("torch", "cuda"),
    _case("triton", "cuda"),
]
if os.environ.get("DPO_KERNELS_NO_CPP", "0") == "1":
    CASES = [c for c in CASES if c.values[0][0] != "cpp"]


@pytest.fixture(params=CASES)
def case(request):
    return request.param


@pytest.fixture
def poison(monkeypatch):
    """Fill every torch.empty / empty_like float buffer with NaN, so unwritten elements show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(-(2**30))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
