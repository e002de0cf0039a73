"""benchmarks/gpu.sh and its helpers, cheaply: the probe's dry mode, the combined results file,
and the script's argument handling (the whole `gpu.sh dry` takes minutes: run it by hand)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_probe_dry_writes_every_measurement(tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_probe.py"), "--dry", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["kind"] == "gpu_probe" and r["dry"] is True and r["triton_interpret"] is True
    assert r["device"].startswith("cpu") and r["versions"]["torch"] and r["command"]
    assert r["wall_s"] < 60, r["wall_s"]
    assert [m["name"] for m in r["matmul"]] == ["square", "lm_head_chunk"]
    for m in r["matmul"]:
        assert _positive(m["tflops"]) and _positive(m["median_ms"]), m
    assert _positive(r["copy"]["gb_per_s"]), r["copy"]
    ours = r["ours"]
    assert "error" not in ours, ours
    for part in ("forward", "backward", "fwd_bwd"):
        assert _positive(ours[part]["median_ms"]), ours[part]
    assert ours["profile"]["kernels"], ours["profile"]
    assert all(_positive(k["self_ms"]) and k["count"] >= 1 for k in ours["profile"]["kernels"])
    cublas = r["cublas"]
    assert "error" not in cublas, cublas
    assert cublas["chunks"] == math.ceil(r["shapes"]["v"] / r["shapes"]["chunk"])
    for part in ("forward", "dw", "dh", "fwd_bwd"):
        assert _positive(cublas[part]["tflops"]), cublas[part]
    assert cublas["profile"]["kernels"]
    assert _positive(r["floor"]["fwd_bwd_ms"]) and r["floor"]["fwd_bwd_flops"] > 0


def test_results_combine_the_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("info\t0\t3\t20\ncuda-tests\t124\t90\t90\n")
    (tmp_path / "info.txt").write_text("dpo-kernels 0.1.0\n")
    (tmp_path / "cuda-tests.log").write_text("..sF\n")
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "probe.json").write_text(json.dumps({"device": "cuda: X", "matmul": []}))
    (tmp_path / "bench").mkdir()
    rows = [
        dict(method="dpo_kernels", workload="dpo_step", tokens=16, median_ms=1.0, peak_mem_mb=2.0),
        dict(method="naive", workload="dpo_step", tokens=16, error="timeout after 60 s"),
    ]
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"rows": rows, "floor": []}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_results.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["device"] == "cuda: X" and r["wall_s"] == 93
    assert r["steps"][1]["note"] == "stopped at its time cap"
    t = r["tests"]
    assert (t["passed"], t["failed"], t["errors"], t["skipped"]) == (2, 1, 0, 1)
    assert t["failures"] == ["tests.test_cuda::test_b"]
    assert r["bench"]["results"].endswith("bench/results.json")
    assert [x.get("error") for x in r["bench"]["rows"]] == [None, "timeout after 60 s"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_script_parses_and_rejects_bad_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
    for argv in (["bogus"], ["run", "llama3-8b"], ["dry", "extra"]):
        proc = subprocess.run(
            ["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "usage:" in proc.stderr
