"""The fused CPU path: ``cpu_kernels.c`` compiled once per machine and called through ctypes.

Why this shape (measured in docs/benchmarks.md): at small sizes an LSTM step on the CPU is
dominated by the ~15 separate torch ops of its pointwise gate math, each a pass over memory
plus several microseconds of dispatch. One C loop per step does all of it in one pass, and a
one-token step for generation runs every layer's matrix-vector products and gates in a single
call with no allocation. The source is plain C99 (no torch headers, no Python headers), so it
compiles in about a second with the system's C compiler, for the CPU it runs on
(``-march=native``), and does not depend on torch's C++ ABI. The compiled library is cached in
``$XDG_CACHE_HOME/glasslstm/kernels`` (``~/.cache/...``) under a hash of the source, the flags,
the compiler and the CPU; ``$GLASSLSTM_CC`` (else ``$CC``, else ``cc``) picks the compiler.

Without a compiler everything still works on the torch path; :func:`status` says why the fused
one is off (``GLASSLSTM_NO_FUSED=1`` turns it off on purpose). The matrix products stay torch's
BLAS (MKL's sgemm, packed sgemm and, under bf16 autocast, gemm_bf16bf16f32, called from C by
address), which no hand-written C beats.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fno-trapping-math lets the float->int step of exp vectorise; -ffp-contract=fast allows FMA
# (ISO C mode forbids it by default); 512-bit vectors where the CPU has them (harmless elsewhere).
FLAGS = [
    "-O3",
    "-march=native",
    "-std=c99",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-mprefer-vector-width=512",
    "-fPIC",
    "-shared",
]
ABI_VERSION = 10
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_failure: str | None = None


def find_compiler(own_var: str, var: str, *names: str) -> str | None:
    """The first of ``$own_var``, ``$var`` and ``names`` that is on the PATH (or a path)."""
    for name in (os.environ.get(own_var), os.environ.get(var), *names):
        if name and shutil.which(name):
            return name
    return None


def _compiler() -> str | None:
    return find_compiler("GLASSLSTM_CC", "CC", "cc", "gcc")


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    from glasslstm.data import cache_dir  # the one place that knows where glasslstm caches

    return cache_dir() / "kernels"


def compile_cached(stem: str, key_parts: list[str], commands: list[list[str]]) -> Path:
    """A shared library built once per key: the first of ``commands`` (argument lists, "{out}"
    standing for the output path) that succeeds, cached as ``<stem>-<hash of key_parts>.so``.
    An atomic rename publishes it, so concurrent processes never load a half-written file.
    Raises RuntimeError with the last compiler's complaint when none succeeds."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()
    target = _cache_dir() / f"{stem}-{key[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix="building-", dir=target.parent)
    os.close(fd)
    try:
        for command in commands:
            run = subprocess.run(
                [arg.replace("{out}", tmp) for arg in command], capture_output=True, text=True
            )
            if run.returncode == 0:
                break
        else:
            raise RuntimeError(f"{commands[-1][0]} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _remove_stale(folder: Path, age_s: float = 3600.0) -> None:
    """Half-built files left by a process that exited mid-build (the drop-in extension builds
    in a background thread), once they are an hour old."""
    now = time.time()
    for path in folder.glob("building-*.so"):
        try:
            if now - path.stat().st_mtime > age_s:
                path.unlink()
        except OSError:
            pass


def _build(cc: str) -> Path:
    """The kernels for this source/compiler/CPU. OpenMP links libgomp, which resolves to the
    copy torch has already loaded (one thread pool for both); without OpenMP support the
    kernels still build, serial."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    base = [cc, *FLAGS]
    return compile_cached(
        "glasslstm_cpu",
        [SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature(), platform.machine()],
        [
            [*base, "-fopenmp", "-o", "{out}", str(SOURCE), "-lm"],
            [*base, "-o", "{out}", str(SOURCE), "-lm"],
        ],
    )


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (then :func:`status` says why). Built on first use."""
    global _failure
    if os.environ.get("GLASSLSTM_NO_FUSED"):
        _failure = "disabled by $GLASSLSTM_NO_FUSED"
        return None
    cc = _compiler()
    if cc is None:
        _failure = "no C compiler found (install gcc, or set $GLASSLSTM_CC)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _failure = f"could not build the kernels: {e}"
        return None
    if lib.glasslstm_abi_version() != ABI_VERSION:
        _failure = "stale kernel library (ABI mismatch)"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.glasslstm_step_work.argtypes, lib.glasslstm_step_work.restype = [i64], i64
    lib.glasslstm_step_panel.argtypes, lib.glasslstm_step_panel.restype = [], i64
    for suf in SUFFIX.values():
        getattr(lib, f"glasslstm_cell_forward_{suf}").argtypes = [
            i64,
            i64,
            ptr,
            i64,
            ptr,
            ptr,
            i64,
            ptr,
            ptr,
            i64,
            ptr,
            i64,
        ]
        getattr(lib, f"glasslstm_cell_backward_{suf}").argtypes = [
            i64,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
        ]
        getattr(lib, f"glasslstm_step_{suf}").argtypes = [ptr] * 8
        sizes = ctypes.POINTER(i64)
        getattr(lib, f"glasslstm_layer_forward_{suf}").argtypes = (
            [ptr, i64, i64, i64, i64] + [ptr] * 9 + [sizes, ctypes.c_int, ctypes.c_int]
        )
        getattr(lib, f"glasslstm_layer_backward_{suf}").argtypes = (
            [ptr, i64, i64, i64, i64] + [ptr] * 13 + [sizes, ctypes.c_int]
        )
        getattr(lib, f"glasslstm_linear_{suf}").argtypes = [i64, i64, ptr, ptr, ptr, ptr]
        for name in (
            "cell_forward",
            "cell_backward",
            "step",
            "layer_forward",
            "layer_backward",
            "linear",
        ):
            getattr(lib, f"glasslstm_{name}_{suf}").restype = None
    lib.glasslstm_to_bf16.argtypes, lib.glasslstm_to_bf16.restype = [i64, ptr, ptr], None
    lib.glasslstm_mm_bf16.argtypes = [
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        ctypes.c_int,
        ptr,
        i64,
        ctypes.c_int,
        ctypes.c_float,
        ptr,
        i64,
    ]
    lib.glasslstm_mm_bf16.restype = None
    return lib


class Blas(ctypes.Structure):
    """``glasslstm_blas`` of cpu_kernels.c: the BLAS routines the C time loops call."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("gemm", "pack_get_size", "pack", "compute", "gemm_bf16")
    ]


# Per dtype: torch's Fortran ?gemm, and MKL's packed-GEMM trio where it has one (float32).
_BLAS_SYMBOLS = {
    torch.float32: ("sgemm_", "sgemm_pack_get_size", "sgemm_pack", "sgemm_compute"),
    torch.float64: ("dgemm_", "dgemm_pack_get_size", "dgemm_pack", "dgemm_compute"),
}


@functools.cache
def blas_routines() -> dict:
    """dtype -> :class:`Blas` with the addresses of the routines torch's CPU build uses (MKL's
    sgemm_/dgemm_ in libtorch_cpu, and sgemm_pack/sgemm_compute), so the C time loop runs the
    very GEMM kernels torch.addmm would. Empty where torch exposes no gemm (then the loop stays
    in Python, still with the fused cell). ``$GLASSLSTM_BLAS_PACK=0`` leaves the packed GEMM
    out (a diagnostic: it shows what packing gains). float32's entry also carries MKL's
    ``gemm_bf16bf16f32`` where torch's library has it (:class:`CpuBf16Cell`)."""
    found = {}
    use_pack = os.environ.get("GLASSLSTM_BLAS_PACK", "1") != "0"
    for lib_dir in (Path(torch.__file__).parent / "lib",):
        for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
            try:
                lib = ctypes.CDLL(str(lib_dir / name))
            except OSError:
                continue
            for dtype, symbols in _BLAS_SYMBOLS.items():
                gemm, *pack = (_address(lib, sym) for sym in symbols)
                if gemm is None:
                    continue
                found[dtype] = Blas(
                    gemm,
                    *(pack if use_pack and None not in pack else [None] * 3),
                    _address(lib, "gemm_bf16bf16f32") if dtype == torch.float32 else None,
                )
    return found


