"""The fused CUDA path: each step's pointwise gate math as one Triton kernel, forward and back.

The cell, in the article's notation (torch's gate order i, f, g, o; a gate row is 4H wide)::

    a = x_t U + H_{t-1} W + b                (the pre-activations, one GEMM per step)
    i_t = σ(a_i)   f_t = σ(a_f)   N_t = g_t = tanh(a_g)   o_t = σ(a_o)
    C_t = f_t ⊙ C_{t-1} + i_t ⊙ N_t        H_t = o_t ⊙ tanh(C_t)

Why this shape: on a GPU one step of :class:`~glasslstm.ops.cells.TorchCell` is about ten small
elementwise kernels, each a launch plus a pass over memory; here it is one launch that reads each
input once and writes each output once. The GEMMs stay torch's (cuBLAS). :class:`TritonCell`
meets the cell contract exactly (:mod:`glasslstm.ops.cells`), so
:class:`~glasslstm.ops.bptt.LSTMLayerFunction` runs it unchanged (``backend="fused"`` on CUDA,
see :mod:`glasslstm.ops`).

Precision: float64 computes in float64; float32, bfloat16 and float16 compute in float32 (the
low-precision types are loaded, widened, and rounded once on store). σ and tanh are written with
``exp`` alone so that the same code runs compiled on the GPU and in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, which the tests use): tanh(x) = sign(x) (1 - e) / (1 + e) with
e = exp(-2|x|), and its odd Taylor series near 0, where the quotient would lose relative precision
(the same scheme as the C kernels of :mod:`glasslstm.ops.cpu`). NaN and Inf propagate.

Importing this module raises ImportError when Triton is missing or broken (the dispatcher
catches it); :func:`cell` says whether the kernels can run for a dtype, and why not.
"""

from __future__ import annotations

import functools

import torch

from glasslstm.ops.cells import Cell

try:
    import triton
    import triton.language as tl
except Exception as e:  # ImportError, or a broken install failing in its own import code
    raise ImportError(f"triton is not usable: {type(e).__name__}: {e}") from e

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x, F64: tl.constexpr):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    if F64:  # odd series to x^13: below 0.03 the next term is < 1e-21
        s = ax * (
            1.0
            + x2
            * (
                -1.0 / 3.0
                + x2
                * (
                    2.0 / 15.0
                    + x2
                    * (
                        -17.0 / 315.0
                        + x2
                        * (62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)))
                    )
                )
            )
        )
        t = tl.where(ax < 0.03, s, t)
    else:  # odd series to x^7: below 0.0625 the next term is < 1e-12
        s = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        t = tl.where(ax < 0.0625, s, t)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cell_forward(
    a_ptr,
    lda,
    cp_ptr,
    ldp,
    c_ptr,
    ldc,
    tc_ptr,
    ldt,
    out_ptr,
    ldo,
    H,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, column block): gates activated in place, C_t, tanh(C_t), o tanh(C_t)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < H
    a = a_ptr + row * lda + cols
    ty = a_ptr.dtype.element_ty
    ai = tl.load(a, mask=m)
    af = tl.load(a + H, mask=m)
    ag = tl.load(a + 2 * H, mask=m)
    ao = tl.load(a + 3 * H, mask=m)
    cp = tl.load(cp_ptr + row * ldp + cols, mask=m)
    if not F64:  # float32 math for float32 / bfloat16 / float16
        ai = ai.to(tl.float32)
        af = af.to(tl.float32)
        ag = ag.to(tl.float32)
        ao = ao.to(tl.float32)
        cp = cp.to(tl.float32)
    i = _sigmoid(ai)
    f = _sigmoid(af)
    g = _tanh(ag, F64)  # N_t, the new information
    o = _sigmoid(ao)
    c = f * cp + i * g  # C_t = f C_{t-1} + i N_t
    t = _tanh(c, F64)
    tl.store(a, i.to(ty), mask=m)
    tl.store(a + H, f.to(ty), mask=m)
    tl.store(a + 2 * H, g.to(ty), mask=m)
    tl.store(a + 3 * H, o.to(ty), mask=m)
    tl.store(c_ptr + row * ldc + cols, c.to(ty), mask=m)
    tl.store(tc_ptr + row * ldt + cols, t.to(ty), mask=m)
    tl.store(out_ptr + row * ldo + cols, (o * t).to(ty), mask=m)  # H_t = o tanh(C_t)


