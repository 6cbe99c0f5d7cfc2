"""How glasslstm's C++ operators are built: sources and flags, shared by setup.py (at install
time) and :mod:`glasslstm.ops.native` (on first use, where no installed build matches).

Imported by setup.py by path, before the package is importable: the standard library at
import; :func:`source_hash` also reads torch's version (setup.py builds only where torch is).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("kernels.cpp", "gemm.cpp", "ops.cpp")
HEADERS = ("kernels.h", "kernels_impl.h", "gemm.h")
# -O3 and fp-contract (FMA) for the gate math; no errno or traps, so the float->int step of our
# exp vectorises; OpenMP shares torch's thread pool (libgomp). Instruction sets are chosen at
# run time (kernels.cpp compiles the kernels per level), so no -march: the build is portable.
CFLAGS = [
    "-O3",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-Wno-unused-parameter",
]
LDFLAGS = ["-fopenmp"]


def source_hash() -> str:
    """A hash of what a build is a build of: every source and header, the flags, and the
    torch and Python it is compiled against (a build for another torch is not ABI-compatible:
    after an upgrade of torch, or in another environment sharing the cache, it is rebuilt)."""
    import sys

    import torch  # imported by whoever builds or loads the operators anyway

    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"torch {torch.__version__} python {sys.implementation.cache_tag}".encode())
    return h.hexdigest()[:16]


def cflags() -> list[str]:
    return [*CFLAGS, f"-DGLASSLSTM_SOURCE_HASH=h{source_hash()}"]


def sources() -> list[str]:
    return [str(CSRC / name) for name in SOURCES]
