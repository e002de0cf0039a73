#!/usr/bin/env bash
# The whole GPU benchmark, on a GPU machine without network access.
#
#   benchmarks/gpu.sh prepare                 # here, with network: peers' wheels into .whl/
#   benchmarks/gpu.sh run [PRESET ...]        # there: CUDA tests + `dpo-kernels bench` per preset
#
# `prepare` downloads pure-Python wheels of the peers (and what they need beyond a stock
# CUDA torch image) for Python 3.12 into .whl/ (git-ignored via .git/info/exclude). `run`
# installs them into /tmp/site without touching the machine's torch/triton, runs the CUDA test
# suite, then the benchmark for each preset (default: all four), writing
# benchmarks/results/gpu/<preset>/results.{json,png} and the test log beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets dill multiprocess)
PY=${PYTHON:-python3}

case "${1:-run}" in
prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${PEERS[@]}"
    ls .whl
    ;;
run)
    shift || true
    presets=("$@")
    [ ${#presets[@]} -gt 0 ] || presets=(llama3-8b qwen2.5-7b gemma2-2b mistral-7b)
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        echo "no .whl/: peers that are not installed here become 'not run' rows" >&2
        export PYTHONPATH="$PWD"
    fi
    export PYTHONUNBUFFERED=1
    out=benchmarks/results/gpu
    mkdir -p "$out"
    "$PY" -m dpo_kernels info | tee "$out/info.txt"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_logprobs.py \
        tests/test_modules.py -k "cuda or not cpu" 2>&1 | tee "$out/cuda-tests.log" || true
    for preset in "${presets[@]}"; do
        "$PY" -m dpo_kernels bench --preset "$preset" --out "$out/$preset"
    done
    ;;
*)
    echo "usage: $0 prepare | run [PRESET ...]" >&2
    exit 2
    ;;
esac
