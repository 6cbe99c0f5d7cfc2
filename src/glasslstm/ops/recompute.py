"""Checkpointing through time: train long sequences in bounded memory by recomputing.

Training one layer normally keeps every step's activations until backward: the gates
(T, B, 4H), the cell states and tanh(C) (T, B, H) each, the hidden states; memory grows as
O(T·B·H), and a 10,000-step sequence runs out of it. :func:`checkpointed` cuts the time axis
into segments of ``steps`` steps. Forward runs them one after the other without recording
anything and keeps only each segment's initial state (``h``, ``c``: O(T/steps · B·H)) besides
the layer's input (which exists anyway); the output is written straight into one (T, B, ·)
tensor. Backward walks the segments from last to first: it recomputes one segment's
activations from its initial state, backpropagates through them (the gradient of the
segment's final state comes from the segment after it) and frees them before the next. What
stays O(T) is what autograd needs regardless: the input, the output and their gradients.

The cost is one more forward pass per training step, plus a few small operations per segment,
which show only for small layers cut into many short segments. Measured (H=I=256, B=16,
S=round(sqrt(T)), float32; python -m glasslstm.bench.memory_peak): +44% to +61% step time on one CPU
thread for T=1000-5000 (+18% at T=2000 when the input's gradient is computed too), +17% to
+65% on an H100; at T=10000 the checkpointed CPU step was faster (0.89x), the smaller memory
traffic outweighing the recomputation. The gradients are those of the
uncheckpointed layer up to rounding (the weight gradients are summed segment by segment
instead of in one GEMM over all T steps).

Why an ``autograd.Function`` and not ``torch.utils.checkpoint`` around each segment (which
was built and measured too): the output and the input gradient. With torch's checkpoint each
segment's output is a separate tensor joined by ``torch.cat``, so for a moment the output
exists twice, and the input gradient arrives in pieces joined the same way. Here both are
written in place into one tensor. Peak memory of a forward + backward at torch's allocator
(T=2000, B=16, H=I=256, float32): with S=45 (about sqrt(T)) 47 MiB here against 64 MiB, and
80 against 96 MiB when the input needs a gradient too. The other side: with long segments
(S=200) torch's was 7-10% lower (70 against 75, 101 against 113 MiB), because its
recomputation stops once the saved tensors are back, before the segment's output is made, and
its input gradient grows piece by piece instead of being allocated whole. So: this is the
better choice while one segment's activations (about 16·S·B·H values) are smaller than the
layer's input and output (T·B·(I + H)), which is where checkpointing is worth using.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# layer(x (t, B, ·), state (tuple of (B, ·)), params (tuple), batch_sizes (t ints) or None,
#       extras: bool, *timed (t, ·, ·))
#   -> (y (t, B, ·), *final state, *extras (t, B, ·) when extras)
Layer = Callable[..., tuple]


def checkpointed(
    layer: Layer,
    steps: int,
    x: torch.Tensor,
    state: tuple,
    params: tuple,
    batch_sizes: Sequence[int] | None,
    reverse: bool,
    extras: bool,
    timed: tuple = (),
) -> tuple:
    """``layer(x, state, params, batch_sizes, extras, *timed)`` run ``steps`` time steps at a
    time with checkpointing; returns what that call returns, for the whole sequence.

    ``layer`` runs one layer in one direction over a stretch of time: from ``x`` (t, B, ·), the
    initial ``state`` (a tuple of (B, ·) tensors), its parameters ``params`` (a tuple of
    tensors or None; gradients reach them only through this argument) and ``batch_sizes`` (t
    ints, the active rows per step, non-increasing; None when all B rows run every step) it
    returns ``(y, *final_state)`` and, when ``extras``, after them tensors (t, B, ·) that are
    not differentiated (e.g. recorded gates): made in forward only, concatenated over time
    like ``y``. ``reverse``: the layer runs from the last step to the first, so the segments do
    too, each handing its final state to the segment before it in time. ``timed``: constants
    with time first (T, ·, ·) that the layer reads step by step (zoneout's masks), each segment
    given its own steps of them.

    Where checkpointing cannot save anything (``steps`` is 0 or covers the whole sequence, or
    gradients are off) this is the plain call. The result supports one backward pass, not
    double backward.
    """
    T = x.shape[0]
    if steps <= 0 or steps >= T or not torch.is_grad_enabled():
        return layer(x, state, params, batch_sizes, extras, *timed)
    plan = _Plan(layer, steps, batch_sizes, reverse, extras, len(state), len(params), timed)
    return _Segments.apply(plan, x, *state, *params)


class _Plan(NamedTuple):
    layer: Layer
    steps: int
    batch_sizes: Sequence[int] | None
    reverse: bool
    extras: bool
    n_state: int
    n_params: int
    timed: tuple = ()

    def call(self, x, state, params, sizes, extras, a: int, b: int) -> tuple:
        """The layer on steps [a, b)."""
        return self.layer(x, state, params, sizes, extras, *(m[a:b] for m in self.timed))

    def segments(self, T: int, B: int) -> list[tuple[int, int, Sequence[int] | None]]:
        """``(start, stop, batch_sizes)`` of each segment, in the order the layer runs them."""
        out = []
        for a in range(0, T, self.steps):
            b = min(a + self.steps, T)
            sizes = None if self.batch_sizes is None else self.batch_sizes[a:b]
            if sizes is not None and sizes[-1] == B:
                sizes = None  # every row active in this segment: the faster full-batch path
            out.append((a, b, sizes))
        return out[::-1] if self.reverse else out


class _Segments(torch.autograd.Function):
    """Inputs ``(plan, x, *state, *params)``; outputs ``(y, *final_state, *extras)``."""

    @staticmethod
    def forward(ctx, plan: _Plan, x, *tensors):
        n = plan.n_state
        state, params = tuple(tensors[:n]), tuple(tensors[n:])
        T, B = x.shape[0], x.shape[1]
        segments = plan.segments(T, B)
        starts: list[torch.Tensor] = []
        timed: list[torch.Tensor] | None = (
            None  # y and the extras, (T, B, ·) each, filled segment by segment
        )
        for a, b, sizes in segments:  # grad mode is off in here: nothing is recorded
            starts.extend(state)
            res = plan.call(x[a:b], state, params, sizes, plan.extras, a, b)
            state = tuple(res[1 : 1 + n])
            pieces = (res[0],) + tuple(res[1 + n :])
            if timed is None:
                timed = [p.new_empty((T,) + p.shape[1:]) for p in pieces]
            for whole, piece in zip(timed, pieces):
                whole[a:b] = piece
        assert timed is not None  # T >= 1: at least one segment ran
        ctx.save_for_backward(x, *params, *starts)
        ctx.plan, ctx.segments = plan, segments
        if len(timed) > 1:
            ctx.mark_non_differentiable(*timed[1:])
        ctx.set_materialize_grads(False)  # h_n or c_n often gets no gradient: None, not zeros
        return (timed[0], *state, *timed[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *grads):
        plan = ctx.plan
        n, m = plan.n_state, plan.n_params
        saved = ctx.saved_tensors
        x, params, starts = saved[0], saved[1 : 1 + m], saved[1 + m :]
        need = ctx.needs_input_grad  # (plan, x, *state, *params)
        need_x, need_state0, need_params = need[1], need[2 : 2 + n], need[2 + n :]
        dx = torch.empty_like(x) if need_x else None
        dparams: list[torch.Tensor | None] = [None] * m
        dstate = list(grads[:n])  # into the final state (or None)
        for k in range(len(ctx.segments) - 1, -1, -1):  # the last segment run comes first
            a, b, sizes = ctx.segments[k]
            # The first segment's initial state is the caller's; later ones carry the gradient on.
            with torch.enable_grad():
                xs = x[a:b].detach().requires_grad_(need_x)
                sts = tuple(
                    s.detach().requires_grad_(k > 0 or need_state0[i])
                    for i, s in enumerate(starts[k * n : (k + 1) * n])
                )
                ps = tuple(
                    None if p is None else p.detach().requires_grad_(need_params[i])
                    for i, p in enumerate(params)
                )
                res = plan.call(xs, sts, ps, sizes, False, a, b)  # the segment's activations again
            outs, douts = [], []
            for out, d in zip(res[: 1 + n], (None if dy is None else dy[a:b], *dstate)):
                if d is not None and out.requires_grad:
                    outs.append(out)
                    douts.append(d)
            wrt = [t for t in (xs, *sts, *ps) if t is not None and t.requires_grad]
            got = iter(
                torch.autograd.grad(outs, wrt, douts, allow_unused=True)
                if outs and wrt
                else [None] * len(wrt)
            )
            del res, outs  # free the segment's activations before the next one
            if need_x:
                gx = next(got)
                if gx is None:
                    dx[a:b].zero_()
                else:
                    dx[a:b] = gx
            dstate = [next(got) if s.requires_grad else None for s in sts]
            for i, p in enumerate(ps):
                if p is not None and p.requires_grad:
                    g = next(got)
                    # not in place: autograd may hand one tensor to two params (b_ih, b_hh)
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i] + g
        return (None, dx, *dstate, *dparams)