def _address(lib: ctypes.CDLL, symbol: str) -> int | None:
    fn = getattr(lib, symbol, None)
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def available() -> bool:
    return library() is not None


def status() -> str:
    """One line: is the fused CPU path on, and if not, why."""
    if not available():
        return f"off: {_failure}"
    blas = blas_routines()
    if not blas:
        loop = "time loop in Python (no BLAS symbol found)"
    else:
        f32 = blas.get(torch.float32)
        loop = (
            "time loop in C on torch's BLAS"
            + (", packed GEMM" if f32 and f32.pack else "")
            + (", bf16 GEMM under autocast" if f32 and f32.gemm_bf16 else "")
        )
    return f"on ({loop})"


class CpuCell:
    """:class:`~glasslstm.ops.bptt.TorchCell`'s contract, one C call per step."""

    name = "cpu-fused"

    def __init__(self, dtype: torch.dtype):
        lib = library()
        suf = SUFFIX[dtype]
        self._fwd = getattr(lib, f"glasslstm_cell_forward_{suf}")
        self._bwd = getattr(lib, f"glasslstm_cell_backward_{suf}")
        self._blas = blas_routines().get(dtype)
        self._blas_ptr = None if self._blas is None else ctypes.addressof(self._blas)
        self._layer_fwd = getattr(lib, f"glasslstm_layer_forward_{suf}")
        self._layer_bwd = getattr(lib, f"glasslstm_layer_backward_{suf}")

    # Whole time loops in C (one call per layer and direction). They return False where they
    # cannot run (no BLAS symbol, non-contiguous weights); the caller then loops in Python.

    def _loops_in_c(self, w_hh, w_hr) -> bool:
        return (
            self._blas is not None
            and w_hh.is_contiguous()
            and (w_hr is None or w_hr.is_contiguous())
        )

    def _w16(self, w_hh, transposed: bool = False):
        """The recurrent weight for the C loops' bf16 steps (None: float32 steps); the
        backward loop takes it transposed."""
        return None

    def layer_forward(
        self, gates, hs, cs, tanh_c, rs, w_hh, w_hr, batch_sizes, reverse, bias=None
    ) -> bool:
        """The forward time loop; ``bias`` (4H), when given, is added to ``gates`` (x U) in
        the loop. False (nothing done) where the loop cannot run in C."""
        if not self._loops_in_c(w_hh, w_hr):
            return False
        T, B, H4 = gates.shape
        w16 = self._w16(w_hh)
        # See the C source: the transposed copies pay for themselves from ~8 steps. Not needed
        # where every step multiplies by the packed weight (packing reads either layout) or
        # by the bf16 copy.
        packed_only = (
            self._blas is not None
            and self._blas.pack is not None
            and batch_sizes is None
            and w_hr is None
            and T >= 4
        )
        transposed = T >= 8 and w16 is None and not packed_only
        if transposed:
            w_hh = w_hh.t().contiguous()
            w_hr = None if w_hr is None else w_hr.t().contiguous()
        self._layer_fwd(
            self._blas_ptr,
            T,
            B,
            H4 // 4,
            hs.shape[2],
            gates.data_ptr(),
            hs.data_ptr(),
            cs.data_ptr(),
            tanh_c.data_ptr(),
            _ptr(rs),
            w_hh.data_ptr(),
            _ptr(w_hr),
            _ptr(bias),
            _ptr(w16),
            _sizes(batch_sizes),
            int(reverse),
            int(transposed),
        )
        return True

    def layer_backward(
        self, gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse, db=None
    ) -> bool:
        """The backward time loop; ``db`` (4H), when given, receives the bias gradient (the
        sum of ``da`` over all rows). False (nothing done) where the loop cannot run in C."""
        if not self._loops_in_c(w_hh, w_hr):
            return False
        T, B, H4 = gates.shape
        H = H4 // 4
        dr = None if w_hr is None else dc.new_empty(B, H)
        w16 = self._w16(w_hh, transposed=True)  # kept alive across the call
        self._layer_bwd(
            self._blas_ptr,
            T,
            B,
            H,
            dh.shape[1],
            gates.data_ptr(),
            cs.data_ptr(),
            tanh_c.data_ptr(),
            _ptr(dy),
            dh.data_ptr(),
            dc.data_ptr(),
            da.data_ptr(),
            _ptr(dhs),
            _ptr(dr),
            w_hh.data_ptr(),
            _ptr(w_hr),
            _ptr(db),
            _ptr(w16),
            _sizes(batch_sizes),
            int(reverse),
        )
        return True

    def forward(self, a, c_prev, c, tc, out) -> None:
        n, H = c.shape
        self._fwd(
            n,
            H,
            a.data_ptr(),
            a.stride(0),
            None,
            c_prev.data_ptr(),
            c_prev.stride(0),
            c.data_ptr(),
            tc.data_ptr(),
            c.stride(0),
            out.data_ptr(),
            out.stride(0),
        )

    @staticmethod
    def backward_prepare(gates, tanh_c, H):
        return None

    def backward(self, a, c_prev, tc, dh, dy, dc, d, prep) -> None:
        n, H = dc.shape
        if dy is not None and dy.stride(0) != dh.stride(0):
            dh += dy  # the kernel reads both with one stride; add here instead
            dy = None
        self._bwd(
            n,
            H,
            a.data_ptr(),
            a.stride(0),
            c_prev.data_ptr(),
            c_prev.stride(0),
            tc.data_ptr(),
            tc.stride(0),
            dh.data_ptr(),
            None if dy is None else dy.data_ptr(),
            dh.stride(0),
            dc.data_ptr(),
            dc.stride(0),
            d.data_ptr(),
        )


