"""glasslstm's C++ operators (``torch.ops.glasslstm.*``): found, or built, and loaded.

The sources are ``glasslstm/csrc`` (kernels.cpp: the gate math, whole time loops and the
one-token step, compiled per instruction-set level and picked at run time; gemm.cpp: the
matrix products through torch's own routines; ops.cpp: the operator schemas and their CPU
implementations). ``pip install`` builds them as ``glasslstm._C`` with torch's extension
machinery when torch is present at build time (``./dev`` installs that way). Otherwise, or
when the installed build is of other sources (an edited checkout), the first call that needs
them builds them with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler; about a
minute once, cached under ``~/.cache/glasslstm/ops-<hash>``).

Nothing is built or loaded at import; :func:`load` does it on first use. Without the
operators everything still runs on the torch path, and :func:`status` says why.
``GLASSLSTM_NO_FUSED=1`` keeps them off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import time

import torch

from glasslstm.ops import _build

_lock = threading.Lock()
_failure: str | None = None
_where: str | None = None
_module = None  # the built library as a Python module (its direct one-token step functions)


def _cache_dir():
    from glasslstm.data import cache_dir  # the one place that knows where glasslstm caches

    return cache_dir()


def _installed() -> bool:
    """Load the build that came with the package, if it is a build of these sources (checked
    before loading: its file holds the hash; an edited checkout is built afresh instead)."""
    global _where
    spec = importlib.util.find_spec("glasslstm._C")
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin, "rb") as f:
        if f"h{_build.source_hash()}".encode() not in f.read():
            return False
    global _module
    _module = importlib.import_module("glasslstm._C")
    _where = "installed"
    return True


STALE_LOCK_S = 15 * 60  # a build takes a minute or two; a lock this old is a killed build's


def _clear_stale_lock(lock) -> None:
    """torch's extension builder waits for as long as its lock file exists; a build that was
    killed (Ctrl-C, kill -9, a full disk) leaves it behind and every later import would wait
    forever. A lock older than :data:`STALE_LOCK_S` is removed, with a note."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(
            f"glasslstm: removing {lock}, left {age / 60:.0f} minutes ago by a build that did "
            "not finish; building again",
            file=sys.stderr,
            flush=True,
        )
        lock.unlink(missing_ok=True)


def _jit_build() -> None:
    global _where, _module
    from torch.utils import cpp_extension

    digest = _build.source_hash()
    folder = _cache_dir() / f"ops-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder / "lock")
    if not (folder / f"glasslstm_ops_{digest}.so").exists():
        print(
            "glasslstm: building the CPU operators for this machine (once; about a minute)",
            file=sys.stderr,
            flush=True,
        )
    _module = cpp_extension.load(
        name=f"glasslstm_ops_{digest}",
        sources=_build.sources(),
        extra_cflags=_build.cflags(),
        extra_ldflags=_build.LDFLAGS,
        build_directory=str(folder),
        is_python_module=True,
        verbose=False,
    )
    _where = str(folder)


def direct():
    """The library's module, whose ``lstm_step`` and ``stream_step_`` are the operators' CPU
    kernels called without the dispatcher (eager one-token steps only: tracing, compiling and
    exporting need the operators); None until :func:`load` succeeded."""
    return _module if load() else None


@functools.cache
def load() -> bool:
    """Load the operators (building them if needed); False where they cannot be had."""
    global _failure
    if os.environ.get("GLASSLSTM_NO_FUSED"):
        _failure = "disabled by $GLASSLSTM_NO_FUSED"
        return False
    with _lock:
        try:
            if not _installed():
                _jit_build()
        except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves
            _failure = f"could not build the CPU operators: {str(e).strip().splitlines()[-1]}"
            return False
    from glasslstm.ops import library  # fake implementations, autograd, vmap

    library.register()
    return True


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)``: while torch.compile traces, ``fn`` is
    called once and its result taken as a constant (it is not traced into). That decorator
    imports ``torch._dynamo`` when applied, which brings sympy and about 130,000 Python objects
    into every process that imports glasslstm, compiling or not: a slower start, and twice the
    time for every full garbage collection. So where the compiler is not loaded yet, ``fn``
    gets the mark the decorator gives it (its whole effect, in torch 2.13 and 2.14) without the
    import; tests compile with ``fullgraph=True``, which fails if the mark is not honoured."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def available() -> bool:
    """Whether the C++ operators are loaded (building them on first use). A constant for
    torch.compile: it is called once while tracing."""
    return load()


def status() -> str:
    """One line: are the CPU operators on, where from, which instruction set; or why not."""
    if not load():
        return f"off: {_failure}"
    return f"on ({torch.ops.glasslstm.isa()} kernels, {_where} build)"
