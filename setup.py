"""Builds the optional C++ CPU kernels (``kplora_kernels._C``) from ``csrc/``.

The package works without them (torch reference path). Skip the build with ``KPLORA_NO_EXT=1``.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch you run with.
"""
import os
import runpy

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("KPLORA_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    build = runpy.run_path(os.path.join("kplora_kernels", "ops", "cpp_build.py"))
    sources = [os.path.relpath(s) for s in build["SOURCES"]]
    ext_modules = [CppExtension("kplora_kernels._C", sources, extra_compile_args=build["CXX_FLAGS"],
                                extra_link_args=build["LD_FLAGS"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
