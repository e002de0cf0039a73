"""The one tuning policy of the Triton backend: every launch setting comes from here.

- :class:`Config` is the one config type (tiles, warps, stages, program-order group) of every
  kernel: ``"fused"`` (the forward partial kernel *and* the backward logit-grad kernel: both must
  recompute bit-identical logits, so they share one config, chosen once per call by the forward)
  and ``"combine"`` (the forward's per-token merge of vocab splits).
- :data:`TABLE` holds the shipped configs keyed by ``(kernel, dtype, capability)``; a capability
  with no entry falls back to the nearest lower one of the same family, then to ``"default"``.
  ``"interp"`` is the interpreter (small tiles keep the CPU tests fast and still exercise many
  tiles, splits and groups).
- Every config is checked against the device's limits (:class:`Limits`: shared memory per block,
  registers) before it is used or tuned over; ``tests/aot_compile.py`` compiles each shipped one
  for sm_90 and fails on spills or shared-memory overflow.
- ``DPO_KERNELS_AUTOTUNE=1`` (read when the call is made, saved with the call's options) times a
  pruned candidate list once per bucketed shape ``(next_pow2(Nv), D, V, dtype, TF32)`` and keeps
  the fastest; the backward looks the same key up and never tunes, so forward and backward use
  the same config even if the variable changes in between.

Program order (L2 reuse). Programs that run at the same time should read the same H row blocks:

- forward: the vocab-split index varies fastest (``pid % n_splits``), so the resident programs
  hold ``resident / n_splits`` row blocks, each re-read from L2 across its split's vocab tiles.
  :func:`vocab_splits` takes at least enough splits that those live H blocks fill at most half
  the L2, and enough programs to fill the device twice.
- logit-grad: a grouped order over (row blocks × vocab tiles): ``group`` row blocks run down a
  column of vocab tiles together. Live bytes are ``group·BLOCK_N·D + (resident/group)·BLOCK_V·D``
  (times the item size), smallest at ``group ≈ sqrt(resident·BLOCK_V/BLOCK_N)``:
  :func:`grad_group` takes the power of two that minimises it (16 at the Llama-3-8B head in
  bf16 on an H100: ~26 MiB live, half its 50 MiB L2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..backend import chunk_budget_bytes


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled_on_gpu(device: torch.device) -> bool:
    """True when kernels for ``device`` are compiled for a GPU rather than interpreted."""
    return device.type == "cuda" and not interpreting()


@dataclass(frozen=True)
class Config:
    """Launch settings of one kernel. For ``"combine"`` only ``block_n`` (tokens per program) and
    ``num_warps`` mean anything."""

    block_n: int  # rows (tokens) per program
    block_v: int = 1  # vocab columns per tile
    block_d: int = 1  # hidden-dim step of the tl.dot loop
    num_warps: int = 4
    num_stages: int = 1
    group: int = 0  # logit-grad row blocks per group (0: from the L2 rule)

    def key(self) -> str:
        return (
            f"{self.block_n}x{self.block_v}x{self.block_d}"
            f"w{self.num_warps}s{self.num_stages}g{self.group}"
        )

    def shared_bytes(self, itemsize: int) -> int:
        """Shared memory of the pipelined H and W tiles (the compiler's dominant allocation)."""
        return self.num_stages * (self.block_n + self.block_v) * self.block_d * itemsize

    def accumulator_registers(self) -> int:
        """fp32 registers per thread for the ``[block_n × block_v]`` logits accumulator."""
        return self.block_n * self.block_v // (32 * self.num_warps)


@dataclass(frozen=True)
class Limits:
    """What a config must fit on one device."""

    shared_per_block: int  # bytes of shared memory one block may opt into
    l2_bytes: int
    sms: int
    max_threads: int = 1024
    max_accumulator_registers: int = 128  # of 255 per thread; the rest hold operands/addresses


#: Known devices by capability, so configs can be checked (and compiled) without a GPU.
KNOWN_LIMITS = {
    (9, 0): Limits(232448, 50 * 2**20, 132),  # H100 (H200: 60 MiB L2, same SMs)
    (8, 0): Limits(166912, 40 * 2**20, 108),  # A100
    (8, 9): Limits(101376, 72 * 2**20, 128),  # L40S / RTX 4090 class
    (8, 6): Limits(101376, 6 * 2**20, 84),
}
#: The interpreter: no real limits, small "device" so tests see several splits and groups.
INTERP_LIMITS = Limits(2**31, 64 * 2**10, 4)


# (kernel, dtype, capability) -> Config. 16-bit dtypes share entries ("half").
TABLE: dict[tuple[str, str, object], Config] = {
    ("fused", "half", "interp"): Config(16, 64, 32, 4, 1, group=2),
    ("fused", "fp32", "interp"): Config(16, 64, 32, 4, 1, group=2),
    ("combine", "any", "interp"): Config(128),
    # Hopper: wgmma m64n128k16, cp.async, 229 registers, no spills [sm_90 compile].
    ("fused", "half", (9, 0)): Config(128, 128, 64, 8, 3),
    # fp32: a 32-wide D step at 64x128, 8 warps spills with stats (FMA dot) [sm_90 compile];
    # a 16-wide step does not (216 registers; 174 with TF32).
    ("fused", "fp32", (9, 0)): Config(64, 128, 16, 8, 2),
    ("fused", "half", (8, 0)): Config(128, 128, 64, 8, 3),
    ("fused", "fp32", (8, 0)): Config(64, 128, 16, 8, 2),
    ("fused", "half", "default"): Config(64, 128, 32, 4, 2),
    ("fused", "fp32", "default"): Config(32, 64, 32, 4, 2),
    ("combine", "any", "default"): Config(1024),
}

#: Autotune candidates (pruned by :func:`check` against the device before timing).
CANDIDATES = {
    "gpu": tuple(
        Config(bn, bv, bd, w, s)
        for bn in (64, 128)
        for bv in (64, 128, 256)
        for bd in (32, 64)
        for w in (4, 8)
        for s in (2, 3, 4)
    ),
    "interp": (Config(16, 64, 32, 4, 1, group=2), Config(32, 32, 16, 4, 1, group=2)),
}


def _dtype_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def capability(device: torch.device):
    """``"interp"`` when interpreted, else the CUDA ``(major, minor)`` of ``device``."""
    if not compiled_on_gpu(device):
        return "interp"
    return torch.cuda.get_device_capability(device)


@functools.cache
def _cuda_limits(index: int) -> Limits:
    p = torch.cuda.get_device_properties(index)
    shared = getattr(p, "shared_memory_per_block_optin", 0) or 49152
    l2 = getattr(p, "L2_cache_size", 0) or 40 * 2**20
    return Limits(shared, l2, p.multi_processor_count)


def limits(device: torch.device) -> Limits:
    if not compiled_on_gpu(device):
        return INTERP_LIMITS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_limits(index)


def check(cfg: Config, dtype: torch.dtype, lim: Limits) -> Optional[str]:
    """None if ``cfg`` fits the device, else why not (used before launching or tuning)."""
    item = 4 if dtype == torch.float32 else 2
    if cfg.num_warps * 32 > lim.max_threads:
        return f"{cfg.num_warps} warps exceed {lim.max_threads} threads per block"
    if cfg.shared_bytes(item) > lim.shared_per_block:
        return f"{cfg.shared_bytes(item)} B of shared memory > {lim.shared_per_block} B"
    if cfg.accumulator_registers() > lim.max_accumulator_registers:
        return (
            f"{cfg.accumulator_registers()} accumulator registers per thread > "
            f"{lim.max_accumulator_registers} (it would spill)"
        )
    return None


def lookup(kernel: str, dtype: torch.dtype, cap) -> Config:
    """The shipped config of ``kernel`` for ``dtype`` on a device of capability ``cap``."""
    dkey = "any" if kernel == "combine" else _dtype_key(dtype)
    keys = [cap]
    if isinstance(cap, tuple):  # same major, lower minor (e.g. sm_90a -> sm_90), then default
        keys += [(cap[0], m) for m in range(cap[1] - 1, -1, -1)]
    keys.append("default")
    for k in keys:
        cfg = TABLE.get((kernel, dkey, k))
        if cfg is not None:
            return cfg
    raise KeyError(f"no {kernel!r} config for {dtype} on {cap}")


def fp32_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: fp32 operands use TF32 only if the call allowed it (fp32
    without TF32 runs on FMA units, no tensor cores); 16-bit operands ignore it."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


# ----------------------------------------------------------------------------- fused config

_TUNED: dict[tuple, Config] = {}  # append-only: a key, once tuned, keeps its config


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tune_key(dtype, device, n_rows: int, dim: int, vocab: int, allow_tf32: bool) -> tuple:
    return (str(dtype), capability(device), _bucket(n_rows), dim, vocab, allow_tf32)


def fused_config(
    dtype: torch.dtype,
    device: torch.device,
    n_rows: int,
    dim: int,
    vocab: int,
    *,
    allow_tf32: bool,
    autotune: bool,
    bench: Optional[Callable[[Config], float]] = None,
) -> Config:
    """The config of the forward partial and logit-grad kernels for one call.

    With ``autotune`` the tuned config of the shape's bucket if there is one; if there is none
    and ``bench`` is given (only the forward passes it), every candidate that fits the device is
    timed with ``bench(cfg) -> seconds`` and the fastest is kept for the bucket.
    """
    cap = capability(device)
    if autotune:
        key = tune_key(dtype, device, n_rows, dim, vocab, allow_tf32)
        hit = _TUNED.get(key)
        if hit is not None:
            return hit
        if bench is not None:
            cfg = _tune(dtype, device, bench)
            _TUNED[key] = cfg
            return cfg
    return _fitting(lookup("fused", dtype, cap), dtype, device)


def _fitting(cfg: Config, dtype: torch.dtype, device: torch.device) -> Config:
    """``cfg`` if it fits this device, else the largest candidate that does (a device smaller
    than the table's entry for its capability family)."""
    lim = limits(device)
    if check(cfg, dtype, lim) is None:
        return cfg
    pool = CANDIDATES["interp" if capability(device) == "interp" else "gpu"]
    fits = [c for c in pool if check(c, dtype, lim) is None]
    if not fits:
        raise RuntimeError(f"no Triton config fits this device ({lim}): {check(cfg, dtype, lim)}")
    return max(fits, key=lambda c: (c.block_n * c.block_v, c.block_d, -c.num_stages))


def _tune(dtype, device, bench) -> Config:
    lim = limits(device)
    pool = CANDIDATES["interp" if capability(device) == "interp" else "gpu"]
    fits = [c for c in pool if check(c, dtype, lim) is None]
    best, best_t = None, math.inf
    for cfg in fits:
        try:
            t = bench(cfg)
        except Exception:  # noqa: BLE001 - a config the compiler or device rejects is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return (
        best
        if best is not None
        else _fitting(lookup("fused", dtype, capability(device)), dtype, device)
    )


