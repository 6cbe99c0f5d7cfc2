"""One LSTM layer in one direction, with the hand-derived backward through time.

This is :mod:`glasslstm.reference`'s BPTT written with torch tensors, arranged so that the
expensive work is a few large GEMMs:

* forward: the input projections ``x_t U + b`` for **all** time steps in one GEMM, then per step
  one GEMM for ``H_{t-1} W`` and the pointwise gate math done in place in that step's slice;
* backward: per step only the pointwise gate derivatives and one GEMM for ``dH_{t-1}``; the
  weight gradients ``dU``, ``dW``, ``db`` (and ``dW_hr`` with a projection) and the input
  gradient are each **one** GEMM (or sum) over all time steps at the end.

Variable lengths use the batch-shrinking layout of ``PackedSequence``: the batch is sorted by
length (longest first) and ``batch_sizes[t]`` rows are active at step ``t``; the other rows keep
their state unchanged (forward direction: they have ended; reverse direction: they have not
started yet). The caller (:class:`glasslstm.LSTM`) does the sorting.

Each step's pointwise math is a :class:`~glasslstm.ops.cells.Cell` (torch ops for
``backend="bptt"``, Triton on CUDA). On the CPU the default path runs the same algorithm as one
C++ operator instead (:mod:`glasslstm.ops.native`).

Shapes: T steps, B batch, I input size, H hidden size, P recurrent size (= H, or proj_size).
Gate order in every 4H dimension is torch's: i, f, g, o (the article's i, f, N, o).
"""

from __future__ import annotations

import torch

from glasslstm.ops.cells import TORCH_CELL, Cell
from glasslstm.ops.loop import layer_gradients


