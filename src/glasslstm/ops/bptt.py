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

Shapes: T steps, B batch, I input size, H hidden size, P recurrent size (= H, or proj_size).
Gate order in every 4H dimension is torch's: i, f, g, o (the article's i, f, N, o).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _pad_mask(batch_sizes: list[int], batch: int, device: torch.device) -> torch.Tensor:
    """(T, B, 1) bool: True where step t of row b is past the row's length."""
    sizes = torch.tensor(batch_sizes, device=device)
    return (torch.arange(batch, device=device)[None, :] >= sizes[:, None]).unsqueeze(-1)


def lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, cell=None):
    """The forward pass; returns everything backward needs (no autograd involved).

    ``cell`` does each step's pointwise gate math (default :data:`TORCH_CELL`; see
    :class:`TorchCell` for the contract a fused kernel meets).

    Returns ``(gates, hs, cs, tanh_c, rs)``: ``gates`` (T, B, 4H) the activated i, f, g, o
    (rows past a sequence's end hold junk); ``hs`` (T+1, B, P) and ``cs`` (T+1, B, H) the states,
    with the initial state at index 0 (forward) or T (reverse) and the state after step t at
    t+1 (forward) or t (reverse); ``tanh_c`` (T, B, H); ``rs`` (T, B, H) ``o * tanh(c)`` before
    the projection, or None without one.
    """
    cell = cell or TORCH_CELL
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    P = h0.shape[1]
    ragged = batch_sizes is not None
    x2 = x.reshape(T * B, -1)
    # Input projections of all steps at once: x_t U + b  -> (T, B, 4H). On many rows a
    # contiguous U^T pays for its copy (MKL's GEMM on a transposed view: ~20% slower).
    # (not for a cell with its own GEMM: the bf16 one converts U, whatever its layout)
    u = (
        w_ih.t().contiguous()
        if T * B >= 64 and x.device.type == "cpu" and not hasattr(cell, "mm")
        else w_ih.t()
    )
    # A kernel that runs the whole time loop adds b itself, as it reads each step's gates:
    # addmm would first write the broadcast bias over all T*B rows (at H = 128 that copy cost
    # ~5% of a training step).
    whole = getattr(cell, "layer_forward", None)
    mm = getattr(cell, "mm", torch.mm)  # a bf16 cell's: bf16 operands, float32 result
    if bias is not None and whole is None:
        gates = torch.addmm(bias, x2, u).view(T, B, 4 * H)
    else:
        gates = mm(x2, u).view(T, B, 4 * H)
    hs = x.new_empty(T + 1, B, P)
    cs = x.new_empty(T + 1, B, H)
    tanh_c = x.new_empty(T, B, H)
    # o * tanh(c) before the projection; zero-filled when ragged so dW_hr's GEMM sees no junk
    rs = None if w_hr is None else (x.new_zeros if ragged else x.new_empty)(T, B, H)
    start = T if reverse else 0
    hs[start] = h0
    cs[start] = c0
    if whole is not None:
        if whole(gates, hs, cs, tanh_c, rs, w_hh, w_hr, batch_sizes, reverse, bias):
            return gates, hs, cs, tanh_c, rs
        if bias is not None:  # the loop could not run there: the Python loop below
            gates += bias
    # Contiguous transposed copies: the per-step GEMM on a transposed view is 20-30% slower
    # (measured at H=512 and 1024). The copy costs about one step, so only long sequences get
    # it — not the one-token steps of generation.
    copy = T >= 8
    w_hh_t = w_hh.t().contiguous() if copy else w_hh.t()
    w_hr_t = None if w_hr is None else (w_hr.t().contiguous() if copy else w_hr.t())
    for t in range(T - 1, -1, -1) if reverse else range(T):
        prev, cur = (t + 1, t) if reverse else (t, t + 1)
        nb = B if not ragged else batch_sizes[t]
        if nb < B:  # rows past their end (or before their start) keep their state
            hs[cur, nb:] = hs[prev, nb:]
            cs[cur, nb:] = cs[prev, nb:]
            if nb == 0:
                continue
        a = gates[t, :nb]  # (nb, 4H): x_t U + b
        a.addmm_(hs[prev, :nb], w_hh_t)  # + H_{t-1} W
        if w_hr_t is None:  # activations in place; C_t, tanh(C_t), H_t
            cell.forward(a, cs[prev, :nb], cs[cur, :nb], tanh_c[t, :nb], hs[cur, :nb])
        else:
            r = rs[t, :nb]
            cell.forward(a, cs[prev, :nb], cs[cur, :nb], tanh_c[t, :nb], r)
            torch.mm(r, w_hr_t, out=hs[cur, :nb])  # H_t = (o * tanh(C_t)) W_hr^T
    return gates, hs, cs, tanh_c, rs


