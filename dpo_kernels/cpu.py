"""The C++ CPU backend (``backend="cpp"``): loader of the ``csrc/`` extension and its
:class:`dpo_kernels.backend.Backend`.

The extension is built with ``torch.utils.cpp_extension.load`` (ninja) on first use, into a cache
keyed by the torch version, the source hash, the Python ABI and this CPU's instruction set, so a
rebuild happens only when one of them changes. Building takes about a minute and prints one line;
``dpo-kernels build`` builds it ahead of time. If it cannot be built (no compiler, no
ninja), ``backend="auto"`` falls back to the torch reference with one warning and
``backend="cpp"`` raises :class:`~dpo_kernels.backend.BackendUnavailable` saying why.

``DPO_KERNELS_CACHE`` sets the cache folder (default ``~/.cache/dpo_kernels``);
``DPO_KERNELS_NO_CPP=1`` disables the backend (``"auto"`` then uses the torch reference quietly).

bf16 inputs run bf16 GEMMs with fp32 accumulation on the CPU's bf16 units where it has them — AMX
tiles, or the AVX512-BF16 dot-product instructions (oneDNN's brgemm in ATen picks the unit) — the
"native" path; elsewhere they are widened to fp32 tiles ("widen"). :func:`bf16_path` says which and
why; ``DPO_KERNELS_CPU_BF16=native`` or ``=widen`` forces one (``native`` raises where the CPU
lacks the units; ``amx`` is an older name for ``native``), so both are tested and timed on one
machine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import sysconfig
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .backend import Backend, BackendUnavailable, Grads, TokenResult, chunk_budget_bytes, register

__all__ = [
    "BACKEND",
    "BF16_PATHS",
    "BackendUnavailable",
    "CppBackend",
    "Plan",
    "bf16_path",
    "bf16_units",
    "load",
    "plan",
]

SOURCES = ("linear_logprobs.cpp",)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Columns of the vocabulary per chunk: the [Nv x Vc] fp32 buffer stays small (a few MB for
# thousands of tokens) while each GEMM is still large enough to run at full speed.
DEFAULT_CHUNK_V = 512
# Rows per tile: a [rows x Vc] fp32 tile of 512 KiB fits a core's L2 with the head chunk's rows.
TILE_ROWS = 256
# -fno-trapping-math lets the row loops (and exp's clamp) vectorise; NaNs are counted explicitly.
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
)

_lock = threading.Lock()
_module = None
_error: Optional[str] = None


def _source_dir() -> Path:
    # An installed package carries csrc/ next to dpo_kernels/ (package data) or in the checkout.
    for d in (Path(__file__).resolve().parent / "csrc", CSRC):
        if all((d / s).is_file() for s in SOURCES):
            return d
    raise BackendUnavailable(f"the C++ sources ({', '.join(SOURCES)}) are not installed")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_key(src: Path) -> str:
    h = hashlib.sha256()
    for s in SOURCES:
        h.update((src / s).read_bytes())
    for part in (torch.__version__, sys.version, sysconfig.get_platform(), _cpu_flags(), *CFLAGS):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("DPO_KERNELS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dpo_kernels"
    )
    return Path(root)


# torch's loader guards a build with a file named "lock" in the build folder (its FileBaton:
# created with O_EXCL, deleted when the build ends, and waited on by polling until it is gone).
# A build that is killed leaves it behind and every later build waits on it forever. So every
# build here first takes an flock on _FLOCK_NAME in the same folder: the kernel drops an flock
# when its owner dies, so it never goes stale, and while we hold it a "lock" can only be stale.
_FLOCK_NAME = "build.flock"
_TORCH_LOCK_NAME = "lock"
# How long to wait for another process's build; DPO_KERNELS_BUILD_TIMEOUT (seconds) overrides it.
_BUILD_TIMEOUT_S = 15 * 60
_POLL_S = 0.2


def _build_timeout() -> float:
    raw = os.environ.get("DPO_KERNELS_BUILD_TIMEOUT", "")
    if not raw:
        return float(_BUILD_TIMEOUT_S)
    try:
        return float(raw)
    except ValueError:
        raise BackendUnavailable(
            f"DPO_KERNELS_BUILD_TIMEOUT must be a number of seconds, got {raw!r}"
        ) from None


def _acquire_build_flock(build_dir: Path) -> Optional[int]:
    """Take an exclusive flock on ``build_dir/build.flock`` (one build of a build folder at a
    time on this machine) and return its descriptor, for :func:`_release_build_flock`. Waits,
    saying so once, for another process's build, up to ``DPO_KERNELS_BUILD_TIMEOUT`` seconds.
    Without fcntl (Windows) or flock (some network filesystems) it locks nothing: None."""
    try:
        import fcntl
    except ImportError:
        return None
    import time

    path = build_dir / _FLOCK_NAME
    timeout = _build_timeout()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            except OSError:  # no flock on this filesystem: build unlocked, as torch alone would
                os.close(fd)
                return None
            if not waited:
                waited = True
                print(
                    "dpo_kernels: waiting for another process building the C++ backend in "
                    f"{build_dir} (up to {timeout:g} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if time.monotonic() - start >= timeout:
                raise BackendUnavailable(
                    f"waited {timeout:g} s for another process building the C++ backend in "
                    f"{build_dir} (it holds {path}); set DPO_KERNELS_BUILD_TIMEOUT to wait longer"
                )
            time.sleep(_POLL_S)
    except BaseException:
        os.close(fd)
        raise


def _release_build_flock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file drops its flock


def _remove_stale_torch_lock(build_dir: Path) -> None:
    # Called with the flock held: no live dpo_kernels build owns a torch "lock" now.
    lock = build_dir / _TORCH_LOCK_NAME
    if lock.exists():
        try:
            lock.unlink()
        except FileNotFoundError:
            return
        print(
            f"dpo_kernels: removed {lock}, left by a build that was interrupted; building again",
            file=sys.stderr,
            flush=True,
        )


def _load_built(name: str, built: Path):
    """The module at ``built`` if it exists and loads, else None."""
    if not built.exists():
        return None
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):  # e.g. a link cut short: let ninja rebuild it
        return None


def _build():
    from torch.utils import cpp_extension

    src = _source_dir()
    key = _build_key(src)
    build_dir = _cache_dir() / f"cpu-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"dpo_kernels_cpu_{key}"
    built = build_dir / f"{name}.so"
    # The key covers sources, flags, torch and CPU: a built module needs no lock, nor ninja (~2 s).
    module = _load_built(name, built)
    if module is not None:
        return module
    fd = _acquire_build_flock(build_dir)
    try:
        module = _load_built(name, built)  # another process may have built it meanwhile
        if module is not None:
            return module
        if fd is not None:
            _remove_stale_torch_lock(build_dir)
        print(
            f"dpo_kernels: building the C++ CPU backend once (about a minute) in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
        return cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in SOURCES],
            build_directory=str(build_dir),
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    finally:
        _release_build_flock(fd)


def load():
    """The compiled extension; built on first use. Raises :class:`BackendUnavailable` with the
    reason if it cannot be built."""
    global _module, _error
    if os.environ.get("DPO_KERNELS_NO_CPP", "0") == "1":
        raise BackendUnavailable("backend='cpp' is disabled by DPO_KERNELS_NO_CPP=1")
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _build()
            except BackendUnavailable as e:
                _error = str(e)
            except Exception as e:  # compiler, ninja or linker missing or failing
                first = str(e).strip().splitlines()[:1] or [type(e).__name__]
                _error = f"building the C++ CPU backend failed: {first[0][:300]}"
    if _module is None:
        raise BackendUnavailable(f"backend='cpp' is not available: {_error}")
    return _module


BF16_PATHS = ("native", "widen")
_UNIT_NAMES = {"amx": "AMX tiles", "avx512_bf16": "AVX512-BF16 dot-product instructions"}


def bf16_units() -> str:
    """The bf16 units the native path runs on here: ``"amx"``, ``"avx512_bf16"`` or ``""``
    (none, or oneDNN's brgemm failed the extension's self-test on this CPU)."""
    return str(load().bf16_units())


def bf16_path() -> tuple[str, str]:
    """``(path, why)``: how the C++ backend runs bf16 inputs here — ``"native"`` (bf16 GEMMs on
    the CPU's bf16 units, fp32 accumulation) or ``"widen"`` (fp32 GEMMs on widened tiles)."""
    forced = os.environ.get("DPO_KERNELS_CPU_BF16", "auto")
    forced = "native" if forced == "amx" else forced
    if forced not in ("auto", *BF16_PATHS):
        raise ValueError(f"DPO_KERNELS_CPU_BF16 must be auto, native or widen, got {forced!r}")
    units = bf16_units()
    if forced == "widen":
        return "widen", "forced by DPO_KERNELS_CPU_BF16=widen"
    if forced == "native":
        if not units:
            raise BackendUnavailable(
                "DPO_KERNELS_CPU_BF16=native: this CPU has no bf16 units that oneDNN's brgemm "
                "runs on (neither AMX nor AVX512-BF16); unset it or use widen"
            )
        return "native", f"forced by DPO_KERNELS_CPU_BF16; on {_UNIT_NAMES[units]}"
    if units:
        return "native", f"bf16 GEMMs on this CPU's {_UNIT_NAMES[units]}"
    return "widen", "this CPU has no bf16 units (AMX, AVX512-BF16): fp32 GEMMs are faster"


def _native(dtype: torch.dtype, dim: int) -> bool:
    # An odd D has no whole pairs for brgemm's VNNI layout: widen (no real head has one).
    return dtype == torch.bfloat16 and dim % 2 == 0 and bf16_path()[0] == "native"


SPLITS = ("rows", "vocab")


@functools.cache
def l2_bytes() -> int:
    """This CPU's per-core L2 size from sysfs (Linux), else 1 MiB; read once (every call's
    tile policy asks)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                mult = {"K": 2**10, "M": 2**20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 2**20


class Plan(NamedTuple):
    """How one call's work is cut: vocabulary chunks of ``chunk_v`` columns, row tiles of
    ``tile_rows`` rows, and which of the two the threads share out (``split``: ``"rows"`` or
    ``"vocab"``)."""

    chunk_v: int
    tile_rows: int
    split: str


def plan(n_rows: int, vocab: int, dim: int, native: bool, threads: Optional[int] = None) -> Plan:
    """The tile policy of one call (read at run time: thread count, L2 size, memory budget).

    - Row tiles of at most TILE_ROWS rows. With at least a full tile per thread the threads
      share out the row tiles, walking the vocabulary chunk by chunk together (``"rows"``).
    - With fewer rows (a short batch: 96 scored tokens), splitting them would leave each thread
      a thin tile (48 rows on 2 threads) whose GEMMs run below the machine's rate, so the threads
      share out the vocabulary chunks instead, each walking all rows (``"vocab"``): its tiles
      keep all rows, its dW and db chunks are written whole, and it adds dH into its own
      [rows × D] fp32 partial (summed in thread order). Where those partials would exceed the
      memory budget (``DPO_KERNELS_CHUNK_MB``), or there are too few chunks to share, rows.
      The widening path only: the native path's brgemm tiles are cut by 64-column blocks.
    - Chunks of at most DEFAULT_CHUNK_V columns, fewer where the [tile × chunk] fp32 tile would
      not fit half the L2, or the [rows × chunk] buffer the memory budget.

    ``DPO_KERNELS_CPU_SPLIT=rows|vocab`` forces the split (where it can run), for tests and
    timing."""
    threads = max(1, threads or torch.get_num_threads())
    forced = os.environ.get("DPO_KERNELS_CPU_SPLIT", "auto")
    if forced not in ("auto", *SPLITS):
        raise ValueError(f"DPO_KERNELS_CPU_SPLIT must be auto, rows or vocab, got {forced!r}")
    budget = chunk_budget_bytes()

    def cut(split: str) -> Plan:
        if split == "vocab":
            tile_rows = min(TILE_ROWS, max(1, n_rows))
        else:
            rounds = -(-n_rows // (threads * TILE_ROWS))  # tiles per thread at TILE_ROWS rows
            tile_rows = max(1, min(TILE_ROWS, -(-n_rows // (threads * max(1, rounds)))))
        by_l2 = (l2_bytes() // 2) // (4 * tile_rows)
        by_budget = budget // max(1, 4 * n_rows)
        chunk_v = max(1, min(vocab, DEFAULT_CHUNK_V, max(64, by_l2), by_budget))
        return Plan(int(chunk_v), int(tile_rows), split)

    if native or forced == "rows":
        return cut("rows")
    by_vocab = cut("vocab")
    if forced == "vocab":
        return by_vocab
    few_rows = threads > 1 and n_rows < threads * TILE_ROWS
    fits = threads * n_rows * dim * 4 <= budget
    enough_chunks = -(-vocab // by_vocab.chunk_v) >= 4 * threads
    return by_vocab if few_rows and fits and enough_chunks else cut("rows")


class CppBackend(Backend):
    """fp32, bf16 and fp16 inputs with fp32 accumulation, threaded over L2-sized row tiles."""

    name = "cpp"

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        if device.type != "cpu":
            return f"backend='cpp' runs on CPU tensors; got tensors on {device.type!r}"
        try:
            load()
        except BackendUnavailable as e:
            return str(e)
        if dtype == torch.float64:
            return (
                "backend='cpp' takes float32, bfloat16 or float16; float64 runs on "
                "backend='torch' (or 'auto')"
            )
        return None

    def forward(self, x, opts, with_stats) -> TokenResult:
        return TokenResult(*self._forward(x, opts, with_stats, keep=False))

    keeps_logits = True

    def forward_kept(self, x, opts, with_stats):
        *outs, kept = self._forward(x, opts, with_stats, keep=True)
        return TokenResult(*outs), kept

    def _forward(self, x, opts, with_stats, keep: bool):
        hidden, weight, bias, rows, labels, _ = x
        native = _native(hidden.dtype, weight.shape[1])
        cut = plan(rows.shape[0], weight.shape[0], weight.shape[1], native)
        return load().forward(
            hidden,
            weight,
            bias,
            labels,
            rows,
            opts.pre_scale,
            opts.post_scale,
            opts.has_softcap,
            with_stats,
            cut.chunk_v,
            cut.tile_rows,
            native,
            cut.split == "vocab",
            keep,
        )

    def backward(self, x, norm, grad, opts, needs) -> Grads:
        return self._backward(x, None, norm, grad, opts, needs)

    def backward_kept(self, x, kept, norm, grad, opts, needs) -> Grads:
        return self._backward(x, kept, norm, grad, opts, needs)

    def _backward(self, x, kept, norm, grad, opts, needs) -> Grads:
        hidden, weight, bias, rows, labels, _ = x
        native = _native(hidden.dtype, weight.shape[1])
        cut = plan(rows.shape[0], weight.shape[0], weight.shape[1], native)
        grads = load().backward(
            hidden,
            weight,
            bias,
            labels,
            rows,
            norm,
            grad,
            opts.pre_scale,
            opts.post_scale,
            opts.has_softcap,
            *needs,
            cut.chunk_v,
            cut.tile_rows,
            native,
            cut.split == "vocab",
            kept,
        )
        return Grads(*(g if need else None for g, need in zip(grads, needs)))


BACKEND = register(CppBackend())
