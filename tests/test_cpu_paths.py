"""The C++ backend's two bf16 paths — bf16 GEMMs on the CPU's bf16 units, AMX or AVX512-BF16
("native"), and fp32 GEMMs on widened tiles ("widen") — each against the float64 oracle, on
whatever CPU runs the tests."""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import cpu

from .helpers import make_inputs, run_case

# (name, layout, reduction, bias, options): every reduction, layout and logit transform.
VARIANTS = [
    ("plain", "padded", "sum", False, {}),
    ("mean-bias-temp", "padded", "mean", True, {"temperature": 0.7}),
    (
        "none-softcap",
        "padded",
        "none",
        True,
        {"softcap": 5.0, "logit_scale": 1.7, "temperature": 1.3},
    ),
    ("packed-softcap30", "packed", "sum", True, {"softcap": 30.0}),
]

pytestmark = pytest.mark.skipif(
    cpu.BACKEND.unavailable_reason(torch.device("cpu")) is not None,
    reason="the C++ backend cannot be built here",
)


def _has_units() -> bool:
    return cpu.bf16_units() != ""


@pytest.fixture(params=cpu.BF16_PATHS)
def bf16_path(request, monkeypatch):
    if request.param == "native" and not _has_units():
        pytest.skip("this CPU has no bf16 units (the widen path runs here)")
    monkeypatch.setenv("DPO_KERNELS_CPU_BF16", request.param)
    assert cpu.bf16_path()[0] == request.param
    return request.param


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_bf16_path_against_the_oracle(bf16_path, variant, poison):
    _, layout, reduction, bias, opts = variant
    run_case("cpp", "cpu", torch.bfloat16, layout, reduction, bias, opts)


@pytest.mark.parametrize("d,v", [(37, 130), (3, 70), (64, 2000)], ids=["odd-D", "D3", "D64"])
def test_bf16_path_odd_shapes(bf16_path, d, v):
    """Odd D and vocab sizes that are no multiple of the matrix unit's 64-column blocks."""
    run_case("cpp", "cpu", torch.bfloat16, "packed", "sum", True, {"softcap": 5.0}, d=d, v=v)


def test_bf16_paths_agree_on_values(monkeypatch):
    """Both paths accumulate in fp32 from the same bf16 products: values agree to fp32 rounding;
    the paths really differ (the native path rounds the logit gradient to bf16)."""
    if not _has_units():
        pytest.skip("this CPU has no bf16 units")

    results = {}
    for path in cpu.BF16_PATHS:
        monkeypatch.setenv("DPO_KERNELS_CPU_BF16", path)
        hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.bfloat16, "cpu")
        out = dk.linear_logprobs(hidden, weight, labels, bias, backend="cpp")
        out.sum().backward()
        results[path] = (out.detach(), hidden.grad)
    torch.testing.assert_close(results["native"][0], results["widen"][0], rtol=1e-6, atol=1e-5)
    assert not torch.equal(results["native"][1], results["widen"][1])


def test_path_choice_and_errors(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "fast")
    with pytest.raises(ValueError, match="DPO_KERNELS_CPU_BF16 must be auto, native or widen"):
        cpu.bf16_path()
    monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "auto")
    path, why = cpu.bf16_path()
    assert path == ("native" if _has_units() else "widen") and why
    assert cpu.bf16_units() in ("amx", "avx512_bf16", "")
    if _has_units():  # the older name of the native path still forces it
        monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "amx")
        assert cpu.bf16_path()[0] == "native"
        monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "auto")

    real = cpu.load()

    class NoUnits:  # the extension as a CPU without bf16 units would see it
        def __getattr__(self, name):
            return getattr(real, name)

        def bf16_units(self):
            return ""

    monkeypatch.setattr(cpu, "load", NoUnits)
    assert cpu.bf16_path()[0] == "widen"
    monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "native")
    with pytest.raises(cpu.BackendUnavailable, match="no bf16 units"):
        cpu.bf16_path()
