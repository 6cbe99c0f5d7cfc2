"""What the C++ operators need from Python to work with the rest of PyTorch.

ops.cpp defines the schemas and the CPU kernels; this module registers, for each operator:

* a fake implementation (output shapes and dtypes without computing): what ``torch.compile``,
  ``torch.export`` and ``FakeTensor`` tracing run instead of the kernel;
* for ``glasslstm::lstm_layer``, its derivative (``torch.library.register_autograd``): the
  hand-derived backward through time, ``glasslstm::lstm_layer_backward``. A backward that
  itself builds a graph (``create_graph=True``: double backward, ``gradgradcheck``) recomputes
  the layer with the plain torch loop of :mod:`glasslstm.ops.loop` and differentiates that, so
  second derivatives are exact, not zero. The same derivative as an autograd.Function with
  ``setup_context`` and a vmap rule, :class:`LayerFunction`, is what glasslstm calls in eager
  mode: torch.func's transforms (grad, vmap, jacrev) take only that form; jit traces record
  the operator itself;
* vmap rules (``torch.func.vmap``): a batch of inputs is folded into the LSTM's own batch
  dimension where only the inputs and state carry it; anything else (batched weights, ragged
  batches) runs the operator once per slice.

:func:`register` runs once, when :mod:`glasslstm.ops.native` has loaded the library.
"""

from __future__ import annotations

import functools

import torch

from glasslstm.ops.loop import layer_gradients

OP = "glasslstm::"

# lstm_layer's arguments: 15, then the regularised family's (glasslstm.ops.variant.Variant):
# 8 tensors (5 parameters, 3 masks) and cell_clip
N_BASE, N_VARIANT = 15, 8
VARIANT_PARAMS = range(N_BASE, N_BASE + 5)  # ln_ih, ln_hh, ln_c, ln_c_bias, peephole


def aux_width(H: int, ln_ih, ln_hh, ln_c, cell_clip: float, zoneout_c) -> int:
    """Values per (t, b) row of what the family's backward keeps (ops.cpp's aux_layout)."""
    ln = ln_ih is not None or ln_hh is not None or ln_c is not None
    return (
        4 * H * (ln_ih is not None)
        + 4 * H * (ln_hh is not None)
        + H * (ln_c is not None)
        + H * (cell_clip > 0 or zoneout_c is not None)
        + 3 * ln
    )


def _layer_fake(
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
    ln_ih=None,
    ln_hh=None,
    ln_c=None,
    ln_c_bias=None,
    peephole=None,
    zoneout_c=None,
    zoneout_h=None,
    h_mask=None,
    cell_clip=0.0,
):
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    keep = train or record
    K = aux_width(H, ln_ih, ln_hh, ln_c, cell_clip, zoneout_c)
    return (
        x.new_empty(T, B, P),
        x.new_empty(B, P),
        x.new_empty(B, H),
        x.new_empty(T, B, 4 * H) if keep else x.new_empty(0),
        x.new_empty(T, B, H) if keep else x.new_empty(0),
        x.new_empty(T, B, H) if train else x.new_empty(0),
        x.new_empty(T, B, H) if train and w_hr is not None else x.new_empty(0),
        x.new_empty(T, B, K) if train and K else x.new_empty(0),
    )


def _backward_fake(
    dy,
    dh_n,
    dc_n,
    x,
    h0,
    c0,
    w_ih,
    w_hh,
    w_hr,
    y,
    gates,
    cs,
    tanh_c,
    rs,
    batch_sizes,
    reverse,
    has_bias,
    output_mask,
    bf16,
    step_gemm,
    big_gemm,
    aux=None,
    ln_ih=None,
    ln_hh=None,
    ln_c=None,
    ln_c_bias=None,
    peephole=None,
    zoneout_c=None,
    zoneout_h=None,
    h_mask=None,
    cell_clip=0.0,
):
    H = w_hh.shape[0] // 4
    shapes = (
        x.shape,
        h0.shape,
        c0.shape,
        w_ih.shape,
        w_hh.shape,
        (4 * H,),
        None if w_hr is None else w_hr.shape,
    )
    want = list(output_mask)
    want[5] = want[5] and has_bias
    grads = tuple(
        x.new_empty(s) if w and s is not None else x.new_empty(0) for w, s in zip(want, shapes)
    )
    params = (ln_ih, ln_hh, ln_c, ln_c_bias, peephole)
    return grads + tuple(x.new_empty(0) if p is None else x.new_empty(p.shape) for p in params)


# ---- the derivative of lstm_layer ------------------------------------------------------------

