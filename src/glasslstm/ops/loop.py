"""One LSTM layer in one direction as a plain torch loop; autograd derives the backward.

The fallback path: every op is an ordinary differentiable torch op, so it supports whatever
autograd supports (double backward, forward-mode AD, anomaly detection) at the cost of speed.
Same inputs, outputs and variable-length layout as :class:`glasslstm.ops.bptt.LSTMLayerFunction`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cell(a: torch.Tensor, c_prev: torch.Tensor):
    """The article's cell from pre-activations ``a = x_t U + H_{t-1} W + b`` (B, 4H).

    Returns ``(i, f, g, o, c, r)`` with ``r = o * tanh(c)`` (= H_t without a projection).
    """
    ai, af, ag, ao = a.chunk(4, dim=1)
    f = torch.sigmoid(af)          # forget gate: what of C_{t-1} to keep
    i = torch.sigmoid(ai)          # input gate: how much of the new information to add
    g = torch.tanh(ag)             # N_t: the new information (candidate)
    c = f * c_prev + i * g         # C_t: cell state, long-term memory
    o = torch.sigmoid(ao)          # output gate
    r = o * torch.tanh(c)          # H_t: hidden state, short-term memory
    return i, f, g, o, c, r


def lstm_layer_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, record):
    """Same contract as ``LSTMLayerFunction.apply`` (recorded tensors are detached)."""
    T, B, _ = x.shape
    bias = None if b_ih is None else b_ih + b_hh
    xu = F.linear(x, w_ih, bias)                       # (T, B, 4H): x_t U + b for all steps
    h, c = h0, c0
    ys, gates, cells = [None] * T, [None] * T, [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        nb = B if batch_sizes is None else batch_sizes[t]
        a = xu[t, :nb] + h[:nb] @ w_hh.t()
        i, f, g, o, c_new, r = cell(a, c[:nb])
        h_new = r if w_hr is None else r @ w_hr.t()
        if nb < B:  # finished (or not yet started) rows keep their state; their output is 0
            h = torch.cat([h_new, h[nb:]])
            c = torch.cat([c_new, c[nb:]])
            ys[t] = F.pad(h_new, (0, 0, 0, B - nb))
        else:
            h, c = h_new, c_new
            ys[t] = h_new
        if record:
            gates[t] = F.pad(torch.cat([i, f, g, o], 1).detach(), (0, 0, 0, B - nb))
            cells[t] = F.pad(c_new.detach(), (0, 0, 0, B - nb))
    out = (torch.stack(ys), h, c)
    if record:
        out += (torch.stack(gates), torch.stack(cells))
    return out
