"""``dpo-kernels bench``: dpo_kernels against every installed peer, on this machine's device.

Each (method, workload, shape, dtype) runs in its own process
(:func:`dpo_kernels.bench.run_method`): median time of the timed steps after warm-up, peak memory
of a step (CUDA: peak allocated above what lives between steps; CPU: peak resident size above the
same), and the loss, checked against ours. Missing or failing peers are rows with an ``error``,
never dropped. Each row also carries the workload's useful FLOPs and least memory traffic
(:func:`dpo_kernels.bench.methods.work`: ``6·Nv·D·V`` / ``8·Nv·D·V`` FLOPs over the ``Nv`` scored
tokens, the same for every method), the rate achieved, and that rate as a fraction of the GEMM
floor: before any method runs, the logits GEMM ``torch.mm [Nv × D]·[D × V]`` of each distinct
shape and dtype is timed alone in its own process (:func:`dpo_kernels.bench.measure_gemm`).
Writes ``results.json`` (schema below) and ``results.png`` to ``--out``, and prints one table per
shape.

Results JSON: top-level ``device``, ``torch``, ``triton``, ``dpo_kernels`` (versions; the peers'
too under ``versions``), ``command``, ``date``, ``floor`` (one entry per GEMM shape: ``hidden``,
``vocab``, ``rows``, ``dtype``, ``gflops``, ``median_ms``, ``times_ms``, or ``error``), ``rows``;
each row has ``method``, ``workload``, ``tokens``, ``hidden``, ``vocab``, ``dtype`` (e.g.
``"bfloat16"``), ``scored_tokens``, ``flops``, ``bytes``, and ``median_ms``, ``peak_mem_mb`` and
``gflops`` (``flops`` over the median time), or ``error``; plus ``preset``, ``softcap``, ``pairs``,
``seq_len``, ``times_ms``, ``first_step_mem_mb``, ``loss``, ``loss_rel_diff`` (against ours),
``check``, ``gemm_gflops`` (the floor at the row's shape) and ``gemm_frac`` (``gflops`` over it).
A ``dpo_step`` row of ours (``dpo_kernels``, ``dpo_kernels_recompute``) has ``loss_path``: the
path FusedLinearDPOLoss takes on its inputs (``"fast (k chunks)"`` or ``"recompute: <why>"``).
A ``trainer_step`` row (one optimizer step of a whole DPO trainer,
:mod:`dpo_kernels.bench.trainer_step`) has ``tokens`` (the padded batch, 2·pairs·seq_len),
``real_tokens``, ``pad_fraction``, ``scored_tokens``, ``prompt_tokens``, ``layers``,
``intermediate``, ``backbone_params`` and ``model_params``, and where its hidden size is not the
preset's, ``real_hidden`` and ``note``; its ``flops`` and ``bytes`` count the LM head only.
Older files may lack ``floor`` and the counts; the report shows "—" there.

Workloads: ``logprobs_fwd_bwd`` and ``dpo_step`` by default (a real-head preset on a CPU:
``dpo_step``); ``trainer_step`` only when named (``--workload trainer_step``), with its own
methods (``dpo_kernels``, ``dpo_kernels_recompute``, ``dpo_kernels_packed``, ``trl``), batch
(:data:`TRAINER_TOKENS`, :data:`TRAINER_SEQ_LEN`) and, on a CPU, hidden size
(:data:`TRAINER_HIDDEN`). ``dpo_kernels_recompute`` runs on ``dpo_step`` when ``--methods``
names it: the default job keeps its runs and its time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from . import measure_gemm, run_method
from .methods import (
    ALL_METHODS,
    ALL_WORKLOADS,
    DEFAULT_METHODS,
    METHODS,
    TRAINER_WORKLOAD,
    WORKLOADS,
    scored_tokens,
    work,
)
from .report import error_text
from .trainer_step import batch_counts, draw_lengths

#: Real LM heads: (hidden size D, vocab size V, final-logit softcap), tokens from TOKENS. A preset
#: with its own ``tokens``, ``seq_len`` and ``workloads`` is a fixed batch: W1 and W2 are one DPO
#: step on the CPU (4 pairs × 256 tokens at a small head; 2 pairs × 512 at a 128k vocab).
PRESETS = {
    "llama3-8b": dict(hidden=4096, vocab=128256, softcap=None),
    "qwen2.5-7b": dict(hidden=3584, vocab=152064, softcap=None),
    "gemma2-2b": dict(hidden=2304, vocab=256000, softcap=30.0),
    "mistral-7b": dict(hidden=4096, vocab=32768, softcap=None),
    "W1": dict(
        hidden=256, vocab=32000, softcap=None, tokens=(2048,), seq_len=256, workloads=("dpo_step",)
    ),
    "W2": dict(
        hidden=512, vocab=128256, softcap=None, tokens=(2048,), seq_len=512, workloads=("dpo_step",)
    ),
}
#: Tokens per step (chosen + rejected, prompt included) for a preset, scaled to the device: a
#: GPU runs real batch sizes; a 2-core CPU a few hundred tokens at the real D and V.
TOKENS = {"cuda": (2048, 4096, 8192, 16384), "cpu": (128,)}
SEQ_LEN = {"cuda": 1024, "cpu": 128}
#: Workloads of a real-head preset unless --workload says: on a CPU the DPO step alone, so that
#: the main job stays within five minutes on two cores (``--workload logprobs_fwd_bwd`` adds the
#: log-probs pass; each run of it at a real head costs about as much again).
PRESET_WORKLOADS = {"cuda": WORKLOADS, "cpu": ("dpo_step",)}
#: trainer_step on a preset (:mod:`dpo_kernels.bench.trainer_step`): tokens per step (the padded
#: batch, 2·pairs·seq_len), tokens of the longest sequence, and on a CPU the hidden size (the
#: vocab stays the preset's). It is never a default workload: each run builds and steps a whole
#: model (a minute or more on a 2-core CPU, several for stock TRL), so the default job leaves
#: it out; ``--workload trainer_step`` runs it.
TRAINER_TOKENS = {"cuda": (8192,), "cpu": (2048,)}
TRAINER_SEQ_LEN = {"cuda": 1024, "cpu": 256}
TRAINER_HIDDEN = {"cuda": None, "cpu": 1024}
#: --quick: one small sweep that finishes in about two minutes on a 2-core CPU.
QUICK = {
    "cuda": dict(preset="llama3-8b", tokens=(2048, 8192), workloads=WORKLOADS),
    "cpu": dict(hidden=256, vocab=32000, tokens=(256, 1024), workloads=("dpo_step",)),
}
DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
#: Loss agreement with ours that counts as a pass: fp32 everywhere is exact up to summation
#: order; 16-bit peers round the logits (ours accumulate in fp32), so their loss moves by ~1e-2.
CHECK_RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
#: Per-run limits on a device when not given: seconds of timed steps (``--budget``: the steps stop
#: once they have used it, at least one) and seconds before a run is stopped (``--timeout``; the
#: row then says how long its unfinished step had run). The CPU's keep the main job within five
#: minutes on two cores: a peer that needs minutes per step at a real head is cut at 30 s (or
#: twice the run's estimate at the measured GEMM rate, if longer), and not run again for a
#: workload that does more work at the same shape (:func:`known_too_slow`).
BUDGET = {"cuda": None, "cpu": 4.0}
TIMEOUT = {"cuda": 300.0, "cpu": 30.0}
#: Seconds a run's process takes beyond its steps (start, imports, inputs), for the estimate.
STARTUP_S = {"cuda": 15.0, "cpu": 5.0}
#: trainer_step: seconds before a run is stopped unless --timeout says (a whole model is built
#: and stepped), the seconds its building adds to the estimate, and its step time in units of
#: its counted (LM-head) FLOPs at the estimate's rate (backbone, optimizer and TRL's scoring of
#: every position are not counted).
TRAINER_TIMEOUT = {"cuda": 600.0, "cpu": 300.0}
TRAINER_STARTUP_S = {"cuda": 60.0, "cpu": 25.0}
TRAINER_STEP_FACTOR = 3.0
PEERS = ("triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers")


def cpu_info() -> tuple[str, Optional[set]]:
    """(model name, /proc/cpuinfo flags) of this machine's first CPU; flags None where unknown."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown CPU"
    return name, (set(info["flags"].split()) if "flags" in info else None)


