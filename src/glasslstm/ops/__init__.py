"""The gate math, one function per path, and the one dispatcher that chooses between them.

Paths (``backend=`` on :class:`glasslstm.LSTM`, or the ``GLASSLSTM_BACKEND`` environment
variable; an explicit argument wins):

* ``"auto"`` (default) — ``"fused"`` where it can run (CPU: float32/float64 and the C++
  operators; CUDA: triton installed), else ``"bptt"``. ``$GLASSLSTM_TRITON=0`` keeps CUDA on
  ``"bptt"``.
* ``"fused"`` — on the CPU, the whole layer is one PyTorch operator,
  ``torch.ops.glasslstm.lstm_layer`` (C++: the time loop, the gate math and torch's matrix
  products; :mod:`glasslstm.ops.native`), with its derivative ``lstm_layer_backward``
  registered with autograd, fake implementations for ``torch.compile``/``torch.export`` and
  vmap rules (:mod:`glasslstm.ops.library`). On CUDA, the time loop in Python with each step's
  gate math in one Triton kernel (:mod:`glasslstm.ops.triton_cell`). Asking for it where it
  cannot run is an error that says why.
* ``"bptt"`` — the same hand-derived backward through time in Python with the gate math in
  torch ops (:mod:`glasslstm.ops.bptt`).
* ``"loop"`` — :func:`~glasslstm.ops.loop.lstm_layer_loop`: a plain torch loop that autograd
  differentiates. Slower; for forward-mode AD.

The regularised family (layer normalisation, peepholes, zoneout, recurrent dropout, cell
clipping: :mod:`glasslstm.ops.variant`) runs in the C++ operator, with its hand-derived
backward; where the operator does not run (``"bptt"``, CUDA) it runs in the autograd loop.

Every path computes the same numbers (the tests hold them to float64 round-off against each
other, the NumPy reference and torch.nn.LSTM), and all give second derivatives.

Under ``torch.autocast`` (bf16/fp16, CPU or CUDA) a layer takes its inputs and weights in
float32 and gives float32 results, its gate math and cell state in float32. Under CPU bfloat16
autocast the operator's matrix products take bf16 operands with float32 accumulation — where
this CPU runs them faster than float32 (:func:`glasslstm.ops.gemm.bf16_pays`); elsewhere the
layer runs wholly in float32.
"""

from __future__ import annotations

import os

import torch

from glasslstm.ops import gemm, library, native
from glasslstm.ops.bptt import lstm_layer_bptt
from glasslstm.ops.cells import TORCH_CELL, Cell, NativeBf16Cell, NativeCell
from glasslstm.ops.loop import lstm_layer_loop
from glasslstm.ops.variant import Variant

BACKENDS = ("auto", "fused", "bptt", "loop")
ENV_VAR = "GLASSLSTM_BACKEND"
NATIVE_DTYPES = (torch.float32, torch.float64)


def resolve_backend(backend: str | None = None) -> str:
    """The backend name asked for (None: ``$GLASSLSTM_BACKEND``, else ``"auto"``), checked.

    ``"auto"`` is settled per call by :func:`lstm_layer`, which sees the device and dtype.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        where = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{where}={name!r} is not a glasslstm backend; use one of {BACKENDS}")
    return name


def _triton_cell(x: torch.Tensor, forced: bool) -> Cell | None:
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


def uses_operator(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` runs ``x`` through the C++ operator (raises where ``"fused"`` was
    asked for and cannot run)."""
    if backend not in ("auto", "fused") or x.device.type != "cpu":
        return False
    if x.dtype in NATIVE_DTYPES and native.available():
        return True
    if backend == "fused":
        why = native.status() if x.dtype in NATIVE_DTYPES else f"dtype {x.dtype}"
        raise ValueError(
            f"backend='fused' cannot run here ({why}; float32/float64 only); use backend='bptt'"
        )
    return False


