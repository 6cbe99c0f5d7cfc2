"""How glasslstm's C++ operators are built: sources and flags, shared by setup.py (at install
time) and :mod:`glasslstm.ops.native` (on first use, where no installed build matches).

Imported by setup.py by path, before the package is importable: standard library only.
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
    """A hash of every source and header and the flags: what a build is a build of."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def cflags() -> list[str]:
    return [*CFLAGS, f"-DGLASSLSTM_SOURCE_HASH=h{source_hash()}"]


def sources() -> list[str]:
    return [str(CSRC / name) for name in SOURCES]