#: The ISA flags the results record (and `dpo-kernels info` shows): which GEMM units a CPU has.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_record() -> dict:
    """What a CPU results file says of the machine: model, threads, the ISA flags of
    :data:`ISA_FLAGS` it has, and the C++ backend's bf16 path and L2 size."""
    name, flags = cpu_info()
    out = dict(
        model=name,
        threads=torch.get_num_threads(),
        isa=None if flags is None else [f for f in ISA_FLAGS if f in flags],
    )
    try:
        from .. import cpu

        out["cpp_bf16_path"] = cpu.bf16_path()[0]
        out["l2_bytes"] = cpu.l2_bytes()
    except Exception as e:  # no compiler: the record still names the CPU
        out["cpp_bf16_path"] = f"unavailable: {str(e)[:200]}"
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {cpu_info()[0]} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dpo_kernels": __version__,
    }
    for name in PEERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _split(tokens: int, seq_len: int) -> tuple[int, int]:
    """(pairs, seq_len) with 2·pairs·seq_len == tokens."""
    seq_len = min(seq_len, tokens // 2)
    if tokens % 2 or seq_len < 2 or tokens % (2 * seq_len):
        raise ValueError(
            f"--tokens {tokens}: use an even count that splits into pairs of "
            f"{seq_len}-token sequences (e.g. a multiple of {2 * seq_len})"
        )
    return tokens // (2 * seq_len), seq_len


def _trainer_shape(name, head: dict, tokens: int, seq_len: int, kind: str) -> dict:
    """A preset's trainer_step shape: its vocab; its hidden size unless :data:`TRAINER_HIDDEN`
    caps it on this device (the row then says so)."""
    cap = TRAINER_HIDDEN[kind]
    shape = dict(
        preset=name,
        hidden=head["hidden"],
        vocab=head["vocab"],
        softcap=head["softcap"],
        tokens=tokens,
        seq_len=seq_len,
        workloads=(TRAINER_WORKLOAD,),
    )
    if cap is not None and head["hidden"] > cap:
        shape.update(
            hidden=cap,
            real_hidden=head["hidden"],
            note=(
                f"hidden size {cap} instead of {name}'s {head['hidden']} on a {kind.upper()} "
                f"(vocab real): a D = {head['hidden']} model with its embedding and head under "
                "AdamW needs ~23 GB and minutes per step on two cores"
            ),
        )
    return shape


def plan(args, device: str) -> list[dict]:
    """Every (shape, dtype, workload, method) spec this invocation runs, ours first per shape."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtype or ()))
    dtypes = dtypes or ["bfloat16" if kind == "cuda" else "float32"]
    seq_len = args.seq_len or SEQ_LEN[kind]

    def shape(preset, head, tokens, seq, workloads):
        return dict(
            preset=preset,
            hidden=head["hidden"],
            vocab=head["vocab"],
            softcap=head.get("softcap"),
            tokens=tokens,
            seq_len=seq,
            workloads=tuple(workloads),
        )

    shapes = []
    if args.quick:
        quick = QUICK[kind]
        head = PRESETS[quick["preset"]] if "preset" in quick else quick
        shapes += [
            shape(quick.get("preset"), head, t, seq_len, args.workload or quick["workloads"])
            for t in args.tokens or quick["tokens"]
        ]
    elif args.hidden or args.vocab:
        if not (args.hidden and args.vocab and args.tokens):
            raise ValueError("a custom shape needs --tokens, --hidden and --vocab")
        head = dict(hidden=args.hidden, vocab=args.vocab, softcap=args.softcap)
        shapes += [shape(None, head, t, seq_len, args.workload or WORKLOADS) for t in args.tokens]
    else:
        for name in args.preset or ["llama3-8b"]:
            head = PRESETS[name]
            if "tokens" in head:
                if args.tokens or args.seq_len:
                    raise ValueError(
                        f"--preset {name} is a fixed batch ({head['tokens'][0]} tokens in "
                        f"sequences of {head['seq_len']}): drop --tokens/--seq-len, or give "
                        f"--hidden {head['hidden']} --vocab {head['vocab']} for a sweep"
                    )
                workloads = args.workload or head["workloads"]
                shapes += [shape(name, head, t, head["seq_len"], workloads) for t in head["tokens"]]
                continue
            workloads = args.workload or PRESET_WORKLOADS[kind]
            lm_head = [w for w in workloads if w != TRAINER_WORKLOAD]
            if lm_head:
                shapes += [
                    shape(name, head, t, seq_len, lm_head) for t in args.tokens or TOKENS[kind]
                ]
            if TRAINER_WORKLOAD in workloads:  # its own batch, and on a CPU a smaller D
                seq = args.seq_len or TRAINER_SEQ_LEN[kind]
                shapes += [
                    _trainer_shape(name, head, t, seq, kind)
                    for t in args.tokens or TRAINER_TOKENS[kind]
                ]
    specs = []
    for sh in shapes:
        pairs, seq = _split(sh["tokens"], sh["seq_len"])
        for dtype in dtypes:
            for workload in sh["workloads"]:
                extra = {}
                if workload == TRAINER_WORKLOAD:
                    # The drawn batch's counts (the worker draws the same lengths again).
                    extra = batch_counts(draw_lengths(pairs, seq), seq)
                    extra.update(
                        layers=args.layers,
                        intermediate=args.intermediate or 2 * sh["hidden"],
                        **{k: sh[k] for k in ("real_hidden", "note") if k in sh},
                    )
                    scored = extra.pop("scored_tokens")
                    extra.pop("tokens")  # 2·pairs·seq_len: the shape's own
                else:
                    scored = scored_tokens(pairs, seq)
                flops, nbytes = work(workload, scored, sh["hidden"], sh["vocab"], dtype)
                for method in args.methods or DEFAULT_METHODS[workload]:
                    specs.append(
                        dict(
                            method=method,
                            workload=workload,
                            preset=sh["preset"],
                            tokens=sh["tokens"],
                            hidden=sh["hidden"],
                            vocab=sh["vocab"],
                            softcap=sh["softcap"],
                            dtype=dtype,
                            pairs=pairs,
                            seq_len=seq,
                            device=device,
                            warmup=args.warmup,
                            repeats=args.repeats or (2 if args.quick else 3),
                            budget_s=args.budget if args.budget is not None else BUDGET[kind],
                            scored_tokens=scored,
                            flops=flops,
                            bytes=nbytes,
                            **extra,
                        )
                    )
    return specs


def floor_key(row: dict) -> tuple:
    """The GEMM floor a row (or a floor entry) belongs to."""
    return (row["hidden"], row["vocab"], row.get("rows", row.get("scored_tokens")), row["dtype"])


def _floor_text(f: dict) -> str:
    shape = f"torch.mm [{f['rows']:,} × {f['hidden']:,}]·[{f['hidden']:,} × {f['vocab']:,}]"
    got = (
        f"{f['gflops']:,.1f} GFLOP/s (median of {len(f['times_ms'])}, {f['median_ms']:,.1f} ms)"
        if "gflops" in f
        else f["error"]
    )
    return f"GEMM floor {shape} {f['dtype']}: {got}"


def _rates(row: dict, floor: Optional[dict]) -> None:
    """Achieved GFLOP/s of a timed row, and its fraction of the GEMM floor at its shape."""
    if "median_ms" not in row or "flops" not in row:
        return
    row["gflops"] = row["flops"] / (row["median_ms"] / 1e3) / 1e9
    if floor is not None and "gflops" in floor:
        row["gemm_gflops"] = floor["gflops"]
        row["gemm_frac"] = row["gflops"] / floor["gflops"]


def _check(row: dict, ours: Optional[dict]) -> None:
    """Each method's loss against ours on the same inputs."""
    if "loss" not in row or ours is None or "loss" not in ours or row is ours:
        return
    rel = abs(row["loss"] - ours["loss"]) / max(abs(ours["loss"]), 1e-12)
    row["loss_rel_diff"] = rel
    row["check"] = "ok" if rel <= CHECK_RTOL[row["dtype"]] else "differs from ours"


def _progress(total: float):
    """A bar over the run's estimated seconds (:func:`estimate_s`), so that its "remaining" is an
    estimate of the time left; ``None`` without tqdm."""
    try:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, plain lines (bar.write) in logs
        return tqdm(
            total=round(total, 1),
            unit="s",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left",
        )
    except ImportError:
        return None


def estimate_s(spec: dict, rate_gflops: float, timeout: float) -> float:
    """Predicted wall seconds of one run: process start, the warm-up and the timed steps (within
    the budget) at the workload's useful FLOPs over ``rate_gflops``, capped at the timeout. For a
    GEMM floor entry (no ``flops``), its calls at the GEMM's own FLOPs. A ``trainer_step`` run
    adds the model's building (:data:`TRAINER_STARTUP_S`) and takes :data:`TRAINER_STEP_FACTOR`
    times its counted FLOPs per step."""
    kind = "cuda" if spec["device"].startswith("cuda") else "cpu"
    startup = STARTUP_S[kind]
    if "flops" in spec:
        step = spec["flops"] / (rate_gflops * 1e9)
        if spec["workload"] == TRAINER_WORKLOAD:
            startup += TRAINER_STARTUP_S[kind]
            step *= TRAINER_STEP_FACTOR
        timed = spec["repeats"] * step
        if spec.get("budget_s") is not None:
            timed = min(timed, spec["budget_s"] + step)
        steps = spec["warmup"] * step + timed
    else:
        steps = min(7 * 2 * spec["rows"] * spec["hidden"] * spec["vocab"] / (rate_gflops * 1e9), 40)
    return min(startup + steps, timeout)


def _rate_guess(floors: dict, spec: dict, default: float) -> float:
    """The measured GEMM rate at a spec's shape where there is one, else ``default``; halved for
    the estimate (elementwise work, peers slower than the GEMM)."""
    f = floors.get(floor_key(spec))
    return 0.5 * (f["gflops"] if f is not None and "gflops" in f else default)


def _slow_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("method", "tokens", "hidden", "vocab", "dtype", "device"))


