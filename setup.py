"""Builds glasslstm's C++ operators (glasslstm._C) with torch's extension machinery.

Everything else about the package is in pyproject.toml. The extension is built when torch is
importable at build time (./dev installs with --no-build-isolation, after torch); otherwise the
package installs without it and glasslstm.ops.native builds it on first use (the same sources
and flags, cached per machine).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

spec = importlib.util.spec_from_file_location(
    "glasslstm_build", Path(__file__).parent / "src" / "glasslstm" / "ops" / "_build.py"
)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch in this build environment: built on first use instead
    pass
else:
    ext_modules = [
        CppExtension(
            "glasslstm._C",
            sources=[os.path.relpath(s, Path(__file__).parent) for s in build.sources()],
            extra_compile_args=build.cflags(),
            extra_link_args=build.LDFLAGS,
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
