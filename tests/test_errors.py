"""Bad input gets a clear ValueError / TypeError naming the argument and what was expected."""

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.backend import BackendUnavailable

from .helpers import INTERPRET

B, T, D, V = 2, 5, 8, 11


def good(**over):
    g = torch.Generator().manual_seed(0)
    args = {
        "hidden": torch.randn(B, T, D, generator=g),
        "weight": torch.randn(V, D, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "bias": None,
    }
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return args, kwargs


def packed(cu, n=6):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden": torch.randn(n, D, generator=g),
        "labels": torch.randint(0, V, (n,)),
        "cu_seqlens": torch.tensor(cu),
    }


CASES = [
    # (id, overrides, exception, message fragment)
    ("label >= V", {"labels": torch.full((B, T), V)}, ValueError, "labels must be in [0, 11)"),
    ("negative label", {"labels": torch.full((B, T), -3)}, ValueError, "found -3"),
    ("float labels", {"labels": torch.zeros(B, T)}, TypeError, "labels must be an integer"),
    ("bool labels", {"labels": torch.zeros(B, T, dtype=torch.bool)}, TypeError, "labels"),
    ("width mismatch", {"weight": torch.randn(V, D + 1)}, ValueError, "weight's D=9"),
    (
        "labels shape",
        {"labels": torch.zeros(B, T + 1, dtype=torch.long)},
        ValueError,
        "labels shape (2, 6) must equal hidden's leading shape (2, 5)",
    ),
    ("bias length", {"bias": torch.randn(V - 1)}, ValueError, "bias must have shape (V,) = (11,)"),
    ("bias dtype", {"bias": torch.randn(V, dtype=torch.float64)}, TypeError, "bias dtype"),
    (
        "dtype mix",
        {"weight": torch.randn(V, D, dtype=torch.bfloat16)},
        TypeError,
        "weight dtype torch.bfloat16 must match hidden dtype torch.float32",
    ),
    ("int hidden", {"hidden": torch.zeros(B, T, D, dtype=torch.long)}, TypeError, "hidden must be"),
    (
        "hidden 4-D",
        {"hidden": torch.randn(1, B, T, D), "labels": torch.zeros(1, B, T, dtype=torch.long)},
        ValueError,
        "hidden must be (B, T, D)",
    ),
    ("weight 1-D", {"weight": torch.randn(D)}, ValueError, "weight must be 2-D"),
    ("empty vocab", {"weight": torch.randn(0, D)}, ValueError, "at least one row"),
    ("not a tensor", {"hidden": [[1.0]]}, TypeError, "hidden must be a torch.Tensor"),
    ("cu_seqlens start", packed([1, 3, 6]), ValueError, "cu_seqlens must start at 0"),
    ("cu_seqlens decreasing", packed([0, 4, 2, 6]), ValueError, "non-decreasing"),
    ("cu_seqlens end", packed([0, 3, 5]), ValueError, "must end at the number of rows N=6"),
    (
        "cu_seqlens float",
        {**packed([0, 6]), "cu_seqlens": torch.tensor([0.0, 6.0])},
        TypeError,
        "cu_seqlens must be an integer",
    ),
    (
        "cu_seqlens 2-D",
        {**packed([0, 6]), "cu_seqlens": torch.tensor([[0, 6]])},
        ValueError,
        "cu_seqlens must be 1-D",
    ),
    (
        "cu_seqlens with padded",
        {"cu_seqlens": torch.tensor([0, 5, 10])},
        ValueError,
        "with cu_seqlens, hidden must be packed (N, D)",
    ),
    ("reduction", {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ("backend", {"backend": "cuda"}, ValueError, "backend must be one of"),
    ("temperature 0", {"temperature": 0.0}, ValueError, "temperature must be a positive"),
    ("temperature < 0", {"temperature": -1.0}, ValueError, "temperature"),
    ("softcap 0", {"softcap": 0.0}, ValueError, "softcap must be None or a positive"),
    ("softcap < 0", {"softcap": -30.0}, ValueError, "softcap"),
    (
        "logit_scale inf",
        {"logit_scale": float("inf")},
        ValueError,
        "logit_scale must be a finite number",
    ),
    ("ignore_index float", {"ignore_index": -100.0}, TypeError, "ignore_index must be an int"),
    ("ignore_index > int64", {"ignore_index": 2**63}, ValueError, "ignore_index must fit in int64"),
    (
        "D 0",
        {"hidden": torch.randn(B, T, 0), "weight": torch.randn(V, 0)},
        ValueError,
        "hidden size D >= 1",
    ),
]


@pytest.mark.parametrize("over,exc,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(over, exc, msg, backend):
    over = dict(over)
    over.setdefault("backend", backend)
    if backend == "triton" and not INTERPRET and over["backend"] == "triton":
        over["backend"] = "torch"  # argument checks come first; the CPU needs some backend
    args, kwargs = good(**over)
    with pytest.raises(exc) as info:
        dk.linear_logprobs(args["hidden"], args["weight"], args["labels"], args["bias"], **kwargs)
    assert msg in str(info.value)


def test_ignore_index_labels_are_not_errors():
    args, _ = good()
    args["labels"][0, :2] = -100
    args["labels"][1, 1] = 7
    dk.linear_logprobs(args["hidden"], args["weight"], args["labels"])
    args["labels"][args["labels"] == -100] = -1  # another ignore_index
    out = dk.linear_logprobs(
        args["hidden"], args["weight"], args["labels"], ignore_index=-1, return_stats=True
    )
    assert out.num_tokens.tolist() == [T - 2, T]


def test_cpp_backend_says_why_it_is_unavailable(monkeypatch):
    args, _ = good()
    monkeypatch.setenv("DPO_KERNELS_NO_CPP", "1")
    with pytest.raises(BackendUnavailable, match="disabled by DPO_KERNELS_NO_CPP=1"):
        dk.linear_logprobs(args["hidden"], args["weight"], args["labels"], backend="cpp")


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    """A CPU backend that cannot be built: "auto" warns once, says why, and still answers."""
    import warnings

    from dpo_kernels import backend, cpu

    args, _ = good()
    monkeypatch.setattr(cpu.BACKEND, "unavailable_reason", lambda *a: "no C++ compiler found")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="torch reference backend on CPU.*no C.. compiler"):
        first = dk.linear_logprobs(args["hidden"], args["weight"], args["labels"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = dk.linear_logprobs(args["hidden"], args["weight"], args["labels"])
    assert torch.equal(first, second)


def test_cpp_backend_rejects_float64():
    args, _ = good()
    with pytest.raises(TypeError, match="backend='cpp' takes float32"):
        dk.linear_logprobs(
            args["hidden"].double(), args["weight"].double(), args["labels"], backend="cpp"
        )


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, _ = good()
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        dk.linear_logprobs(args["hidden"], args["weight"], args["labels"], backend="triton")


def test_triton_backend_rejects_float64():
    if not INTERPRET:
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    args, _ = good()
    h, w = args["hidden"].double(), args["weight"].double()
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        dk.linear_logprobs(h, w, args["labels"], backend="triton")


def test_bad_chunk_budget(monkeypatch):
    args, _ = good()
    monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", "lots")
    with pytest.raises(ValueError, match="DPO_KERNELS_CHUNK_MB must be a number"):
        dk.linear_logprobs(args["hidden"], args["weight"], args["labels"])
    for bad in ("0", "-1", "inf", "nan", "-inf"):
        monkeypatch.setenv("DPO_KERNELS_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="DPO_KERNELS_CHUNK_MB must be positive"):
            dk.linear_logprobs(args["hidden"], args["weight"], args["labels"])
