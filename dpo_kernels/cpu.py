"""Loader of the C++ CPU backend (csrc/).

The extension is not written yet (it is its own piece of work); until it is, the ``"cpp"``
backend reports itself unavailable and ``backend="auto"`` uses the torch reference on CPU.
"""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def is_available() -> bool:
    return False


def load():
    raise BackendUnavailable(
        "backend='cpp' is not available: the C++ CPU backend (csrc/) is not part of this "
        "version of dpo-kernels; use backend='torch' or backend='auto'"
    )
