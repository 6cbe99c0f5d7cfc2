"""The gate math, one function per path, and the one dispatcher that chooses between them.

Paths (``backend=`` on :class:`glasslstm.LSTM`, or the ``GLASSLSTM_BACKEND`` environment
variable; an explicit argument wins):

* ``"auto"`` (default) — ``"fused"`` where it can run (CPU: float32/float64 and a C compiler;
  CUDA: triton installed), else ``"bptt"``. ``$GLASSLSTM_TRITON=0`` keeps CUDA on ``"bptt"``.
  (The Triton cell was checked on an H100: docs/benchmarks.md, *Speed on a GPU*.)
* ``"fused"`` — :class:`~glasslstm.ops.bptt.LSTMLayerFunction` with each step's pointwise gate
  math in one fused kernel: C on the CPU (:mod:`glasslstm.ops.cpu`), Triton on CUDA
  (:mod:`glasslstm.ops.triton_cell`). Asking for it where it cannot run is an error that says why.
* ``"bptt"`` — the same hand-derived backward through time with the gate math in torch ops.
* ``"loop"`` — :func:`~glasslstm.ops.loop.lstm_layer_loop`: a plain torch loop that autograd
  differentiates. Slower; use it for double backward or forward-mode AD.

Every path computes the same numbers (the tests hold them to float64 round-off against each
other, the NumPy reference and torch.nn.LSTM).

Under ``torch.autocast`` (bf16/fp16, CPU or CUDA) a layer takes its inputs and weights in
float32 and gives float32 results, its gate math and cell state in float32 (see
:func:`lstm_layer`). Under CPU bfloat16 autocast the fused path's matrix products take bf16
operands with float32 accumulation (:class:`~glasslstm.ops.cpu.CpuBf16Cell`, where torch's MKL
has ``gemm_bf16bf16f32``); elsewhere the layer runs wholly in float32. The
``"loop"`` backend's backward is autograd's: run it outside the autocast region, as torch advises.
"""

from __future__ import annotations

import os

import torch

from glasslstm.ops import cpu
from glasslstm.ops.bptt import TORCH_CELL, LSTMLayerFunction
from glasslstm.ops.loop import lstm_layer_loop

BACKENDS = ("auto", "fused", "bptt", "loop")
ENV_VAR = "GLASSLSTM_BACKEND"


