"""Only for the C++ CPU extension in csrc/ (see dpo_kernels/cpu.py); metadata: pyproject.toml.

The extension is compiled on first use by ``torch.utils.cpp_extension.load`` into a cache keyed by
the torch version and the source hash, so ``pip install`` never needs torch at build time.
"""

from setuptools import setup

setup()
