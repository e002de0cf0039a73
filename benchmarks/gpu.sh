#!/usr/bin/env bash
# The GPU benchmark in one command, on a GPU machine without network access, in under 8 minutes.
#
#   benchmarks/gpu.sh prepare   # here, with network: the peers' wheels into .whl/
#   benchmarks/gpu.sh run       # there: the steps below, into benchmarks/results/gpu-<device>/
#   benchmarks/gpu.sh dry       # the same steps on this CPU at tiny shapes (a few minutes),
#                               # into benchmarks/results/gpu-dry/ (git-ignored)
#
# `prepare` downloads pure-Python wheels of the peers (and what they need beyond a stock CUDA
# torch image) for Python 3.12 into .whl/ (git-ignored via .git/info/exclude). `run` installs
# them into /tmp/site without touching the machine's torch/triton, then runs, each step under its
# own time cap (printed first; their sum stays under 8 minutes):
#   1. `dpo-kernels info`                                               -> info.txt
#   2. the CUDA tests (pytest -k "cuda or triton_policy or triton_tile") -> cuda-tests.{log,xml}
#   3. benchmarks/gpu_probe.py: bf16 matmul rate (8192³ and the LM-head chunk), copy bandwidth,
#      per-kernel device times of linear_logprobs at the Llama-3-8B head next to cuBLAS doing
#      the same GEMMs                                                   -> probe.json
#   4. `dpo-kernels bench` at the Llama-3-8B head, 16,384 tokens per step, bf16, workloads
#      logprobs_fwd_bwd and dpo_step, against TRL's fused head, Liger, CCE, torch_lce and
#      naive, and ours with the loss-level path off (dpo_kernels_recompute: what the Triton
#      keep-logits kernels save; a failure, an OOM or a timeout is a row) -> bench/results.{json,png}
#   5. benchmarks/gpu_results.py: all of it in one file                 -> results.json
# A step that fails or reaches its cap is recorded (steps.tsv) and the next one runs.
# Environment: PYTHON (default python3), GPU_OUT (the output folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets dill multiprocess)
METHODS=(dpo_kernels dpo_kernels_recompute trl_chunked liger cce torch_lce naive)  # ours first
PY=${PYTHON:-python3}
T0=$SECONDS

usage() {
    echo "usage: $0 prepare | run | dry" >&2
    exit 2
}

# step NAME CAP_S LOG CMD...: CMD under a time cap (SIGINT, then SIGKILL 5 s later), its output
# shown and appended to LOG, one line in $out/steps.tsv.
STEP=0
step() {
    local name=$1 cap=$2 log=$3 rc t
    shift 3
    STEP=$((STEP + 1))
    echo "[gpu.sh: ${name}, step ${STEP}/${#CAPS[@]}, cap ${cap} s; $((SECONDS - T0)) s elapsed," \
        "at most $((TOTAL - USED)) s to go]"
    USED=$((USED + cap))
    t=$SECONDS
    set +e
    timeout -s INT -k 5 "$cap" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t))" "$cap" >> "$out/steps.tsv"
    [ "$rc" = 0 ] || echo "[gpu.sh: ${name} exited ${rc}$([ "$rc" = 124 ] && echo ': its cap')]"
}

mode=${1:-run}
[ $# -le 1 ] || usage
case "$mode" in
prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${PEERS[@]}"
    ls .whl
    exit 0
    ;;
run)
    # caps: info, tests, probe, bench, results; with the wheels' install (<= 30 s) and 5 s of
    # grace a step: at most 465 s
    CAPS=(20 90 90 190 15)
    if compgen -G ".whl/*.whl" > /dev/null; then
        timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        echo "no .whl/: peers that are not installed here become 'not run' rows" >&2
        export PYTHONPATH="$PWD"
    fi
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null) || {
        echo "$0 run: no CUDA device here (for this CPU: $0 dry)" >&2
        exit 1
    }
    slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' \
        -e 's/^-//' -e 's/-$//')
    out=${GPU_OUT:-benchmarks/results/gpu-${slug:-unknown}}
    # the CUDA test files first, torch.compile's (slowest to compile) last: a cap cuts the tail
    tests=(-k "cuda or triton_policy or triton_tile" tests/test_cuda.py tests/test_logprobs.py)
    for f in tests/test_*.py; do
        case $f in tests/test_cuda.py | tests/test_logprobs.py | tests/test_compile.py) ;;
        *) tests+=("$f") ;;
        esac
    done
    [ ! -f tests/test_compile.py ] || tests+=(tests/test_compile.py)
    bench=(--device cuda --preset llama3-8b --tokens 16384 --dtype bf16 --repeats 3 --timeout 60)
    probe=()
    ;;
dry)
    CAPS=(60 120 90 420 15)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    gpu="none (dry run on the CPU)"
    out=${GPU_OUT:-benchmarks/results/gpu-dry}
    tests=(-k cuda tests/test_cuda.py tests/test_logprobs.py)
    bench=(--device cpu --hidden 64 --vocab 1000 --tokens 256 --seq-len 64 --dtype fp32
        --repeats 1 --timeout 120)
    probe=(--dry)
    ;;
*)
    usage
    ;;
esac

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
TOTAL=0
for c in "${CAPS[@]}"; do TOTAL=$((TOTAL + c)); done
USED=0
rm -rf "$out"
mkdir -p "$out"
echo "benchmarks/gpu.sh $mode on ${gpu} -> $out/"
echo "time budget: info ${CAPS[0]} s, CUDA tests ${CAPS[1]} s, probe ${CAPS[2]} s," \
    "bench ${CAPS[3]} s, results ${CAPS[4]} s: at most ${TOTAL} s (+5 s grace a step)" \
    "after $((SECONDS - T0)) s of setup"

# DPO_KERNELS_NO_CPP for `info` on the GPU machine: no C++ build (the GPU run never uses it)
if [ "$mode" = run ]; then
    step info "${CAPS[0]}" "$out/info.txt" env DPO_KERNELS_NO_CPP=1 "$PY" -m dpo_kernels info
else
    step info "${CAPS[0]}" "$out/info.txt" "$PY" -m dpo_kernels info
fi
step cuda-tests "${CAPS[1]}" "$out/cuda-tests.log" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$out/cuda-tests.xml" "${tests[@]}"
step probe "${CAPS[2]}" "$out/probe.log" "$PY" benchmarks/gpu_probe.py --out "$out/probe.json" \
    "${probe[@]}"
step bench "${CAPS[3]}" "$out/bench.log" "$PY" -m dpo_kernels bench "${bench[@]}" \
    --workload logprobs_fwd_bwd --workload dpo_step --methods "${METHODS[@]}" --out "$out/bench"
step results "${CAPS[4]}" "$out/results.log" "$PY" benchmarks/gpu_results.py "$out" \
    --mode "$mode" --budget "$TOTAL"
echo "[gpu.sh $mode: done in $((SECONDS - T0)) s]"
