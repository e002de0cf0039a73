"""Issue 17: a build of the C++ backend that was killed must not make later processes hang.

torch's loader guards a build with a ``lock`` file (its FileBaton) that a killed build leaves
behind; every later ``cpp_extension.load`` then polls for it forever. ``dpo_kernels.cpu`` builds
under its own flock (dropped by the kernel when its owner dies), removes a stale ``lock`` and
bounds the wait for a live builder. torch's ``load`` is replaced by a fake here: no compiling.
"""

import os
import select
import signal
import subprocess
import sys
import time
import types

import pytest
from torch.utils import cpp_extension

from dpo_kernels import cpu
from dpo_kernels.backend import BackendUnavailable

KEY = "test"
NAME = f"dpo_kernels_cpu_{KEY}"
BUILT = types.ModuleType("fake_built")  # what the fake torch build returns
PREBUILT = types.ModuleType("fake_prebuilt")  # what loading an existing .so returns

# Another process's build, without torch: take the flock, optionally leave torch's "lock" as a
# build in progress has it, say so, "build" for a while, optionally write the module, and exit.
HOLDER = r"""
import fcntl, os, sys, time
flock, torch_lock, seconds, built = sys.argv[1:]
fd = os.open(flock, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
if torch_lock != "-":
    open(torch_lock, "w").close()
print("locked", flush=True)
time.sleep(float(seconds))
if built != "-":
    open(built, "w").close()
"""

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX-only")


@pytest.fixture
def build(monkeypatch, tmp_path):
    """A fresh cache folder, no backend loaded yet and a fake torch build that records calls."""
    monkeypatch.delenv("DPO_KERNELS_NO_CPP", raising=False)
    monkeypatch.setenv("DPO_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("DPO_KERNELS_BUILD_TIMEOUT", "10")  # no test can hang for long
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_build_key", lambda src: KEY)
    d = tmp_path / f"cpu-{KEY}"
    b = types.SimpleNamespace(
        dir=d,
        flock=d / cpu._FLOCK_NAME,
        torch_lock=d / "lock",
        so=d / f"{NAME}.so",
        calls=[],
        lock_seen=[],
    )

    def fake_load(**kwargs):
        b.lock_seen.append(os.path.exists(os.path.join(kwargs["build_directory"], "lock")))
        b.calls.append(kwargs)
        time.sleep(0.05)
        return BUILT

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return b


@pytest.fixture
def holder(build):
    """Starts HOLDER processes; every one is killed and reaped at the end of the test."""
    procs = []

    def start(seconds=30.0, torch_lock=False, write_so=False):
        build.dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(build.flock),
            str(build.torch_lock) if torch_lock else "-",
            str(seconds),
            str(build.so) if write_so else "-",
        ]
        p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 10)
        assert ready and p.stdout.readline().strip() == "locked", "the holder did not start"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        p.stdout.close()


def timed_load():
    start = time.monotonic()
    module = cpu.load()
    return module, time.monotonic() - start


def test_stale_torch_lock_is_removed_and_the_build_runs(build, capfd):
    build.dir.mkdir(parents=True)
    build.torch_lock.touch()  # left by a build that was killed
    module, elapsed = timed_load()
    assert module is BUILT and len(build.calls) == 1 and build.lock_seen == [False]
    assert not build.torch_lock.exists() and elapsed < 5
    err = capfd.readouterr().err
    assert f"removed {build.torch_lock}, left by a build that was interrupted" in err
    assert "building the C++ CPU backend once" in err and "waiting" not in err


def test_a_killed_builder_does_not_block_the_next_build(build, holder, capfd):
    p = holder(torch_lock=True)  # mid-"build": holds the flock, torch's lock exists
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert build.torch_lock.exists()  # the killed build left torch's lock behind
    module, elapsed = timed_load()
    assert module is BUILT and len(build.calls) == 1 and build.lock_seen == [False]
    assert elapsed < 5, f"took {elapsed:.1f} s to take the dead builder's lock"
    err = capfd.readouterr().err
    assert "interrupted" in err and "waiting" not in err


def test_a_waiter_loads_what_the_live_builder_built(build, holder, monkeypatch, capfd):
    # The holder's .so is not a real module: loading one that exists yields PREBUILT.
    monkeypatch.setattr(cpu, "_load_built", lambda name, path: PREBUILT if path.exists() else None)
    holder(seconds=1.0, write_so=True)
    module, elapsed = timed_load()
    assert module is PREBUILT and build.calls == []  # no second build
    assert 0.5 < elapsed < 5
    err = capfd.readouterr().err
    assert f"waiting for another process building the C++ backend in {build.dir}" in err
    assert err.count("waiting") == 1 and "building the C++ CPU backend once" not in err


def test_the_wait_for_a_live_builder_is_bounded(build, holder, monkeypatch, capfd):
    monkeypatch.setenv("DPO_KERNELS_BUILD_TIMEOUT", "0.3")
    holder()
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"waited 0\.3 s for another process building"):
        cpu.load()
    assert time.monotonic() - start < 5 and build.calls == []
    assert "waiting for another process" in capfd.readouterr().err


def test_a_built_module_loads_without_the_lock(build, holder, monkeypatch, capfd):
    monkeypatch.setattr(cpu, "_load_built", lambda name, path: PREBUILT if path.exists() else None)
    holder()  # a live holder: taking the flock would wait
    build.so.touch()
    module, elapsed = timed_load()
    assert module is PREBUILT and build.calls == [] and elapsed < 1
    assert capfd.readouterr().err == ""


def test_without_fcntl_it_builds_unlocked(build, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: importing it fails
    assert cpu.load() is BUILT and len(build.calls) == 1
    assert not build.flock.exists()


def test_a_bad_timeout_is_reported(build, monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_BUILD_TIMEOUT", "soon")
    with pytest.raises(BackendUnavailable, match="DPO_KERNELS_BUILD_TIMEOUT must be a number"):
        cpu.load()
    assert build.calls == []