def resolve_backend(backend: str | None = None) -> str:
    """The backend name asked for (None: ``$GLASSLSTM_BACKEND``, else ``"auto"``), checked.

    ``"auto"`` is settled per call by :func:`cell_for`, which sees the device and dtype.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        where = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{where}={name!r} is not a glasslstm backend; use one of {BACKENDS}")
    return name


def _triton_cell(x: torch.Tensor, forced: bool):
    """The Triton cell for CUDA tensors, or None; ``forced`` turns 'cannot' into an error."""
    try:
        from glasslstm.ops import triton_cell
    except ImportError as e:  # no triton installed
        if forced:
            raise ValueError(
                f"backend='fused' on CUDA needs triton ({e}); use backend='bptt'"
            ) from None
        return None
    cell, why = triton_cell.cell(x.dtype)
    if cell is None and forced:
        raise ValueError(f"backend='fused' cannot run here: {why}; use backend='bptt'")
    return cell


def cell_for(backend: str, x: torch.Tensor):
    """The pointwise kernels that ``backend`` (from :func:`resolve_backend`) uses for ``x``."""
    if backend == "bptt":
        return TORCH_CELL
    forced = backend == "fused"
    if x.device.type == "cpu":
        fused = cpu.cell(x.dtype)
        if fused is None and forced:
            why = (
                cpu.status() if x.dtype in cpu.SUFFIX else f"dtype {x.dtype} (float32/float64 only)"
            )
            raise ValueError(f"backend='fused' cannot run here ({why}); use backend='bptt'")
        return fused or TORCH_CELL
    if x.device.type == "cuda" and (forced or os.environ.get("GLASSLSTM_TRITON", "1") != "0"):
        return _triton_cell(x, forced) or TORCH_CELL
    if forced:
        raise ValueError(f"backend='fused' has no kernels for {x.device.type}; use backend='bptt'")
    return TORCH_CELL


def describe(backend: str | None = None, device: str = "cpu", dtype=torch.float32) -> str:
    """Which path ``backend`` takes on ``device`` for ``dtype``, in words (for reports)."""
    name = resolve_backend(backend)
    if name == "loop":
        return "loop (autograd)"
    x = torch.empty(0, device=device, dtype=dtype)
    try:
        return f"{name} -> {cell_for(name, x).name} cell"
    except ValueError as e:
        return f"{name}: {e}"


def lstm_layer(backend: str, x, h0, c0, weights, batch_sizes, reverse: bool, record: bool):
    """Run one layer in one direction on ``backend`` (a name from :func:`resolve_backend`).

    ``weights`` is ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (biases and ``w_hr`` may be None).
    Returns ``(y, h_n, c_n)`` and, when ``record``, also the activated gates (T, B, 4H) and the
    cell states (T, B, H), zero past each sequence's end.
    """
    if _autocasting(x.device.type):
        # Autocast (bf16/fp16): this layer runs in float32 with autocast off. The cell state
        # carries its rounding through all T steps, and the fused kernels take one dtype (bf16
        # gates from an autocast GEMM must not reach them). Results are float32.
        x, h0, c0, weights = _up(x), _up(h0), _up(c0), tuple(_up(w) for w in weights)
        cell = _autocast_cell(backend, x)
        with torch.autocast(x.device.type, enabled=False):
            return _layer(
                backend,
                _AutocastOffLayerFunction,
                x,
                h0,
                c0,
                weights,
                batch_sizes,
                reverse,
                record,
                cell,
            )
    return _layer(backend, LSTMLayerFunction, x, h0, c0, weights, batch_sizes, reverse, record)


def _layer(backend, function, x, h0, c0, weights, batch_sizes, reverse, record, cell=None):
    if backend == "loop":
        return lstm_layer_loop(x, h0, c0, *weights, batch_sizes, reverse, record)
    return function.apply(
        x,
        h0,
        c0,
        *weights,
        batch_sizes,
        reverse,
        record,
        cell or cell_for(backend, x),
        torch.is_grad_enabled(),
    )


# ---- autocast support for lstm_layer (kept apart from the paths above) ----------------------


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device autocast does not know (e.g. "meta")
        return False
    except TypeError:  # torch < 2.4 has only the per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _autocast_cell(backend: str, x: torch.Tensor):
    """The bf16-GEMM cell where ``backend`` would run the C kernels on float32 CPU tensors under
    bfloat16 autocast; else None (the layer's usual float32 cell)."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or _autocast_dtype("cpu") != torch.bfloat16
        or backend == "loop"
    ):
        return None
    if not isinstance(cell_for(backend, x), cpu.CpuCell):
        return None
    return cpu.bf16_cell()


def _autocast_dtype(device_type: str):
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, RuntimeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else None


def _up(t):
    """float32 for a low-precision floating tensor (float64 and None unchanged), as
    ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` casts; differentiable."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


class _AutocastOffLayerFunction(LSTMLayerFunction):
    """:class:`LSTMLayerFunction` with autocast off in forward **and** backward: a backward run
    inside an autocast region (same thread on the CPU) must not turn its GEMMs to bf16."""

    @staticmethod
    def forward(ctx, x, *args):
        ctx.autocast_device = x.device.type
        with torch.autocast(ctx.autocast_device, enabled=False):
            return LSTMLayerFunction.forward(ctx, x, *args)

    @staticmethod
    def backward(ctx, *grads):
        with torch.autocast(ctx.autocast_device, enabled=False):
            return LSTMLayerFunction.backward(ctx, *grads)