def _backward_steps(
    cell, gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse
) -> None:
    """The backward time loop in Python, one ``cell.backward`` and one GEMM per step; fills
    ``da`` (and ``dhs``) and leaves the initial state's gradients in ``dh``/``dc``."""
    T, B, H4 = gates.shape
    H = H4 // 4
    prep = cell.backward_prepare(gates, tanh_c, H)
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
        torch.mm(d, w_hh, out=dh_t)  # dL/dH_{t-1}


class TorchCell:
    """The pointwise gate math of one step, in torch ops: the fallback every device has.

    A fused kernel (:mod:`glasslstm.ops.cpu`, :mod:`glasslstm.ops.triton_cell`) provides the
    same two methods with the same in-place contract. Rows of ``a`` and ``d`` are 4H wide (i, f,
    g, o); every other argument is an (n, H) view with unit column stride.
    """

    name = "torch"

    @staticmethod
    def forward(a, c_prev, c, tc, out) -> None:
        """``a``: pre-activations in, activated gates out; writes ``c = f c_prev + i g``,
        ``tc = tanh(c)``, ``out = o tc``."""
        H = c.shape[1]
        a[:, : 2 * H].sigmoid_()  # i, f
        a[:, 2 * H : 3 * H].tanh_()  # g = N_t, the new information
        a[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        torch.mul(f, c_prev, out=c)  # C_t = f * C_{t-1}
        c.addcmul_(i, g)  #       + i * N_t
        torch.tanh(c, out=tc)
        torch.mul(o, tc, out=out)  # H_t = o * tanh(C_t)

    @staticmethod
    def backward_prepare(gates, tanh_c, H):
        """Per-step factors computed for all steps at once (few large ops beat many small)."""
        # sigma' = s (1 - s) for i, f, o and tanh' = 1 - g^2 for g.            (T, B, 4H)
        deriv = gates * (1.0 - gates)
        g_all = gates[..., 2 * H : 3 * H]
        torch.mul(g_all, g_all, out=deriv[..., 2 * H : 3 * H]).neg_().add_(1.0)
        # dH_t/dC_t through tanh, times o:  o (1 - tanh(C)^2)                     (T, B, H)
        o_dtanh = gates[..., 3 * H :] * (1.0 - tanh_c * tanh_c)
        return deriv, o_dtanh

    @staticmethod
    def backward(a, c_prev, tc, dh, dy, dc, d, prep) -> None:
        """One step back. ``dh``: dL/d(o tanh c) from later steps (``dy``, when not None, is
        added: in place, into ``dh``); ``dc``: dL/dC_t from later steps in, dL/dC_{t-1} out;
        ``d``: the pre-activation gradients out. ``prep``: this step's rows of
        :meth:`backward_prepare`'s result (fused kernels get None)."""
        deriv, o_dtanh = prep
        H = dc.shape[1]
        if dy is not None:
            dh += dy
        i, f, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H]
        dc.addcmul_(dh, o_dtanh)  # dL/dC_t
        torch.mul(dc, g, out=d[:, :H])  # dL/di
        torch.mul(dc, c_prev, out=d[:, H : 2 * H])  # dL/df
        torch.mul(dc, i, out=d[:, 2 * H : 3 * H])  # dL/dN
        torch.mul(dh, tc, out=d[:, 3 * H :])  # dL/do
        d.mul_(deriv)  # through sigma / tanh: pre-activation grads
        dc.mul_(f)  # dL/dC_{t-1}


TORCH_CELL = TorchCell()


