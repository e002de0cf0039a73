"""The README's Python snippets run as written and give what the README says they give; its
commands name real entry points."""

import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# Every snippet that uses the package runs as written, except the Liger-swap lines, which
# tests/test_modules.py runs against Liger itself.
RUNNABLE = [s for s in SNIPPETS if "dpo_kernels" in s and "was: from liger_kernel" not in s]


def _use(ns, printed):
    logps, hidden = ns["logps"], ns["hidden"]
    assert logps.shape == (ns["B"],) and bool((logps < 0).all())
    assert math.isfinite(ns["loss"].item()) and torch.isfinite(hidden.grad).all()
    assert hidden.grad[:, :16].abs().max() == 0  # prompt positions get no gradient
    assert hidden.grad[:, 16:].abs().max() > 0 and ns["weight"].grad is not None


def _packed(ns, printed):
    stats = ns["stats"]
    assert stats.logps.shape == (3,) and stats.num_tokens.tolist() == [3, 4, 3]
    entropy = stats.entropy_sum / stats.num_tokens
    assert bool(((entropy > 0) & (entropy < math.log(500))).all())
    assert len(printed) == 2 and printed[0].startswith("tensor(")


def _trl(ns, printed):
    first = ns["trainer"].state.log_history[0]
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "entropy"):
        assert key in first and math.isfinite(first[key]), key
    assert printed[-1].startswith("{") and "'rewards/chosen'" in printed[-1]


def _transformers(ns, printed):
    assert printed[0] == "30.0"  # Gemma 2's softcap, read from the config
    stats = ns["stats"]
    assert stats.logps.shape == (4,) and stats.num_tokens.tolist() == [14] * 4
    assert bool((stats.logps < 0).all())


def _own_loop(ns, printed):
    assert len(printed) == 3 and [ln.split()[0] for ln in printed] == ["0", "1", "2"]
    for line in printed:
        loss, accuracy = map(float, line.split()[1:])
        assert math.isfinite(loss) and 0.0 <= accuracy <= 1.0


def _loss_family(ns, printed):
    for name in ("out", "mpo", "ipo"):
        assert ns[name].losses.shape == (4,) and torch.isfinite(ns[name].losses).all(), name
    assert len(printed) == 1 and printed[0].count("tensor(") == 3


def _liger_extras(ns, printed):
    metrics = ns["out"].metrics
    for key in ("rewards/margins", "entropy", "logps/chosen", "nll_loss"):
        assert key in metrics, key
    assert printed[0].startswith("{") and "'rewards/margins'" in printed[0]
    assert torch.isfinite(ns["hidden"].grad).all()


#: One check per runnable snippet, found by a line only that snippet has.
CHECKS = {
    "logps = dk.linear_logprobs(hidden, weight, labels)": _use,
    "cu_seqlens = torch.tensor([0, 3, 7, 10])": _packed,
    "trainer.train()": _trl,
    "print(lm_head_spec(policy).softcap)": _transformers,
    "for step in range(3):": _own_loop,
    "mpo = dk.preference_loss(": _loss_family,
    "ref_logps = torch.randn(2 * B) - 100": _liger_extras,
}


def _check_for(code):
    found = [check for key, check in CHECKS.items() if key in code]
    assert len(found) == 1, f"expected exactly one check for this snippet, found {len(found)}"
    return found[0]


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 6
    assert sorted(map(_check_for, RUNNABLE), key=id) == sorted(CHECKS.values(), key=id)


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"snippet{i}" for i in range(len(RUNNABLE))])
def test_snippet_runs_and_gives_what_it_says(code, capsys):
    check = _check_for(code)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    check(namespace, printed)


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

    assert (
        main(
            [
                "demo",
                "--pairs",
                "1",
                "--seq-len",
                "8",
                "--hidden",
                "16",
                "--vocab",
                "50",
                "--repeats",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "max |ours - naive|" in out and "dpo_kernels" in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend torch: available" in out and "backend cpp:" in out