def _pad_mask(batch_sizes: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """(T, B, 1) bool: True where step t of row b is past the row's length."""
    sizes = torch.tensor(batch_sizes, device=device)
    return (torch.arange(batch, device=device)[None, :] >= sizes[:, None]).unsqueeze(-1)


def lstm_layer_forward(
    x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, cell: Cell = TORCH_CELL
):
    """The forward pass; returns everything backward needs (no autograd involved).

    Returns ``(gates, hs, cs, tanh_c, rs)``: ``gates`` (T, B, 4H) the activated i, f, g, o
    (rows past a sequence's end hold junk); ``hs`` (T+1, B, P) and ``cs`` (T+1, B, H) the states,
    with the initial state at index 0 (forward) or T (reverse) and the state after step t at
    t+1 (forward) or t (reverse); ``tanh_c`` (T, B, H); ``rs`` (T, B, H) ``o * tanh(c)`` before
    the projection, or None without one.
    """
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    P = h0.shape[1]
    ragged = batch_sizes is not None
    x2 = x.reshape(T * B, x.shape[2])
    # Input projections of all steps at once: x_t U + b  -> (T, B, 4H). On many rows a
    # contiguous U^T pays for its copy (the BLAS's product on a transposed view is ~20% slower).
    u = w_ih.t().contiguous() if T * B >= 64 and x.device.type == "cpu" else w_ih.t()
    gates = cell.mm(x2, u).view(T, B, 4 * H)
    if bias is not None:
        gates += bias
    hs = x.new_empty(T + 1, B, P)
    cs = x.new_empty(T + 1, B, H)
    tanh_c = x.new_empty(T, B, H)
    # o * tanh(c) before the projection; zero-filled when ragged so dW_hr's GEMM sees no junk
    rs = None if w_hr is None else (x.new_zeros if ragged else x.new_empty)(T, B, H)
    start = T if reverse else 0
    hs[start] = h0
    cs[start] = c0
    w_op = cell.operand(w_hh.t())
    w_hr_t = None if w_hr is None else w_hr.t()
    for t in range(T - 1, -1, -1) if reverse else range(T):
        prev, cur = (t + 1, t) if reverse else (t, t + 1)
        nb = B if not ragged else batch_sizes[t]
        if nb < B:  # rows past their end (or before their start) keep their state
            hs[cur, nb:] = hs[prev, nb:]
            cs[cur, nb:] = cs[prev, nb:]
            if nb == 0:
                continue
        a = gates[t, :nb]  # (nb, 4H): x_t U + b
        cell.addmm_(a, hs[prev, :nb], w_op)  # + H_{t-1} W
        if w_hr_t is None:  # activations in place; C_t, tanh(C_t), H_t
            cell.forward(a, cs[prev, :nb], cs[cur, :nb], tanh_c[t, :nb], hs[cur, :nb])
        else:
            assert rs is not None  # made above whenever there is a projection
            r = rs[t, :nb]
            cell.forward(a, cs[prev, :nb], cs[cur, :nb], tanh_c[t, :nb], r)
            torch.mm(r, w_hr_t, out=hs[cur, :nb])  # H_t = (o * tanh(C_t)) W_hr^T
    return gates, hs, cs, tanh_c, rs


def _backward_steps(
    cell: Cell, gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse
) -> None:
    """The backward time loop, one ``cell.backward`` and one product per step; fills ``da``
    (and ``dhs``) and leaves the initial state's gradients in ``dh``/``dc``."""
    T, B, H4 = gates.shape
    H = H4 // 4
    prep = cell.backward_prepare(gates, tanh_c, H)
    w_op = cell.operand(w_hh)
    for t in range(T) if reverse else range(T - 1, -1, -1):
        prev = t + 1 if reverse else t
        nb = B if batch_sizes is None else batch_sizes[t]
        if nb == 0:
            continue
        dh_t = dh[:nb]
        dy_t = None if dy is None else dy[t, :nb]
        if w_hr is None:
            dr = dh_t  # dL/dH_t = dh_t + dy_t, added by the cell
        else:
            if dy_t is not None:
                dh_t += dy_t  # dL/dH_t: from the output and from step t+1
            dhs[t, :nb] = dh_t
            dr, dy_t = torch.mm(dh_t, w_hr), None  # through the projection
        p = None if prep is None else (prep[0][t, :nb], prep[1][t, :nb])
        d = da[t, :nb]
        cell.backward(gates[t, :nb], cs[prev, :nb], tanh_c[t, :nb], dr, dy_t, dc[:nb], d, p)
        cell.mm_out(dh_t, d, w_op)  # dL/dH_{t-1}


class LSTMLayerFunction(torch.autograd.Function):
    """autograd.Function for one layer and direction: forward above, hand-written BPTT below.

    Inputs: ``x`` (T, B, I), ``h0`` (B, P), ``c0`` (B, H), ``w_ih`` (4H, I), ``w_hh`` (4H, P),
    ``b_ih``/``b_hh`` (4H) or None, ``w_hr`` (P, H) or None, ``batch_sizes`` (list of T ints, or
    None when all rows run all T steps), ``reverse`` (bool), ``record`` (bool), ``cell`` (the
    per-step :class:`~glasslstm.ops.cells.Cell`).
    Outputs: ``y`` (T, B, P) with zeros past each row's end, ``h_n`` (B, P), ``c_n`` (B, H), and
    when ``record``: the activated gates (T, B, 4H) and the cell states (T, B, H), not
    differentiable (they are for looking at).
    """

    @staticmethod
    def forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, record, cell=TORCH_CELL
    ):
        T, B, _ = x.shape
        bias = None if b_ih is None else b_ih + b_hh
        gates, hs, cs, tanh_c, rs = lstm_layer_forward(
            x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, cell
        )
        states = slice(0, T) if reverse else slice(1, T + 1)
        end = 0 if reverse else T
        h_n, c_n = hs[end].clone(), cs[end].clone()
        y = hs[states].clone()  # hs is kept for the backward: y must not share its memory
        outputs = [y, h_n, c_n]
        if record:
            outputs += [gates.clone(), cs[states].clone()]
        if batch_sizes is not None:
            pad = _pad_mask(batch_sizes, B, x.device)
            for t in [y, *outputs[3:]]:
                t.masked_fill_(pad, 0.0)
        return (*outputs, gates, hs, cs, tanh_c, rs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, record = inputs[:11]
        cell = inputs[11] if len(inputs) > 11 else TORCH_CELL
        gates, hs, cs, tanh_c, rs = output[-5:]
        ctx.mark_non_differentiable(*(t for t in output[3:] if t is not None))
        # Intermediates too go through save_for_backward: autograd frees them after backward
        # (unless retain_graph) and saved-tensor hooks (offloading, checkpointing) see them.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, gates, hs, cs, tanh_c, rs)
        # Unused outputs (the recorded gates always; often h_n/c_n) arrive as None instead of
        # zero-filled tensors.
        ctx.set_materialize_grads(False)
        ctx.batch_sizes = batch_sizes
        ctx.reverse = reverse
        ctx.cell = cell
        ctx.has_bias = b_ih is not None

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_unused):
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            inputs, need = ctx.saved_tensors[:8], ctx.needs_input_grad[:8]
            grads = layer_gradients(inputs, need, dy, dh_n, dc_n, ctx.batch_sizes, ctx.reverse)
            return (*grads, None, None, None, None)
        # autocast off here too: a backward run inside an autocast region (the same thread on
        # the CPU) must not turn its products to bf16
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return LSTMLayerFunction._backward(ctx, dy, dh_n, dc_n)

    @staticmethod
    def _backward(ctx, dy, dh_n, dc_n):
        x, _, _, w_ih, w_hh, _, _, w_hr, gates, hs, cs, tanh_c, rs = ctx.saved_tensors
        batch_sizes, reverse = ctx.batch_sizes, ctx.reverse
        T, B, I = x.shape
        H = w_hh.shape[0] // 4
        P = hs.shape[2]
        ragged = batch_sizes is not None
        cell = ctx.cell
        if dy is not None and not dy.is_contiguous():
            dy = dy.contiguous()  # e.g. the expanded gradient of a sum(): kernels need rows
        da = (x.new_zeros if ragged else x.new_empty)(T, B, 4 * H)  # pre-activation grads
        dhs = None if w_hr is None else (x.new_zeros if ragged else x.new_empty)(T, B, P)
        # (B, P) / (B, H): the gradient arriving at the state, from later steps and h_n / c_n
        dh = (
            x.new_zeros(B, P) if dh_n is None else dh_n.clone(memory_format=torch.contiguous_format)
        )
        dc = (
            x.new_zeros(B, H) if dc_n is None else dc_n.clone(memory_format=torch.contiguous_format)
        )
        need = ctx.needs_input_grad
        _backward_steps(
            cell, gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse
        )
        # Gradients of the weights and input: one product each over all T*B rows.
        da2 = da.view(T * B, 4 * H)
        da_op = cell.operand(da2) if need[0] or need[3] or need[4] else da2
        dx = cell.mm(da_op, w_ih).view(T, B, I) if need[0] else None
        dw_ih = cell.mm(da_op.t(), x.reshape(T * B, I)) if need[3] else None
        h_prev = hs[1:] if reverse else hs[:T]
        dw_hh = cell.mm(da_op.t(), h_prev.reshape(T * B, P)) if need[4] else None
        db = da2.sum(0) if ctx.has_bias and (need[5] or need[6]) else None
        dw_hr = None
        if w_hr is not None and need[7]:
            dw_hr = torch.mm(dhs.view(T * B, P).t(), rs.view(T * B, H))
        # b_ih and b_hh get the same gradient; separate tensors, so that accumulating into one
        # .grad never changes the other.
        db2 = None if db is None else db.clone()
        return dx, dh, dc, dw_ih, dw_hh, db, db2, dw_hr, None, None, None, None


def lstm_layer_bptt(
    x, h0, c0, weights, batch_sizes, reverse: bool, record: bool, cell: Cell = TORCH_CELL
):
    """One layer through :class:`LSTMLayerFunction`: ``(y, h_n, c_n)`` and, when ``record``,
    the activated gates and the cell states."""
    out = LSTMLayerFunction.apply(x, h0, c0, *weights, batch_sizes, reverse, record, cell)
    return out[:5] if record else out[:3]
