"""The one place that picks tile shapes, vocab splits and backward chunk sizes.

Forward and backward must recompute bit-identical logits, so both take their tile shapes from
:func:`tiles`, and vocab splits / backward chunks always start on a ``BLOCK_V`` boundary.
The GPU numbers are untuned starting points (sized for Hopper's register file and shared memory);
tuning them on a device is future work, tracked in benchmarks/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from ..backend import chunk_budget_bytes


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled_on_gpu(device: torch.device) -> bool:
    """True when kernels for ``device`` are compiled for a GPU rather than interpreted."""
    return device.type == "cuda" and not interpreting()


@dataclass(frozen=True)
class Tiles:
    block_n: int  # rows (tokens) per program
    block_v: int  # vocab columns per tile
    block_d: int  # hidden-dim step of the tl.dot loop
    num_warps: int
    num_stages: int
    interpreter: bool  # work around the interpreter's bf16 bugs (wrong tl.dot, truncating casts)
    precision: str  # tl.dot input_precision for fp32 operands


@dataclass(frozen=True)
class MatmulTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    interpreter: bool
    precision: str


def _fp32_precision() -> str:
    # Follow torch's own switch, so fp32 inputs get fp32 math unless the user allowed TF32.
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# (interpreter, fp32 on a GPU, 16-bit on a GPU). Small interpreter tiles keep the tests fast and
# still exercise many tiles and splits.
_FUSED = (
    Tiles(16, 64, 32, 4, 1, interpreter=True, precision="ieee"),
    Tiles(64, 128, 32, 8, 2, interpreter=False, precision="ieee"),
    Tiles(128, 128, 64, 8, 3, interpreter=False, precision="ieee"),
)
_MATMUL = (
    MatmulTiles(32, 32, 32, 4, 1, interpreter=True, precision="ieee"),
    MatmulTiles(64, 64, 32, 4, 3, interpreter=False, precision="ieee"),
    MatmulTiles(128, 128, 64, 8, 3, interpreter=False, precision="ieee"),
)


def _pick(table, dtype: torch.dtype, device: torch.device):
    interp, fp32, half = table
    if not compiled_on_gpu(device):
        return interp
    if dtype == torch.float32:
        return dataclasses.replace(fp32, precision=_fp32_precision())
    return half


def tiles(dtype: torch.dtype, device: torch.device) -> Tiles:
    """Tiles of the forward and logit-grad kernels (both must use the same)."""
    return _pick(_FUSED, dtype, device)


def matmul_tiles(dtype: torch.dtype, device: torch.device) -> MatmulTiles:
    """Tiles of the backward's dW / dH matmul kernel."""
    return _pick(_MATMUL, dtype, device)


def combine_block(device: torch.device) -> int:
    """Tokens per program of the forward's combine kernel (elementwise over tokens)."""
    return 1024 if compiled_on_gpu(device) else 128


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many forward programs keep the device busy (two waves on a GPU)."""
    if compiled_on_gpu(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 2 * _sm_count(index)
    return 8


def vocab_splits(n_rows: int, vocab: int, t: Tiles, device: torch.device) -> tuple[int, int]:
    """``(n_splits, split_size)``: split the vocab when too few row blocks fill the device.

    ``split_size`` is a multiple of ``block_v`` and every split is non-empty.
    """
    row_blocks = -(-n_rows // t.block_n)
    vocab_tiles = -(-vocab // t.block_v)
    want = -(-target_programs(device) // row_blocks)
    n_splits = max(1, min(want, vocab_tiles))
    split_size = -(-vocab_tiles // n_splits) * t.block_v
    return -(-vocab // split_size), split_size


def vocab_chunk(n_rows: int, vocab: int, itemsize: int, t: Tiles) -> int:
    """Vocab columns per backward chunk: one ``[n_rows × chunk]`` gradient block fits the budget."""
    cols = chunk_budget_bytes() // max(1, n_rows * itemsize)
    cols = max(t.block_v, cols // t.block_v * t.block_v)
    return min(cols, -(-vocab // t.block_v) * t.block_v)
