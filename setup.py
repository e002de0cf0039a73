"""Only for the C++ CPU backend's sources in csrc/ (see dpo_kernels/cpu.py).

Metadata lives in pyproject.toml.
The extension is compiled on first use by ``torch.utils.cpp_extension.load`` into a cache keyed by
the torch version and the source hash, so ``pip install`` never needs torch at build time. What
this file adds: the sources travel inside the installed package (``dpo_kernels/csrc/``), so a
non-editable install can build the backend too.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "dpo_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*.cpp")):
            self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildPyWithSources})