def time_call(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


#: Logits per thread above which the forward that also writes its logits (the loss-level path)
#: spills on sm_90: the store's 64-bit pointer per logit lives beside the fp32 accumulator. The
#: shipped bf16 tile 128×128 with 8 warps (64 logits per thread) compiles to 255 registers and
#: 80–120 bytes of stack with the store; 64×128 (32 per thread) to 182–216 and no spill
#: (tests/aot_compile.py, Triton 3.9, sm_90). fp32 on the FMA path (no TF32) holds its operand
#: tiles in registers too: 64×128 spills 8 bytes there, 32×128 does not.
KEEP_LOGITS_PER_THREAD = 32


def keep_config(cfg: Config, fma: bool = False) -> Config:
    """The forward's config when it also writes its logits: ``cfg`` with fewer rows per program
    until the tile is at most :data:`KEEP_LOGITS_PER_THREAD` logits per thread (half that on the
    fp32 FMA path, ``fma``)."""
    most = KEEP_LOGITS_PER_THREAD // (2 if fma else 1)
    while cfg.accumulator_registers() > most and cfg.block_n > 16:
        cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    return cfg


def combine_config(device: torch.device) -> Config:
    return lookup("combine", torch.float32, capability(device))


# ----------------------------------------------------------------------------- order and sizes


def resident_programs(cfg: Config, lim: Limits) -> int:
    """Programs of the fused kernels resident at once: 1 per SM at 8 warps (229 registers),
    2 per SM at 4 warps or fewer [sm_90 compile]."""
    per_sm = 1 if cfg.num_warps >= 8 else 2
    return per_sm * lim.sms


def vocab_splits(
    n_rows: int, vocab: int, dim: int, itemsize: int, cfg: Config, device
) -> tuple[int, int]:
    """``(n_splits, split_size)`` of the forward; ``split_size`` is a multiple of ``block_v``
    and every split is non-empty. Enough splits to fill the device twice, and enough that the
    row blocks resident together hold at most half the L2 (see the module docstring)."""
    lim = device if isinstance(device, Limits) else limits(device)
    resident = resident_programs(cfg, lim)
    row_blocks = -(-n_rows // cfg.block_n)
    vocab_tiles = -(-vocab // cfg.block_v)
    fill = -(-2 * resident // row_blocks)
    h_block = cfg.block_n * dim * itemsize
    l2_rule = -(-resident * h_block // max(1, lim.l2_bytes // 2))
    n_splits = max(1, min(max(fill, l2_rule), vocab_tiles))
    split_size = -(-vocab_tiles // n_splits) * cfg.block_v
    return -(-vocab // split_size), split_size


def grad_group(cfg: Config, dim: int, itemsize: int, device) -> int:
    """Row blocks per group in the logit-grad kernel's order (see the module docstring);
    ``device`` a device or its :class:`Limits`."""
    if cfg.group:
        return cfg.group
    lim = device if isinstance(device, Limits) else limits(device)
    resident = resident_programs(cfg, lim)

    def live(g):
        return (g * cfg.block_n + -(-resident // g) * cfg.block_v) * dim * itemsize

    return min((1 << k for k in range(8)), key=live)


def vocab_chunk(n_rows: int, vocab: int, itemsize: int, cfg: Config) -> int:
    """Vocab columns per backward chunk: one ``[n_rows × chunk]`` gradient block fits the budget."""
    cols = chunk_budget_bytes() // max(1, n_rows * itemsize)
    cols = max(cfg.block_v, cols // cfg.block_v * cfg.block_v)
    return min(cols, -(-vocab // cfg.block_v) * cfg.block_v)