class CpuBf16Cell(CpuCell):
    """:class:`CpuCell` for ``torch.autocast("cpu", dtype=torch.bfloat16)``: every matrix
    product (the time loops' recurrent GEMM, the input projection, the weight and input
    gradients) takes bfloat16 operands and accumulates and returns float32 (MKL's
    ``gemm_bf16bf16f32``: AMX / AVX512-BF16 where the CPU has them); the gate math, the cell
    state and the bias sums stay float32. Layers get float32 inputs and weights and give
    float32 results (see :func:`glasslstm.ops.lstm_layer`)."""

    name = "cpu-fused-bf16"

    def __init__(self):
        super().__init__(torch.float32)
        self._mm = library().glasslstm_mm_bf16

    def _w16(self, w_hh, transposed: bool = False):
        w = w_hh.detach()
        return (w.t() if transposed else w).to(torch.bfloat16).contiguous()

    @staticmethod
    def operand(t: torch.Tensor) -> torch.Tensor:
        """``t`` as :meth:`mm` takes it: in bf16 (convert a matrix used twice only once)."""
        return t.detach().to(torch.bfloat16)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` (float32 or already bf16, any strides) with bf16 operands, float32
        result."""
        a16, ta, lda = _bf16_operand(a)
        b16, tb, ldb = _bf16_operand(b)
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
        if out.numel():
            self._mm(
                self._blas_ptr,
                a.shape[0],
                b.shape[1],
                a.shape[1],
                a16.data_ptr(),
                lda,
                ta,
                b16.data_ptr(),
                ldb,
                tb,
                0.0,
                out.data_ptr(),
                out.stride(0),
            )
        return out


def _bf16_operand(t: torch.Tensor):
    """(bf16 copy, transposed?, leading dimension) of a 2-D float32 matrix for glasslstm_mm_bf16:
    row-major (unit column stride) or its transpose (unit row stride), else made contiguous."""
    t16 = t.detach().to(torch.bfloat16)  # keeps a transposed view's strides; no-op on bf16
    rows, cols = t16.shape
    if t16.stride(1) == 1 and t16.stride(0) >= max(cols, 1):
        return t16, 0, max(t16.stride(0), 1)
    if t16.stride(0) == 1 and t16.stride(1) >= max(rows, 1):
        return t16, 1, max(t16.stride(1), 1)
    t16 = t16.contiguous()
    return t16, 0, max(cols, 1)


@functools.cache
def bf16_cell() -> CpuBf16Cell | None:
    """The autocast-bf16 cell, or None where torch's BLAS has no bf16 GEMM (or no kernels)."""
    if not available():
        return None
    blas = blas_routines().get(torch.float32)
    if blas is None or not blas.gemm_bf16:
        return None
    return CpuBf16Cell()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _sizes(batch_sizes):
    if batch_sizes is None:
        return None
    return (ctypes.c_int64 * len(batch_sizes))(*batch_sizes)


@functools.cache
def cell(dtype: torch.dtype) -> CpuCell | None:
    """The fused cell for ``dtype`` (float32/float64), or None where it cannot run."""
    if dtype not in SUFFIX or not available():
        return None
    return CpuCell(dtype)
