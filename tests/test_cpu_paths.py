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


# ----------------------------------------------------------------------------- the tile policy


@pytest.mark.parametrize("split", cpu.SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-widen"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_both_splits_against_the_oracle(split, dtype, variant, monkeypatch):
    """The threads sharing out row tiles or vocabulary chunks: same oracle bounds. A 2,000-column
    vocabulary in 512-column chunks gives the vocabulary split uneven shares (4 chunks, the last
    short), and with more threads than chunks some threads get none."""
    monkeypatch.setenv("DPO_KERNELS_CPU_SPLIT", split)
    monkeypatch.setenv("DPO_KERNELS_CPU_BF16", "widen")
    _, layout, reduction, bias, opts = variant
    run_case("cpp", "cpu", dtype, layout, reduction, bias, opts, v=2000)


def test_vocab_split_is_deterministic_and_matches_the_row_split(monkeypatch):
    hidden, weight, labels, bias, _ = make_inputs("padded", True, torch.float32, "cpu", v=2000)
    results = {}
    for split in ("vocab", "vocab", "rows"):
        monkeypatch.setenv("DPO_KERNELS_CPU_SPLIT", split)
        out = dk.linear_logprobs(hidden, weight, labels, bias, backend="cpp", return_stats=True)
        grads = torch.autograd.grad(out.logps.sum(), [hidden, weight, bias])
        got = (out.logps, out.entropy_sum, *grads)
        if split in results:  # the same split twice: bitwise the same
            assert all(torch.equal(a, b) for a, b in zip(results[split], got))
        results[split] = got
    for a, b in zip(results["vocab"], results["rows"]):  # the splits: the same sums, reordered
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plan_shares_out_vocab_for_few_rows_and_rows_for_many(monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_CPU_SPLIT", raising=False)
    v, d = 128256, 4096
    few = cpu.plan(96, v, d, native=False, threads=2)
    assert few.split == "vocab" and few.tile_rows == 96  # every thread keeps all 96 rows
    assert cpu.plan(96, v, d, native=False, threads=1).split == "rows"
    many = cpu.plan(16384, v, d, native=False, threads=2)
    assert many.split == "rows" and many.tile_rows == cpu.TILE_ROWS
    assert cpu.plan(96, v, d, native=True, threads=2).split == "rows"  # brgemm tiles its own way
    assert cpu.plan(96, 1000, d, native=False, threads=2).split == "rows"  # too few chunks
    for cut in (few, many):  # the fp32 tile fits half the L2
        assert cut.tile_rows * cut.chunk_v * 4 <= max(cpu.l2_bytes() // 2, 64 * 4 * cut.tile_rows)
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", "1")  # dH partials over the budget: rows
    assert cpu.plan(96, v, d, native=False, threads=2).split == "rows"
    monkeypatch.delenv("DPO_KERNELS_CHUNK_MB")
    monkeypatch.setenv("DPO_KERNELS_CPU_SPLIT", "sideways")
    with pytest.raises(ValueError, match="DPO_KERNELS_CPU_SPLIT must be auto, rows or vocab"):
        cpu.plan(96, v, d, native=False)
