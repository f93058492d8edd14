# Importable without torch on purpose: the C++ extension is built just in time by dsc_kernels/_ext.py, so installing
# the package never needs a compiler or torch in the build environment. The C++ sources stay at the top of the
# repository (csrc/) and are copied into the package (dsc_kernels/csrc) when a wheel is built, so an installed
# package can build its extension too.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithCSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "dsc_kernels" / "csrc"
        # build/ outlives a build (pip builds a local folder in place): a source renamed or deleted since the last
        # wheel stayed in the new one, and every .cpp there is compiled into the extension
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))


setup(cmdclass={"build_py": BuildPyWithCSources})