_LAYER_ARGS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _layer_setup(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * N_VARIANT + (0.0,) * (len(inputs) == N_BASE)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs[:8]
    batch_sizes, reverse, train, record, bf16, step_gemm, big_gemm = inputs[8:N_BASE]
    variant = inputs[N_BASE : N_BASE + N_VARIANT]
    y, h_n, c_n, gates, cs, tanh_c, rs, aux = output
    ctx.mark_non_differentiable(gates, cs, tanh_c, rs, aux)
    ctx.set_materialize_grads(False)  # unused outputs (h_n, c_n often): None, not zeros
    ctx.save_for_backward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *variant, y, gates, cs, tanh_c, rs, aux
    )
    ctx.batch_sizes, ctx.reverse, ctx.train = batch_sizes, reverse, train
    ctx.bf16, ctx.step_gemm, ctx.big_gemm = bf16, step_gemm, big_gemm
    ctx.cell_clip = inputs[N_BASE + N_VARIANT]


def _layer_backward(ctx, dy, dh_n, dc_n, *_recorded):
    saved = ctx.saved_tensors
    inputs, variant = saved[:8], saved[8 : 8 + N_VARIANT]
    y, gates, cs, tanh_c, rs, aux = saved[8 + N_VARIANT :]
    n_in = len(ctx.needs_input_grad)
    need = ctx.needs_input_grad[:8]
    need_v = [ctx.needs_input_grad[i] if i < n_in else False for i in VARIANT_PARAMS]
    tail = (None,) * (n_in - N_BASE - 5)  # the masks and cell_clip: no gradients
    has_variant = any(t is not None for t in variant) or ctx.cell_clip > 0
    if torch.is_grad_enabled():  # create_graph: a differentiable backward
        args = (*inputs, *variant) if has_variant else inputs
        wants = (*need, *need_v, False, False, False) if has_variant else need
        grads = layer_gradients(
            args, wants, dy, dh_n, dc_n, ctx.batch_sizes, ctx.reverse, ctx.cell_clip
        )
        return (*grads[:8], *(None,) * 7, *(grads[8:13] if has_variant else (None,) * 5))[
            :n_in
        ] + tail
    if not ctx.train:
        raise RuntimeError(
            "glasslstm: this LSTM layer ran without keeping what its backward needs (train=False "
            "while gradients were required); call it with gradients enabled"
        )
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    mask = [need[0], need[1], need[2], need[3], need[4], need[5] or need[6], need[7]]
    out = torch.ops.glasslstm.lstm_layer_backward(
        dy,
        dh_n,
        dc_n,
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        w_hr,
        y,
        gates,
        cs,
        tanh_c,
        rs,
        ctx.batch_sizes,
        ctx.reverse,
        b_ih is not None,
        mask,
        ctx.bf16,
        ctx.step_gemm,
        ctx.big_gemm,
        aux,
        *variant,
        ctx.cell_clip,
    )
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = out[:7]
    grads = (
        dx,
        dh0,
        dc0,
        dw_ih,
        dw_hh,
        db if need[5] else None,
        # b_ih and b_hh get the same gradient, as separate tensors
        (db.clone() if need[5] else db) if need[6] else None,
        dw_hr,
    )
    family = tuple(g if n else None for g, n in zip(out[7:], need_v))
    return ((*(g if n else None for g, n in zip(grads, need)), *(None,) * 7, *family)[:n_in]) + tail


# ---- vmap ----------------------------------------------------------------------------------------


def _per_slice(op, info, in_dims, args):
    """The operator once per slice of the vmapped dimension; outputs stacked at dim 0."""
    outs = []
    for i in range(info.batch_size):
        sliced = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]
        outs.append(op(*sliced))
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))
    return stacked, (0,) * len(stacked)


