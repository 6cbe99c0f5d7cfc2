"""glasslstm's LSTM operator in ONNX: the translation :func:`glasslstm.export.to_onnx` gives
torch's exporter for ``torch.ops.glasslstm.lstm_layer`` (one layer, one direction).

This module imports onnxscript (an optional dependency: ``pip install glasslstm[export]``), so
only :mod:`glasslstm.export` imports it, when exporting. Its functions are ONNX Script: the
exporter calls :func:`lstm_layer` with the graph's values in place of tensors, and every
``op.X(...)`` records an ONNX node.

* Without a projection, a layer is ONNX's ``LSTM`` operator. ONNX stacks the gates as i, o, f,
  c; torch's rows are i, f, g, o (g, the article's N_t, is ONNX's c), so the rows of
  ``weight_ih`` (ONNX's ``W``), ``weight_hh`` (``R``) and both biases (``B`` = [Wb, Rb]) are
  permuted. The permutation is a ``Gather`` on constant weights, which the exporter's optimizer
  folds: the file stores the permuted weights.
* With ``proj_size`` (LSTMP) there is no ONNX operator (its ``LSTM`` feeds H_t back, not the
  projection W_hr H_t), so the layer is plain operators: the input projections of every step in
  one ``MatMul``, then a ``Scan`` over time whose body is the article's cell followed by the
  projection (:func:`lstmp_scan`). float64 layers take the same plain operators
  (:func:`lstm_scan` without a projection): onnxruntime's LSTM kernel is float32 only.
"""

# No `from __future__ import annotations` here: ONNX Script reads these annotations at
# definition time to type the function's inputs and outputs.
from typing import TypeVar, Union

import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op
from onnxscript.onnx_types import DOUBLE, FLOAT

from glasslstm.errors import ConfigError

# typing.Union, not X | Y: ONNX Script recognises only the former
TFloat = TypeVar("TFloat", bound=Union[FLOAT, DOUBLE])  # noqa: UP007


def lstm_layer(
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
    step_gemm,
    big_gemm,
):
    """``glasslstm::lstm_layer`` (schema in csrc/ops.cpp) in ONNX.

    ``x`` (T, B, I), ``h0`` (B, P), ``c0`` (B, H) -> ``y`` (T, B, P), ``h_n``, ``c_n``. The
    operator's other four outputs (what a backward needs, the recorded gates) have no use in an
    inference graph: placeholders stand for them, and the optimizer drops them. ``train``,
    ``bf16`` and the GEMM choices change how the C++ computes, not what.
    """
    if batch_sizes is not None or record:
        raise ConfigError(
            "ONNX export covers full-length batches without gate recording; "
            "call the model without lengths= and return_gates"
        )
    if w_hr is None and x.dtype != ir.DataType.DOUBLE:
        y, h_n, c_n = _onnx_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    else:
        y, h_n, c_n = _plain(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    return (y, h_n, c_n, *(op.Identity(y) for _ in range(4)))


def _iofc(w, hidden_size: int):
    """Rows of ``w`` (4H, ·) or (4H,) from torch's gate order i, f, g, o to ONNX's i, o, f, c."""
    H = hidden_size
    order = [*range(0, H), *range(3 * H, 4 * H), *range(H, 2 * H), *range(2 * H, 3 * H)]
    return op.Gather(w, op.Constant(value_ints=order), axis=0)


def _onnx_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse: bool):
    """ONNX's LSTM operator for one direction: W, R, B, initial_h and initial_c carry a leading
    direction axis of 1, and Y is (T, 1, B, H)."""
    H = w_hh.shape[0] // 4
    W = op.Unsqueeze(_iofc(w_ih, H), [0])
    R = op.Unsqueeze(_iofc(w_hh, H), [0])
    B = None
    if b_ih is not None:
        B = op.Unsqueeze(op.Concat(_iofc(b_ih, H), _iofc(b_hh, H), axis=0), [0])
    Y, Y_h, Y_c = op.LSTM(
        x,
        W,
        R,
        B,
        None,  # sequence_lens: every sequence runs all T steps
        op.Unsqueeze(h0, [0]),
        op.Unsqueeze(c0, [0]),
        direction="reverse" if reverse else "forward",
        hidden_size=H,
    )
    return op.Squeeze(Y, [1]), op.Squeeze(Y_h, [0]), op.Squeeze(Y_c, [0])


def _plain(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse: bool):
    """The layer in plain operators (``w_hr`` None: no projection); a reverse direction reads
    and writes the time axis backwards around the same Scan."""
    xg = op.MatMul(x, op.Transpose(w_ih, perm=[1, 0]))  # (T, B, 4H): x_t U^T for every step
    if b_ih is not None:
        xg = op.Add(xg, op.Add(b_ih, b_hh))
    if reverse:
        xg = _flip_time(xg)
    w_hh_t = op.Transpose(w_hh, perm=[1, 0])
    if w_hr is None:
        y, h_n, c_n = lstm_scan(xg, h0, c0, w_hh_t)
    else:
        y, h_n, c_n = lstmp_scan(xg, h0, c0, w_hh_t, op.Transpose(w_hr, perm=[1, 0]))
    return (_flip_time(y) if reverse else y), h_n, c_n


def _flip_time(t):
    """``t`` with its first (time) axis reversed."""
    return op.Slice(t, [-1], [-(2**62)], [0], [-1])


@onnxscript.script()
def lstmp_scan(
    xg: TFloat, h0: TFloat, c0: TFloat, w_hh_t: TFloat, w_hr_t: TFloat
) -> tuple[TFloat, TFloat, TFloat]:
    """The LSTMP time loop: ``xg`` (T, B, 4H) holds x_t U^T + b for every step, ``w_hh_t`` is
    W^T (P, 4H), ``w_hr_t`` is W_hr^T (H, P). Returns ``y`` (T, B, P), ``h_n`` (B, P) and
    ``c_n`` (B, H). The exporter inlines this function into the graph."""

    @onnxscript.graph()
    def cell(h, c, xg_t):
        a = op.Add(xg_t, op.MatMul(h, w_hh_t))  # pre-activations, gates i, f, g, o
        i, f, g, o = op.Split(a, num_outputs=4, axis=-1)
        c_t = op.Add(op.Mul(op.Sigmoid(f), c), op.Mul(op.Sigmoid(i), op.Tanh(g)))
        h_t = op.MatMul(op.Mul(op.Sigmoid(o), op.Tanh(c_t)), w_hr_t)
        y_t = op.Identity(h_t)
        return h_t, c_t, y_t

    h_n, c_n, y = op.Scan(h0, c0, xg, body=cell, num_scan_inputs=1)
    return y, h_n, c_n


@onnxscript.script()
def lstm_scan(xg: TFloat, h0: TFloat, c0: TFloat, w_hh_t: TFloat) -> tuple[TFloat, TFloat, TFloat]:
    """The same time loop without the projection: ``w_hh_t`` is W^T (H, 4H); ``y`` is
    (T, B, H)."""

    @onnxscript.graph()
    def cell(h, c, xg_t):
        a = op.Add(xg_t, op.MatMul(h, w_hh_t))
        i, f, g, o = op.Split(a, num_outputs=4, axis=-1)
        c_t = op.Add(op.Mul(op.Sigmoid(f), c), op.Mul(op.Sigmoid(i), op.Tanh(g)))
        h_t = op.Mul(op.Sigmoid(o), op.Tanh(c_t))
        y_t = op.Identity(h_t)
        return h_t, c_t, y_t

    h_n, c_n, y = op.Scan(h0, c0, xg, body=cell, num_scan_inputs=1)
    return y, h_n, c_n
