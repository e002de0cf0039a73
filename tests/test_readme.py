"""The README's Python snippets run as written, and its commands name real entry points."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# Every snippet that uses the package runs as written, except the Liger-swap lines, which
# tests/test_modules.py runs against Liger itself.
RUNNABLE = [s for s in SNIPPETS if "dpo_kernels" in s and "was: from liger_kernel" not in s]


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 6


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"snippet{i}" for i in range(len(RUNNABLE))])
def test_snippet_runs(code):
    exec(compile(code, "README.md", "exec"), {})


def test_commands_at_the_top():
    first = README.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in first.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].endswith("dpo-kernels bench") and lines[1].endswith("pytest")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dpo-kernels"] == "dpo_kernels.cli:main"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in lines[1].split(" && "):
        assert command in ci, f"README's test command {command!r} is not what .ci/run runs"


def test_cli_demo_runs(capsys):
    from dpo_kernels.cli import main

    assert main(["demo", "--pairs", "1", "--seq-len", "8", "--hidden", "16", "--vocab", "50",
                 "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "max |ours - naive|" in out and "dpo_kernels" in out
    assert main(["info"]) == 0