def _layer_vmap(info, in_dims, *args):
    """Inputs and state batched, weights (and the family's parameters and masks) not, no
    ragged batch: one call on a V times larger batch. Otherwise one call per slice."""
    x, h0, c0 = args[:3]
    dx, dh, dc = in_dims[:3]
    weights_batched = any(d is not None for d in in_dims[3:8])
    family_batched = any(d is not None for d in in_dims[N_BASE:])
    if weights_batched or family_batched or args[8] is not None:
        return _per_slice(torch.ops.glasslstm.lstm_layer, info, in_dims, args)
    V = info.batch_size
    T, B = (x.shape[0], x.shape[1]) if dx is None else x.movedim(dx, 0).shape[1:3]
    xs = (x.unsqueeze(1).expand(T, V, B, x.shape[-1]) if dx is None else x.movedim(dx, 1)).reshape(
        T, V * B, -1
    )

    def fold(s, d):  # (B, ·) or batched -> (V * B, ·)
        s = s.unsqueeze(0).expand(V, *s.shape) if d is None else s.movedim(d, 0)
        return s.reshape(V * B, s.shape[-1])

    def fold_mask(m, rows_dim):  # a mask with a row dimension: the same mask for every slice
        if m is None or m.dim() <= rows_dim:
            return m
        m = m.unsqueeze(rows_dim).expand(*m.shape[:rows_dim], V, *m.shape[rows_dim:])
        return m.reshape(*m.shape[:rows_dim], V * m.shape[rows_dim + 1], *m.shape[rows_dim + 2 :])

    rest = list(args[3:])
    if len(args) > N_BASE:
        k = N_BASE - 3
        for j, rows_dim in ((k + 5, 1), (k + 6, 1), (k + 7, 0)):  # zoneout_c, zoneout_h, h_mask
            m = rest[j]
            if m is not None and m.dim() == (3 if rows_dim else 2):
                m = m.expand(T, B, m.shape[-1]) if rows_dim else m.expand(B, m.shape[-1])
                rest[j] = fold_mask(m, rows_dim)
    out = torch.ops.glasslstm.lstm_layer(xs, fold(h0, dh), fold(c0, dc), *rest)
    y, h_n, c_n, gates, cs, tanh_c, rs, aux = out

    def unfold_t(t):  # (T, V * B, ·) -> (T, V, B, ·), vmapped at dim 1; empty stays empty
        return t.view(T, V, B, t.shape[-1]) if t.numel() else t.new_empty(V, 0)

    results = (
        unfold_t(y),
        h_n.view(V, B, -1),
        c_n.view(V, B, -1),
        unfold_t(gates),
        unfold_t(cs),
        unfold_t(tanh_c),
        unfold_t(rs),
        unfold_t(aux),
    )
    dims = tuple(1 if r.dim() == 4 else 0 for r in results)
    return results, dims


class LayerFunction(torch.autograd.Function):
    """``glasslstm::lstm_layer`` with its derivative, in the form torch.func takes."""

    @staticmethod
    def forward(*args):
        return torch.ops.glasslstm.lstm_layer(*args)

    setup_context = staticmethod(_layer_setup)
    backward = staticmethod(_layer_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _layer_vmap(info, in_dims, *args)


def layer(*args):
    """``torch.ops.glasslstm.lstm_layer(*args)`` with its derivative: through
    :class:`LayerFunction` under torch.func's transforms (which need its vmap rule), the
    operator itself otherwise (torch.compile, torch.jit and eager autograd take its registered
    derivative; a saved trace holds the operator). ``Function.apply`` binds its arguments by
    inspecting the signature on every call: about a tenth of a millisecond that a small layer's
    inference would pay each time."""
    if torch._C._functorch.maybe_current_level() is None:
        return torch.ops.glasslstm.lstm_layer(*args)
    return LayerFunction.apply(*args)


def _backward_vmap(info, in_dims, *args):
    return _per_slice(torch.ops.glasslstm.lstm_layer_backward, info, in_dims, args)


def _step_fake(x, h0, c0, weights, layout, back, hidden_size, out_size, weights8=None):
    L = layout.numel() // 5
    if x.dim() == 3:
        return (
            x.new_empty(1, 1, out_size),
            x.new_empty(L, 1, out_size),
            x.new_empty(L, 1, hidden_size),
        )
    return x.new_empty(1, out_size), x.new_empty(L, out_size), x.new_empty(L, hidden_size)


@functools.cache
def register() -> None:
    """Register everything above (once; after the library is loaded)."""
    lib = torch.library
    lib.register_fake(OP + "lstm_layer")(_layer_fake)
    lib.register_fake(OP + "lstm_layer_backward")(_backward_fake)
    lib.register_autograd(OP + "lstm_layer", _layer_backward, setup_context=_layer_setup)
    lib.register_vmap(OP + "lstm_layer")(_layer_vmap)
    lib.register_vmap(OP + "lstm_layer_backward")(_backward_vmap)
    lib.register_fake(OP + "lstm_step")(_step_fake)
    lib.register_fake(OP + "stream_step_")(lambda *args: None)
    lib.register_fake(OP + "linear_")(lambda *args: None)
    lib.register_fake(OP + "cell_forward_")(lambda *args: None)
    lib.register_fake(OP + "cell_backward_")(lambda *args: None)
    lib.register_fake(OP + "mm")(lambda a, b, provider: a.new_empty(a.shape[0], b.shape[1]))
    lib.register_fake(OP + "mm_bf16")(
        lambda a, b: a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32)
    )
