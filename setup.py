"""Build script: installs muon/ and kernels/ (as muon.kernels); the CUDA extension joins in csrc/'s issue."""

from setuptools import setup

setup(
    packages=["muon", "muon.backends", "muon.kernels"],
    package_dir={"muon": "muon", "muon.kernels": "kernels"},
)