class LSTMLayerFunction(torch.autograd.Function):
    """autograd.Function for one layer and direction: forward above, hand-written BPTT below.

    Inputs: ``x`` (T, B, I), ``h0`` (B, P), ``c0`` (B, H), ``w_ih`` (4H, I), ``w_hh`` (4H, P),
    ``b_ih``/``b_hh`` (4H) or None, ``w_hr`` (P, H) or None, ``batch_sizes`` (list of T ints, or
    None when all rows run all T steps), ``reverse`` (bool), ``record`` (bool), ``cell`` (the
    pointwise kernel, default :data:`TORCH_CELL`), ``grad`` (bool: the caller's grad mode;
    False lets ``y`` share the memory of the kept states).
    Outputs: ``y`` (T, B, P) with zeros past each row's end, ``h_n`` (B, P), ``c_n`` (B, H), and
    when ``record``: the activated gates (T, B, 4H) and the cell states (T, B, H), not
    differentiable (they are for looking at).
    """

    @staticmethod
    def forward(
        ctx,
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
        record,
        cell=None,
        grad=True,
    ):
        T, B, _ = x.shape
        cell = cell or TORCH_CELL
        bias = None if b_ih is None else b_ih + b_hh
        gates, hs, cs, tanh_c, rs = lstm_layer_forward(
            x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, cell
        )
        states = slice(0, T) if reverse else slice(1, T + 1)
        end = 0 if reverse else T
        # Without a backward to come (``grad``: the caller's grad mode), y can be the
        # (contiguous) view of hs itself: the copy was ~7% of an H = 128 inference call. With
        # one, hs is saved for it and y must not share its memory (an in-place change of y
        # would corrupt the backward).
        h_n, c_n = hs[end].clone(), cs[end].clone()  # before y's padding (it may be hs's)
        backward_to_come = grad and any(ctx.needs_input_grad)
        y = hs[states].clone() if backward_to_come else hs[states]
        pad = None
        if batch_sizes is not None:
            pad = _pad_mask(batch_sizes, B, x.device)
            y.masked_fill_(pad, 0.0)
        outputs = [y, h_n, c_n]
        if record:  # likewise the recorded gates and cells (what an inspection reads)
            g_rec = gates.clone() if backward_to_come else gates
            c_rec = cs[states].clone() if backward_to_come else cs[states]
            if pad is not None:
                g_rec.masked_fill_(pad, 0.0)
                c_rec.masked_fill_(pad, 0.0)
            ctx.mark_non_differentiable(g_rec, c_rec)
            outputs += [g_rec, c_rec]
        # Intermediates too go through save_for_backward: autograd frees them after backward
        # (unless retain_graph) and saved-tensor hooks (offloading, checkpointing) see them.
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, gates, hs, cs, tanh_c, rs)
        # Unused outputs (the recorded gates always; often h_n/c_n) arrive as None instead of
        # zero-filled tensors.
        ctx.set_materialize_grads(False)
        ctx.batch_sizes = batch_sizes
        ctx.reverse = reverse
        ctx.cell = cell
        ctx.has_bias = b_ih is not None
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n, *_recorded):
        x, w_ih, w_hh, w_hr, gates, hs, cs, tanh_c, rs = ctx.saved_tensors
        batch_sizes, reverse = ctx.batch_sizes, ctx.reverse
        T, B, I = x.shape
        H = w_hh.shape[0] // 4
        P = hs.shape[2]
        ragged = batch_sizes is not None

        cell = ctx.cell
        if dy is not None and not dy.is_contiguous():
            dy = dy.contiguous()  # e.g. the expanded gradient of a sum(): fused kernels need rows
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
        need_db = ctx.has_bias and (need[5] or need[6])
        whole = getattr(cell, "layer_backward", None)  # a kernel that runs the whole time loop
        # such a kernel sums the bias gradient while each step's da is in cache
        db = x.new_empty(4 * H) if need_db and whole is not None else None
        if whole is None or not whole(
            gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse, db
        ):
            _backward_steps(
                cell, gates, cs, tanh_c, dy, dh, dc, da, dhs, w_hh, w_hr, batch_sizes, reverse
            )
            db = None

        # Gradients of the weights and input: one GEMM each over all T*B rows.
        da2 = da.view(T * B, 4 * H)
        mm = getattr(cell, "mm", torch.mm)  # a bf16 cell's GEMMs: bf16 in, float32 out
        da_op = da2  # converted once for up to three GEMMs
        if hasattr(cell, "operand") and (need[0] or need[3] or need[4]):
            da_op = cell.operand(da2)
        dx = mm(da_op, w_ih).view(T, B, I) if need[0] else None
        dw_ih = mm(da_op.t(), x.reshape(T * B, I)) if need[3] else None
        h_prev = hs[1:] if reverse else hs[:T]
        dw_hh = mm(da_op.t(), h_prev.reshape(T * B, P)) if need[4] else None
        if need_db and db is None:
            db = da2.sum(0)
        dw_hr = None
        if w_hr is not None and need[7]:
            dw_hr = mm(dhs.view(T * B, P).t(), rs.view(T * B, H))
        # b_ih and b_hh get the same gradient; separate tensors, so that accumulating into one
        # .grad never changes the other.
        db2 = None if db is None else db.clone()
        return dx, dh, dc, dw_ih, dw_hh, db, db2, dw_hr, None, None, None, None, None