def known_too_slow(spec: dict, stopped: dict) -> Optional[dict]:
    """A ``dpo_step`` row not run because the same method's ``logprobs_fwd_bwd`` at the same
    shape was stopped inside its first (warm-up) step: a DPO step does that pass and more, so it
    would be stopped too; the row keeps that run's lower bound. None: run it."""
    prev = stopped.get(_slow_key(spec))
    if spec["workload"] != "dpo_step" or prev is None or prev["workload"] != "logprobs_fwd_bwd":
        return None
    return dict(
        spec,
        error=(
            "not run: its first logprobs_fwd_bwd step at this shape did not finish in time, "
            "and a dpo_step does that pass and more"
        ),
        step_lower_bound_ms=prev["step_lower_bound_ms"],
        unfinished_step="inferred",
    )


def run(args, argv) -> dict:
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    specs = plan(args, device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    timeout = args.timeout or TIMEOUT[kind]

    def run_timeout(spec: dict) -> float:
        """A run's default limit: the device's, or a whole trainer's for trainer_step."""
        if args.timeout:
            return args.timeout
        return TRAINER_TIMEOUT[kind] if spec["workload"] == TRAINER_WORKLOAD else timeout

    # One floor per GEMM shape in the run's dtype (each row's fraction). On a CPU also fp32 and
    # bf16 once per head, at its largest row count: which of them runs on matrix units (and how
    # much faster) tells CPU kinds apart, and on a CPU without bf16 units one bf16 GEMM of a real
    # head takes tens of seconds, so it is not repeated at every token count.
    gemms = dict.fromkeys(floor_key(s) for s in specs)
    if not device.startswith("cuda"):
        largest: dict[tuple, int] = {}
        for hidden, vocab, rows, _ in gemms:
            largest[(hidden, vocab)] = max(rows, largest.get((hidden, vocab), 0))
        for (hidden, vocab), rows in largest.items():
            gemms.update(dict.fromkeys((hidden, vocab, rows, dt) for dt in ("float32", "bfloat16")))
    gemms = list(gemms)
    v = versions()
    result = {
        "device": device_name(device),
        "torch": v["torch"],
        "triton": v["triton"],
        "dpo_kernels": v["dpo_kernels"],
        "versions": v,
        "command": " ".join(["dpo-kernels", *argv]),
        "cpu": cpu_record(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "memory": (
            "peak allocated (CUDA) or resident (CPU) memory of a timed step above what "
            "lives between steps"
        ),
        "counts": (
            "flops = 2·k·Nv·D·V, bytes = k·s·D·(V + Nv): Nv scored tokens, s bytes per "
            "element of dtype, k = 3 (logprobs_fwd_bwd) or 4 (dpo_step, and trainer_step's "
            "LM head: backbone and optimizer not counted); floor: torch.mm [Nv × D]·[D × V] "
            "alone, in its own process"
        ),
        "floor": [],
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_rate = 100_000.0 if kind == "cuda" else 100.0  # GFLOP/s until the floors are in
    # A floor's calls stop after the run's --budget too (CPU default 4 s): on a CPU without bf16
    # units one bf16 call of a real head takes 5-10 s, and the floor is one GEMM, not a step.
    budget = specs[0].get("budget_s") if specs else None
    gemm_specs = [
        dict(rows=rows, hidden=hidden, vocab=vocab, dtype=dtype, device=device)
        | ({} if budget is None else {"budget_s": budget})
        for hidden, vocab, rows, dtype in gemms
    ]

    def planned(floors: dict) -> list[float]:
        """Each GEMM floor's and run's estimated seconds (uncapped), at the rates known so far."""
        return [
            estimate_s(x, _rate_guess(floors, x, default_rate), float("inf"))
            for x in (*gemm_specs, *specs)
        ]

    limits = [timeout] * len(gemm_specs) + [run_timeout(x) for x in specs]
    raw = planned({})
    est = [min(r, t) for r, t in zip(raw, limits)]  # what the bar counts: none outlasts its limit
    bar = _progress(sum(est))
    say = bar.write if bar is not None else print
    say(
        f"dpo-kernels bench on {result['device']}: {len(gemms)} GEMM floor and {len(specs)} "
        f"method runs, each in its own process (timeout {timeout:.0f} s"
        + (
            f", trainer_step {TRAINER_TIMEOUT[kind]:.0f} s"
            if not args.timeout and any(x["workload"] == TRAINER_WORKLOAD for x in specs)
            else ""
        )
        + (f", timed steps cut after {budget:.0f} s" if budget is not None else "")
        + f"; estimated {sum(est) / 60:.1f} min) -> {out}/"
    )
    floors = {}
    for i, (hidden, vocab, rows, dtype) in enumerate(gemms):
        if bar is not None:
            bar.set_description(f"[{i + 1}/{len(gemms)}] GEMM floor D={hidden} V={vocab} {dtype}")
        got = measure_gemm(gemm_specs[i], timeout=timeout)
        entry = dict(hidden=hidden, vocab=vocab, rows=rows, dtype=dtype)
        entry.update({k: got[k] for k in ("gflops", "median_ms", "times_ms", "error") if k in got})
        floors[floor_key(entry)] = entry
        result["floor"].append(entry)
        say(_floor_text(entry))
        if bar is not None:
            bar.update(est[i])
    raw = planned(floors)  # re-estimate the method runs at the measured rates
    est = est[: len(gemms)] + [min(r, t) for r, t in zip(raw, limits)][len(gemms) :]
    if bar is not None and specs:
        bar.total = round(bar.n + sum(est[len(gemms) :]), 1)
        bar.refresh()
    ours = None
    stopped: dict[tuple, dict] = {}  # runs stopped inside their first (warm-up) step
    for k, spec in enumerate(specs, 1):
        if bar is not None:
            bar.set_description(
                f"[{k}/{len(specs)}] {spec['method']} {spec['workload']} {spec['tokens']} tok"
            )
        # Unless given, a run may take its estimate at the measured GEMM rate twice over (a slow
        # machine or a busy moment moves every method alike), never less than the default.
        limit = args.timeout or max(run_timeout(spec), 2 * raw[len(gemms) + k - 1])
        row = known_too_slow(spec, stopped) or run_method(spec, timeout=limit)
        if row.get("unfinished_step") == "warm-up":
            stopped[_slow_key(row)] = row
        if row["method"] == "dpo_kernels":
            ours = row
        elif ours is not None and any(
            ours[k_] != row[k_] for k_ in ("workload", "tokens", "hidden", "vocab", "dtype")
        ):
            ours = None  # a shape whose own dpo_kernels row was not selected
        _check(row, ours)
        _rates(row, floors.get(floor_key(row)))
        result["rows"].append(row)
        frac = f" ({row['gemm_frac']:4.0%} of GEMM)" if "gemm_frac" in row else ""
        partial = (
            f" ({row['timed_steps']} of {spec['repeats']} steps)" if row.get("partial") else ""
        )
        shown = (
            f"{row['median_ms']:10.1f} ms {row['gflops']:8.1f} GFLOP/s{frac} "
            f"{row['peak_mem_mb']:9.1f} MB{partial}"
            + (f"  loss {row['check']}" if "check" in row else "")
            if "median_ms" in row
            else error_text(row)
        )
        say(
            f"[{k}/{len(specs)}] {spec['workload']:16s} {spec['tokens']:6d} tok "
            f"{spec['method']:12s} {shown}"
        )
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")  # partial too
        if bar is not None:
            bar.update(est[len(gemms) + k - 1])
    if bar is not None:
        bar.close()
    return result


def plot(result: dict, path: Path) -> Optional[str]:
    """Time and memory against tokens, one line per method, one row of panels per shape group.
    Returns why no plot was written (matplotlib missing), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'dpo-kernels[bench]')"
    groups: dict[tuple, list] = {}
    for row in result["rows"]:
        key = (
            row.get("preset") or f"D={row['hidden']}, V={row['vocab']}",
            row["workload"],
            row["dtype"],
        )
        groups.setdefault(key, []).append(row)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    colors = dict(zip(ALL_METHODS, plt.get_cmap("tab10").colors))  # one per method throughout
    for (title, workload, dtype), (ax_t, ax_m) in zip(groups, axes):
        rows = groups[(title, workload, dtype)]
        for method in ALL_METHODS:
            pts = sorted(
                (r["tokens"], r["median_ms"], r["peak_mem_mb"])
                for r in rows
                if r["method"] == method and "median_ms" in r
            )
            if not pts:
                continue
            style = dict(
                marker="o",
                label=method,
                color=colors[method],
                lw=2.5 if method == "dpo_kernels" else 1.2,
            )
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            ax_m.plot([p[0] for p in pts], [max(p[2], 0.1) for p in pts], **style)
        ticks = sorted({r["tokens"] for r in rows})
        for ax, what in ((ax_t, "median step time (ms)"), (ax_m, "peak step memory (MB)")):
            ax.set(
                yscale="log",
                xlabel="tokens per step",
                ylabel=what,
                title=f"{title} · {workload} · {dtype}",
            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
    fig.suptitle(
        f"{result['device']} · torch {result['torch']} · dpo-kernels {result['dpo_kernels']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument(
        "--preset",
        action="append",
        choices=list(PRESETS),
        help="a real LM head, or W1/W2: one fixed CPU DPO step (repeatable; default llama3-8b)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help="tokens per step (a sweep; trainer_step: of the padded batch, default 8192 GPU, "
        "2048 CPU)",
    )
    p.add_argument("--hidden", type=int, help="hidden size D of a custom shape")
    p.add_argument("--vocab", type=int, help="vocab size V of a custom shape")
    p.add_argument("--softcap", type=float, help="final-logit softcap of a custom shape")
    p.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default 1024 GPU, 128 CPU; trainer_step: of the longest, "
        "default 1024 GPU, 256 CPU)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        help="one or more (default bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--workload",
        action="append",
        choices=list(ALL_WORKLOADS),
        help="repeatable; default logprobs_fwd_bwd and dpo_step (a real-head preset on a CPU: "
        "dpo_step); trainer_step (whole DPO trainers, one optimizer step) only when named",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(ALL_METHODS),
        help=f"default: each workload's own (LM head: {', '.join(METHODS)}; trainer_step: "
        f"{', '.join(DEFAULT_METHODS[TRAINER_WORKLOAD])}); dpo_kernels_recompute (the loss-level "
        "fast path off) joins dpo_step when named; a method a workload has no part in is a "
        "row saying so",
    )
    p.add_argument(
        "--layers", type=int, default=2, help="trainer_step: decoder layers of the model (2)"
    )
    p.add_argument(
        "--intermediate", type=int, help="trainer_step: MLP width of the model (default 2·D)"
    )
    p.add_argument("--quick", action="store_true", help="a small sweep (~2 min on a 2-core CPU)")
    p.add_argument("--repeats", type=int, help="timed steps per run (default 3; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds before a run is stopped (default 300 GPU, 30 CPU; trainer_step 600, 300)",
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of timed steps per run: fewer steps once used (default: none GPU, 4 CPU)",
    )
    p.add_argument("--out", default="dpo-kernels-bench", help="folder for results.json/.png")


def main(args, argv) -> int:
    from .report import markdown

    if args.methods and "dpo_kernels" not in args.methods:
        print(
            "note: without dpo_kernels in --methods there is no ratio and no loss check",
            file=sys.stderr,
        )
    try:
        result = run(args, argv)
    except ValueError as e:
        print(f"dpo-kernels bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print()
    print(markdown(result))
    why = plot(result, out / "results.png")
    print(
        f"results: {out / 'results.json'}"
        + (f", plot: {out / 'results.png'}" if why is None else f" (no plot: {why})")
    )
    return 0