@triton.jit
def _cell_backward(
    a_ptr,
    lda,
    cp_ptr,
    ldp,
    tc_ptr,
    ldt,
    dh_ptr,
    ldh,
    dy_ptr,
    ldy,
    dc_ptr,
    ldc,
    d_ptr,
    ldd,
    H,
    HAS_DY: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, column block): one step back through the cell (see TorchCell.backward)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < H
    a = a_ptr + row * lda + cols
    ty = a_ptr.dtype.element_ty
    i = tl.load(a, mask=m)
    f = tl.load(a + H, mask=m)
    g = tl.load(a + 2 * H, mask=m)
    o = tl.load(a + 3 * H, mask=m)
    cp = tl.load(cp_ptr + row * ldp + cols, mask=m)
    t = tl.load(tc_ptr + row * ldt + cols, mask=m)
    dh = tl.load(dh_ptr + row * ldh + cols, mask=m)
    dc = tl.load(dc_ptr + row * ldc + cols, mask=m)
    if not F64:
        i = i.to(tl.float32)
        f = f.to(tl.float32)
        g = g.to(tl.float32)
        o = o.to(tl.float32)
        cp = cp.to(tl.float32)
        t = t.to(tl.float32)
        dh = dh.to(tl.float32)
        dc = dc.to(tl.float32)
    if HAS_DY:  # dL/dH_t: from the output and from step t+1; written back, as TorchCell does
        dy = tl.load(dy_ptr + row * ldy + cols, mask=m)
        if not F64:
            dy = dy.to(tl.float32)
        dh = dh + dy
        tl.store(dh_ptr + row * ldh + cols, dh.to(ty), mask=m)
    dcn = dc + dh * o * (1.0 - t * t)  # dL/dC_t
    d = d_ptr + row * ldd + cols
    tl.store(d, (dcn * g * i * (1.0 - i)).to(ty), mask=m)  # through σ: di
    tl.store(d + H, (dcn * cp * f * (1.0 - f)).to(ty), mask=m)  # df
    tl.store(d + 2 * H, (dcn * i * (1.0 - g * g)).to(ty), mask=m)  # through tanh: dN
    tl.store(d + 3 * H, (dh * t * o * (1.0 - o)).to(ty), mask=m)  # do
    tl.store(dc_ptr + row * ldc + cols, (dcn * f).to(ty), mask=m)  # dL/dC_{t-1}


@functools.lru_cache(maxsize=1024)
def launch_shape(n: int, H: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for n rows of H: 4 elements a thread (16-byte float32 loads),
    blocks up to 512 wide, halved down to 128 while there are too few programs to fill a GPU."""
    block = max(16, min(triton.next_power_of_2(H), 512))
    while block > 128 and n * triton.cdiv(H, block) < 512:
        block //= 2
    return block, max(1, block // 128)


class TritonCell(Cell):
    """The :class:`~glasslstm.ops.cells.Cell` contract, one Triton launch per call.

    All tensors on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``) with ``dtype``;
    ``a``/``d`` rows 4H wide, the rest (n, H) views with unit column stride, any row strides.
    """

    name = "triton"

    def __init__(self, dtype: torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"TritonCell: dtype {dtype} is not one of {DTYPES}")
        self.dtype = dtype
        self._f64 = dtype == torch.float64

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.dtype != self.dtype:
                raise ValueError(f"TritonCell for {self.dtype} got a {t.dtype} tensor")
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(f"TritonCell needs unit column stride; got strides {t.stride()}")

    def forward(self, a, c_prev, c, tc, out) -> None:
        """``a``: pre-activations in, activated gates out; writes ``c = f c_prev + i g``,
        ``tc = tanh(c)``, ``out = o tc``."""
        n, H = c.shape
        if n == 0 or H == 0:
            return
        self._check(a, c_prev, c, tc, out)
        block, warps = launch_shape(n, H)
        grid = (n, triton.cdiv(H, block))
        with _on(a):
            _cell_forward[grid](
                a,
                a.stride(0),
                c_prev,
                c_prev.stride(0),
                c,
                c.stride(0),
                tc,
                tc.stride(0),
                out,
                out.stride(0),
                H,
                F64=self._f64,
                BLOCK=block,
                num_warps=warps,
            )

    @staticmethod
    def backward_prepare(gates, tanh_c, H):
        """Nothing to precompute: the kernel derives σ' and tanh' from the gates as it goes."""
        return None

    def backward(self, a, c_prev, tc, dh, dy, dc, d, prep) -> None:
        """One step back. ``dh``: dL/d(o tanh c) from later steps (``dy``, when not None, is
        added in place into ``dh``); ``dc``: dL/dC_t in, dL/dC_{t-1} out; ``d``: the
        pre-activation gradients out (a's layout). ``prep`` is ignored (None)."""
        n, H = dc.shape
        if n == 0 or H == 0:
            return
        self._check(a, c_prev, tc, dh, dc, d, *(() if dy is None else (dy,)))
        block, warps = launch_shape(n, H)
        grid = (n, triton.cdiv(H, block))
        has_dy = dy is not None
        dy_ = dy if has_dy else dh  # not read without HAS_DY
        with _on(a):
            _cell_backward[grid](
                a,
                a.stride(0),
                c_prev,
                c_prev.stride(0),
                tc,
                tc.stride(0),
                dh,
                dh.stride(0),
                dy_,
                dy_.stride(0),
                dc,
                dc.stride(0),
                d,
                d.stride(0),
                H,
                HAS_DY=has_dy,
                F64=self._f64,
                BLOCK=block,
                num_warps=warps,
            )


class _on:
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current device);
    a no-op when it already is, and on the CPU (the interpreter)."""

    __slots__ = ("guard",)

    def __init__(self, t: torch.Tensor):
        self.guard = None
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            self.guard = torch.cuda.device(t.device)

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            return self.guard.__exit__(*exc)
        return False


# Whether this module's kernels were built for Triton's CPU interpreter: ``$TRITON_INTERPRET=1``
# when it was imported (the decorator decides then). They run on CPU tensors, slowly.
INTERPRETED = not isinstance(_cell_forward, triton.runtime.jit.JITFunction)


@functools.cache
def cell(dtype: torch.dtype) -> tuple[TritonCell | None, str]:
    """``(cell, "on")`` where the kernels can run for ``dtype``, else ``(None, why)``."""
    if dtype not in DTYPES:
        return None, f"dtype {dtype} (float32/float64/bfloat16/float16 only)"
    if not torch.cuda.is_available() and not INTERPRETED:
        return None, "no CUDA device"
    return TritonCell(dtype), "on"
