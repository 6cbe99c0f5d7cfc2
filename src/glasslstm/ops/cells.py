"""The per-step cell: what a kernel for one step's gate math provides.

:func:`glasslstm.ops.bptt.lstm_layer_forward` and its backward run the time loop in Python and
call a :class:`Cell` for each step's pointwise math; the matrix products go through the cell
too (:meth:`Cell.mm`), so that a cell can take them in another precision. Cells:

* :class:`TorchCell` — torch ops: every device has it (``backend="bptt"``);
* :class:`NativeCell` — the C++ kernels' cell (``torch.ops.glasslstm.cell_forward_`` /
  ``cell_backward_``), float32 and float64; :class:`NativeBf16Cell` adds bf16 products with a
  float32 result (``torch.ops.glasslstm.mm_bf16``);
* :class:`glasslstm.ops.triton_cell.TritonCell` — Triton kernels on CUDA.

On the CPU the default path does not loop in Python at all: the whole layer is one operator,
``torch.ops.glasslstm.lstm_layer`` (:mod:`glasslstm.ops.native`), built from the same C++ cell.

The contract (rows of ``a`` and ``d`` are 4H wide: i, f, g, o; every other argument an (n, H)
view with unit column stride; everything in place):

* ``forward(a, c_prev, c, tc, out)``: ``a`` holds the pre-activations, gets the activated gates;
  writes ``c = f c_prev + i g``, ``tc = tanh(c)``, ``out = o tc``.
* ``backward_prepare(gates, tanh_c, H)``: per-step factors for all steps at once, or None.
* ``backward(a, c_prev, tc, dh, dy, dc, d, prep)``: ``dh`` the gradient reaching ``o tanh(c)``
  (``dy``, when not None, is added, in place into ``dh``); ``dc`` the gradient reaching ``c``
  in, ``dL/dc_prev`` out; ``d`` gets the pre-activation gradients. ``prep``: this step's rows of
  ``backward_prepare``'s result.
* ``mm(a, b)``, ``addmm_(out, a, b)`` (``out += a b``), ``mm_out(out, a, b)``: the matrix
  products the loop uses (torch's unless the cell says otherwise); ``operand(t)``: ``t``
  converted once for several products.
"""

from __future__ import annotations

import torch


class Cell:
    """Base of the cells: the contract above, with plain torch matrix products."""

    name = "cell"

    def forward(self, a, c_prev, c, tc, out) -> None:
        raise NotImplementedError

    def backward_prepare(self, gates, tanh_c, H: int):
        return None

    def backward(self, a, c_prev, tc, dh, dy, dc, d, prep) -> None:
        raise NotImplementedError

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b)

    def addmm_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        out.addmm_(a, b)

    def mm_out(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        torch.mm(a, b, out=out)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        return t


class TorchCell(Cell):
    """The gate math in torch ops: the fallback every device has."""

    name = "torch"

    def forward(self, a, c_prev, c, tc, out) -> None:
        H = c.shape[1]
        a[:, : 2 * H].sigmoid_()  # i, f
        a[:, 2 * H : 3 * H].tanh_()  # g = N_t, the new information
        a[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        torch.mul(f, c_prev, out=c)  # C_t = f * C_{t-1}
        c.addcmul_(i, g)  #       + i * N_t
        torch.tanh(c, out=tc)
        torch.mul(o, tc, out=out)  # H_t = o * tanh(C_t)

    def backward_prepare(self, gates, tanh_c, H: int):
        # sigma' = s (1 - s) for i, f, o and tanh' = 1 - g^2 for g.            (T, B, 4H)
        deriv = gates * (1.0 - gates)
        g_all = gates[..., 2 * H : 3 * H]
        torch.mul(g_all, g_all, out=deriv[..., 2 * H : 3 * H]).neg_().add_(1.0)
        # dH_t/dC_t through tanh, times o:  o (1 - tanh(C)^2)                     (T, B, H)
        o_dtanh = gates[..., 3 * H :] * (1.0 - tanh_c * tanh_c)
        return deriv, o_dtanh

    def backward(self, a, c_prev, tc, dh, dy, dc, d, prep) -> None:
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


class NativeCell(Cell):
    """The C++ kernels' cell: one call per step (float32, float64, on the CPU)."""

    name = "cpu-fused"

    def forward(self, a, c_prev, c, tc, out) -> None:
        torch.ops.glasslstm.cell_forward_(a, c_prev, c, tc, out)

    def backward(self, a, c_prev, tc, dh, dy, dc, d, prep) -> None:
        if dy is not None and dy.stride(0) != dh.stride(0):
            dh += dy  # the kernel reads both with one stride; add here instead
            dy = None
        torch.ops.glasslstm.cell_backward_(a, c_prev, tc, dh, dy, dc, d)


class NativeBf16Cell(NativeCell):
    """:class:`NativeCell` with bf16 matrix products and a float32 result (autocast's)."""

    name = "cpu-fused-bf16"

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.glasslstm.mm_bf16(a.detach(), b.detach())

    def addmm_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        out += self.mm(a, b)

    def mm_out(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        out.copy_(self.mm(a, b))

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.bfloat16)


TORCH_CELL = TorchCell()
