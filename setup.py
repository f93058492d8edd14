# Importable without torch on purpose: the C++ extension is built just in time by dsc_kernels/_ext.py,
# so installing the package never needs a compiler or torch in the build environment.
from setuptools import setup

setup()
