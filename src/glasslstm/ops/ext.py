"""``step_ext.cpp``: the drop-in one-token call as one C++ function (see its header comment).

Compiled on first use, in a background thread, against this torch's headers and libraries
(C++17, the same C++ ABI flag as torch), cached beside the C kernels under a hash of the
source, the compiler, torch's and Python's versions. Until it is ready, and wherever it cannot
be built (no C++ compiler, no Python headers: :func:`status` says why), the drop-in call runs
its Python path; both call the same C step. ``$GLASSLSTM_NO_EXT=1`` (or
``$GLASSLSTM_NO_FUSED=1``) keeps it off; ``$GLASSLSTM_CXX`` (else ``$CXX``, else ``c++``)
picks the compiler.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from glasslstm.ops import cpu

SOURCE = Path(__file__).with_name("step_ext.cpp")
_lock = threading.Lock()  # held while building (seconds)
_start_lock = threading.Lock()  # held while starting the background build (never long)
_state: dict = {"module": None, "failure": None, "thread": None}


def _compiler() -> str | None:
    return cpu.find_compiler("GLASSLSTM_CXX", "CXX", "c++", "g++")


def _commands(cxx: str) -> list[list[str]]:
    torch_dir = Path(torch.__file__).parent
    lib = torch_dir / "lib"
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        [
            cxx,
            "-O2",
            "-std=c++17",
            "-fPIC",
            "-shared",
            "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{torch_dir / 'include'}",
            f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            str(SOURCE),
            "-o",
            "{out}",
            f"-L{lib}",
            "-lc10",
            "-ltorch",
            "-ltorch_cpu",
            "-ltorch_python",
            f"-Wl,-rpath,{lib}",
        ]
    ]


def build():
    """Build (or find) and load the extension now; the module, or None (:func:`status`)."""
    with _lock:
        if _state["module"] is not None or _state["failure"] is not None:
            return _state["module"]
        why = _unavailable()
        if why is not None:
            _state["failure"] = why
            return None
        cxx = _compiler()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        try:
            path = cpu.compile_cached(
                "glasslstm_step_ext",
                [
                    SOURCE.read_text(),
                    version,
                    torch.__version__,
                    sys.version,
                    str(torch.compiled_with_cxx11_abi()),
                ],
                _commands(cxx),
            )
            loader = importlib.machinery.ExtensionFileLoader("glasslstm_step_ext", str(path))
            spec = importlib.util.spec_from_file_location("glasslstm_step_ext", path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
            _state["failure"] = f"could not build the drop-in extension: {e}"
            return None
        _state["module"] = module
        return module


def _unavailable() -> str | None:
    if os.environ.get("GLASSLSTM_NO_EXT") or os.environ.get("GLASSLSTM_NO_FUSED"):
        return "disabled by $GLASSLSTM_NO_EXT / $GLASSLSTM_NO_FUSED"
    if not cpu.available():
        return f"no C kernels ({cpu.status()})"
    if _compiler() is None:
        return "no C++ compiler found (install g++, or set $GLASSLSTM_CXX)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers (install python3-dev)"
    return None


def build_async() -> None:
    """Start :func:`build` in a background thread (once); :func:`module` says when it is done."""
    with _start_lock:
        if _state["thread"] is not None or _state["module"] is not None:
            return
        thread = threading.Thread(target=_build_quietly, name="glasslstm-ext-build", daemon=True)
        _state["thread"] = thread
        thread.start()


def _build_quietly() -> None:
    """:func:`build` for the background thread: whatever goes wrong is recorded for
    :func:`status`, never printed over the user's output."""
    try:
        build()
    except Exception as e:  # noqa: BLE001 - a thread has no caller to raise to
        _state["failure"] = f"could not build the drop-in extension: {e!r}"


def module():
    """The loaded extension, or None (not built yet, or cannot be)."""
    return _state["module"]


def status() -> str:
    if _state["module"] is not None:
        return "on"
    if _state["failure"] is not None:
        return f"off: {_state['failure']}"
    return "building" if _state["thread"] is not None else "not built yet"
