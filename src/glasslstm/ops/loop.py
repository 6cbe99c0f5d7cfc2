"""Recurrent layers as plain torch loops; autograd derives the backward.

The fallback path for the LSTM, and the only path of the GRU and the vanilla RNN (the
comparison models): every op is an ordinary differentiable torch op, so it supports whatever
autograd supports (double backward, forward-mode AD, anomaly detection) at the cost of speed.
Variable lengths use the same shrinking-batch layout as :mod:`glasslstm.ops.bptt`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from glasslstm.ops.variant import LN_EPS, Variant

Step = Callable[[torch.Tensor, tuple], tuple]


def run_loop(xw: torch.Tensor, state0: tuple, step: Step, batch_sizes, reverse: bool, record: bool):
    """The time loop shared by every cell.

    ``xw`` (T, B, ·) holds the input projections of all steps; ``step(xw_t, state)`` maps one
    step's projections and the active rows' state (a tuple of (nb, ·) tensors) to ``(new
    state, output (nb, out), recorded {name: (nb, ·)})``. Rows past their length keep their
    state and output zeros. Returns ``(y (T, B, out), final state, recorded (T, B, ·) or None)``.
    """
    T, B = xw.shape[0], xw.shape[1]
    state = state0
    ys: list[torch.Tensor] = []
    recs: list[dict[str, torch.Tensor]] = []
    # One unbind, not T indexings: autograd's backward of xw[t] writes a zero-filled gradient of
    # all of xw for every t (O(T^2): a T = 1000 RNN step took 10 ms); unbind's backward is one
    # stack of the T step gradients.
    xs = xw.unbind(0)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        nb = B if batch_sizes is None else batch_sizes[t]
        x_t = xs[t] if nb == B else xs[t][:nb]
        new_state, y, rec = step(x_t, tuple(s if nb == B else s[:nb] for s in state))
        if nb < B:  # finished (or not yet started) rows keep their state; their output is 0
            state = tuple(torch.cat([n, s[nb:]]) for n, s in zip(new_state, state))
        else:
            state = new_state
        ys.append(F.pad(y, (0, 0, 0, B - nb)))
        if record:
            recs.append({k: F.pad(v.detach(), (0, 0, 0, B - nb)) for k, v in rec.items()})
    if reverse:  # the steps ran from T - 1 down to 0
        ys.reverse()
        recs.reverse()
    recorded = {k: torch.stack([r[k] for r in recs]) for k in recs[0]} if record else None
    return torch.stack(ys), state, recorded


def cell(a: torch.Tensor, c_prev: torch.Tensor):
    """The article's cell from pre-activations ``a = x_t U + H_{t-1} W + b`` (B, 4H).

    Returns ``(i, f, g, o, c, r)`` with ``r = o * tanh(c)`` (= H_t without a projection).
    """
    ai, af, ag, ao = a.chunk(4, dim=1)
    f = torch.sigmoid(af)  # forget gate: what of C_{t-1} to keep
    i = torch.sigmoid(ai)  # input gate: how much of the new information to add
    g = torch.tanh(ag)  # N_t: the new information (candidate)
    c = f * c_prev + i * g  # C_t: cell state, long-term memory
    o = torch.sigmoid(ao)  # output gate
    r = o * torch.tanh(c)  # H_t: hidden state, short-term memory
    return i, f, g, o, c, r


def variant_cell(a_x, a_h, c_prev, v: Variant):
    """:func:`cell` with the regularised family (:mod:`glasslstm.ops.variant`): ``a_x`` the
    input part of the pre-activations (normalised and biased already), ``a_h`` the recurrent
    product. Returns ``(i, f, g, o, c_new, r)``, ``c_new`` before zoneout."""
    H = c_prev.shape[1]
    if v.ln_hh is not None:
        a_h = F.layer_norm(a_h, (4 * H,), v.ln_hh, None, LN_EPS)
    ai, af, ag, ao = (a_x + a_h).chunk(4, dim=1)
    if v.peephole is not None:  # i and f see C_{t-1}, o sees C_t
        p_i, p_o, p_f = v.peephole.chunk(3)
        ai, af = ai + p_i * c_prev, af + p_f * c_prev
    i, f, g = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag)
    c = f * c_prev + i * g
    if v.cell_clip > 0:
        c = c.clamp(-v.cell_clip, v.cell_clip)
    o = torch.sigmoid(ao if v.peephole is None else ao + p_o * c)
    n = c if v.ln_c is None else F.layer_norm(c, (H,), v.ln_c, v.ln_c_bias, LN_EPS)
    return i, f, g, o, c, o * torch.tanh(n)


def lstm_layer_loop(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, record, variant=None
):
    """Same contract as ``LSTMLayerFunction.apply`` (recorded tensors are detached), and the
    regularised family when ``variant`` (a :class:`~glasslstm.ops.variant.Variant`) is given."""
    bias = None if b_ih is None else b_ih + b_hh
    if variant is not None and variant.active():
        return _variant_layer_loop(
            x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, record, variant
        )

    def step(xu, state):
        h, c = state
        i, f, g, o, c_new, r = cell(xu + h @ w_hh.t(), c)
        h_new = r if w_hr is None else r @ w_hr.t()
        return (h_new, c_new), h_new, {"gates": torch.cat([i, f, g, o], 1), "c": c_new}

    y, (h, c), rec = run_loop(F.linear(x, w_ih, bias), (h0, c0), step, batch_sizes, reverse, record)
    return (y, h, c) + ((rec["gates"], rec["c"]) if record else ())


def _variant_layer_loop(x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, record, v):
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    xu = F.linear(x, w_ih)
    if v.ln_ih is not None:
        xu = F.layer_norm(xu, (4 * H,), v.ln_ih, None, LN_EPS)
    if bias is not None:
        xu = xu + bias
    # the per-step masks ride along with the input projections (the loop slices them per step)
    extras = [xu]
    for m, width in ((v.zoneout_c, H), (v.zoneout_h, P)):
        if m is not None:
            extras.append(m.expand(T, B, width).to(xu.dtype))
    xw = torch.cat(extras, dim=2) if len(extras) > 1 else xu
    sizes = [4 * H] + [H] * (v.zoneout_c is not None) + [P] * (v.zoneout_h is not None)

    def step(xw_t, state):
        h, c = state
        parts = list(xw_t.split(sizes, dim=1))
        xu_t = parts.pop(0)
        kc = parts.pop(0) if v.zoneout_c is not None else None
        kh = parts.pop(0) if v.zoneout_h is not None else None
        hr = h if v.h_mask is None else h * v.h_mask[: h.shape[0]]  # active rows come first
        i, f, g, o, c_new, r = variant_cell(xu_t, hr @ w_hh.t(), c, v)
        h_new = r if w_hr is None else r @ w_hr.t()
        if kc is not None:  # zoneout: each unit keeps its previous value with probability k
            c_new = torch.lerp(c_new, c, kc)
        if kh is not None:
            h_new = torch.lerp(h_new, h, kh)
        return (h_new, c_new), h_new, {"gates": torch.cat([i, f, g, o], 1), "c": c_new}

    y, (h, c), rec = run_loop(xw, (h0, c0), step, batch_sizes, reverse, record)
    return (y, h, c) + ((rec["gates"], rec["c"]) if record else ())


def layer_gradients(inputs, need, dy, dh_n, dc_n, batch_sizes, reverse, cell_clip=0.0):
    """The gradients of one LSTM layer with respect to ``inputs`` = ``(x, h0, c0, w_ih, w_hh,
    b_ih, b_hh, w_hr)``, followed by a :class:`~glasslstm.ops.variant.Variant`'s tensors when
    the layer has one (``cell_clip`` its bound), (None where ``need`` is false), as functions
    of the inputs: the layer recomputed by this loop (the same numbers as the fused paths) and
    differentiated with a graph. What a fused path's backward returns when asked for a
    differentiable backward (``create_graph=True``: double backward)."""
    wanted = [t for t, n in zip(inputs, need) if n]
    variant = Variant(*inputs[8:], cell_clip=cell_clip) if len(inputs) > 8 else None
    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        y, h_n, c_n = lstm_layer_loop(*inputs[:8], batch_sizes, reverse, False, variant=variant)[:3]
        outs, grads = [], []
        for out, g in ((y, dy), (h_n, dh_n), (c_n, dc_n)):
            if g is not None:
                outs.append(out)
                grads.append(g)
        found = torch.autograd.grad(outs, wanted, grads, create_graph=True, allow_unused=True)
    it = iter(found)
    return tuple(
        (torch.zeros_like(t) if (g := next(it)) is None else g) if n else None
        for t, n in zip(inputs, need)
    )


def gru_layer_loop(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, record):
    """torch.nn.GRU's cell (gate order r, z, n). Returns ``(y, h_n, recorded or None)``."""

    def step(xg, state):
        (h,) = state
        hg = F.linear(h, w_hh, b_hh)  # (nb, 3H): kept apart for r * (.)
        xr, xz, xn = xg.chunk(3, 1)
        hr, hz, hn = hg.chunk(3, 1)
        r = torch.sigmoid(xr + hr)  # reset gate
        z = torch.sigmoid(xz + hz)  # update gate: how much of h to keep
        n = torch.tanh(xn + r * hn)  # candidate
        h_new = (1 - z) * n + z * h
        return (h_new,), h_new, {"r": r, "z": z, "n": n}

    y, (h,), rec = run_loop(F.linear(x, w_ih, b_ih), (h0,), step, batch_sizes, reverse, record)
    return y, h, rec


def rnn_layer_loop(
    x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, record, nonlinearity: str = "tanh"
):
    """The vanilla RNN, ``h_t = tanh(x_t W_ih^T + h_{t-1} W_hh^T + b)``: ``(y, h_n, None)``."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    bias = None if b_ih is None else b_ih + b_hh

    def step(xw, state):
        h_new = act(xw + state[0] @ w_hh.t())
        return (h_new,), h_new, {}

    y, (h,), _ = run_loop(F.linear(x, w_ih, bias), (h0,), step, batch_sizes, reverse, False)
    return y, h, None