def cell_for(backend: str, x: torch.Tensor, bf16: bool = False) -> Cell:
    """The per-step cell the Python loop of ``backend`` uses for ``x`` (see
    :mod:`glasslstm.ops.cells`): Triton on CUDA for "auto"/"fused", the C++ cell on the CPU
    where the operators are loaded (with bf16 products when ``bf16``), else torch ops."""
    if backend == "bptt" or backend == "loop":
        return TORCH_CELL
    forced = backend == "fused"
    if x.device.type == "cpu":
        if x.dtype in NATIVE_DTYPES and native.available():
            return NativeBf16Cell() if bf16 else NativeCell()
        uses_operator(backend, x)  # raises the reason where "fused" was forced
        return TORCH_CELL
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
        if uses_operator(name, x):
            return f"{name} -> torch.ops.glasslstm.lstm_layer ({native.status()})"
        return f"{name} -> {cell_for(name, x).name} cell"
    except ValueError as e:
        return f"{name}: {e}"


def lstm_layer(
    backend: str,
    x,
    h0,
    c0,
    weights,
    batch_sizes,
    reverse: bool,
    record: bool,
    variant: Variant | None = None,
):
    """Run one layer in one direction on ``backend`` (a name from :func:`resolve_backend`).

    ``weights`` is ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (biases and ``w_hr`` may be None);
    ``variant`` the regularised family's part of the layer (:class:`~glasslstm.ops.variant.
    Variant`), or None. Returns ``(y, h_n, c_n)`` and, when ``record``, also the activated
    gates (T, B, 4H) and the cell states (T, B, H), zero past each sequence's end.

    The family runs in the C++ operator where the operator runs (the CPU, ``"auto"`` and
    ``"fused"``) and in the autograd loop everywhere else.
    """
    if variant is not None and not variant.active():
        variant = None
    bf16 = False
    if _autocasting(x.device.type):
        # This layer runs in float32 with autocast off: the cell state carries its rounding
        # through all T steps. Under CPU bf16 autocast its products may take bf16 operands.
        x, h0, c0 = _up(x), _up(h0), _up(c0)
        weights = tuple(_up(w) for w in weights)
        if variant is not None:
            variant = variant._replace(**{k: _up(getattr(variant, k)) for k in variant._fields[:8]})
        bf16 = (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and _autocast_dtype("cpu") == torch.bfloat16
            and gemm.layer_bf16(x, weights[1])
        )
        with torch.autocast(x.device.type, enabled=False):
            return _layer(backend, x, h0, c0, weights, batch_sizes, reverse, record, bf16, variant)
    return _layer(backend, x, h0, c0, weights, batch_sizes, reverse, record, bf16, variant)


def _layer(backend, x, h0, c0, weights, batch_sizes, reverse, record, bf16, variant):
    if uses_operator(backend, x):
        return _operator_layer(x, h0, c0, weights, batch_sizes, reverse, record, bf16, variant)
    if backend == "loop" or variant is not None:  # the family outside the operator: autograd
        return lstm_layer_loop(x, h0, c0, *weights, batch_sizes, reverse, record, variant)
    return lstm_layer_bptt(
        x, h0, c0, weights, batch_sizes, reverse, record, cell_for(backend, x, bf16)
    )


def _operator_layer(x, h0, c0, weights, batch_sizes, reverse, record, bf16, variant):
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    v = variant or Variant()
    # keep what the backward needs only when one may come (a jit trace is run both ways later)
    train = torch.jit.is_tracing() or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, h0, c0, *weights, *v.tensors))
    )
    step, big = gemm.layer_providers(x, w_hh)
    out = library.layer(
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        w_hr,
        batch_sizes,
        reverse,
        train,
        record,
        bf16,
        step,
        big,
        *v.tensors,
        float(v.cell_clip),
    )
    y, h_n, c_n, gates, cs = out[:5]
    return (y, h_n, c_n, gates, cs) if record else (y, h_n, c_n)


# ---- autocast ----------------------------------------------------------------------------------


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
