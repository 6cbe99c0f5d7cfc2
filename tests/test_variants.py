"""The regularised LSTM family (layer normalisation, peepholes, zoneout, recurrent and
variational dropout, DropConnect, cell clipping): the NumPy reference against finite
differences; every backend against the reference (with the masks the module drew) and against
the autograd loop; what each option means; the torch-facing behaviour with the family on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glasslstm
import glasslstm.lstm as lstm_module
from glasslstm import reference as ref
from glasslstm.ops import lstm_layer, native
from glasslstm.ops.variant import Variant
from glasslstm.stream import Stream

BACKENDS = ["fused", "bptt", "loop"]
needs_operator = pytest.mark.skipif(not native.available(), reason=native.status())

# each member alone, and all together (the options of glasslstm.LSTM)
MEMBERS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "cell_clip": dict(cell_clip=0.3),
    "zoneout": dict(zoneout_c=0.3, zoneout_h=0.4),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_dropout": dict(weight_dropout=0.4),
    "input_output_dropout": dict(input_dropout=(0.3, 0.2), output_dropout=0.25),
    "all": dict(
        layer_norm=True,
        peephole=True,
        cell_clip=0.3,
        zoneout_c=0.3,
        zoneout_h=0.4,
        recurrent_dropout=0.4,
        weight_dropout=0.4,
        input_dropout=(0.3, 0.2),
        output_dropout=0.25,
    ),
}


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


# ---------------------------------------------------------------- the reference


def _reference_problem(member: str, rng, T=4, B=2, I=3, H=3, L=2):
    opts = MEMBERS[member]
    params = ref.init_params(I, H, L, rng, scale=0.8)
    params = [
        ref.init_variant_params(p, opts.get("layer_norm", False), opts.get("peephole", False), rng)
        for p in params
    ]

    def bern(shape, keep):
        return (rng.random(shape) < keep).astype(float)

    variants = []
    for k in range(L):
        In = I if k == 0 else H
        v = ref.Variant(
            layer_norm=opts.get("layer_norm", False),
            peephole=opts.get("peephole", False),
            cell_clip=opts.get("cell_clip", 0.0),
        )
        if "zoneout_c" in opts:
            v.zoneout_c, v.zoneout_h = bern((T, B, H), 0.3), bern((T, B, H), 0.4)
        if "recurrent_dropout" in opts:
            v.h_mask = bern((B, H), 0.6) / 0.6
        if "weight_dropout" in opts:
            v.W_mask = bern((H, 4 * H), 0.6) / 0.6
        if "input_dropout" in opts:
            v.x_mask, v.y_mask = bern((B, In), 0.7) / 0.7, bern((B, H), 0.75) / 0.75
        variants.append(v)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((L, B, H)), rng.standard_normal((L, B, H))
    return params, variants, x, h0, c0


@pytest.mark.parametrize("member", list(MEMBERS))
def test_reference_backward_matches_finite_differences(member):
    """Every parameter of the family's hand-written BPTT, and dx, dh0, dc0, against central
    differences of the reference's own forward (float64)."""
    rng = np.random.default_rng(1)
    params, variants, x, h0, c0 = _reference_problem(member, rng)
    R = rng.standard_normal((4, 2, 3))
    Rh, Rc = rng.standard_normal(h0.shape), rng.standard_normal(c0.shape)

    def loss():
        out, (h_n, c_n), _ = ref.forward(x, params, h0, c0, variants)
        return (out * R).sum() + (h_n * Rh).sum() + (c_n * Rc).sum()

    out, _, cache = ref.forward(x, params, h0, c0, variants)
    if member in ("cell_clip", "all"):  # the bound is reached somewhere: its zero gradient counts
        assert any((np.abs(lc.C_new) > 0.3).any() for lc in cache.layers)
    grads = ref.backward(cache, R, Rh, Rc)
    checked = [
        (getattr(p, n), grads.layers[k][n]) for k, p in enumerate(params) for n in p.present()
    ]
    checked += [(x, grads.dx), (h0, grads.dh0), (c0, grads.dc0)]
    eps = 1e-6
    for arr, analytic in checked:
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss()
            arr[idx] = old - eps
            down = loss()
            arr[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


def test_reference_family_with_everything_off_is_the_article():
    rng = np.random.default_rng(2)
    params = ref.init_params(3, 4, 2, rng)
    x = rng.standard_normal((5, 2, 3))
    plain = ref.forward(x, params)
    family = ref.forward(x, params, variants=[ref.Variant(), ref.Variant()])
    np.testing.assert_allclose(family[0], plain[0], rtol=0, atol=1e-15)
    R = rng.standard_normal(plain[0].shape)
    g0, g1 = ref.backward(plain[2], R), ref.backward(family[2], R)
    for name in ref.LayerParams.NAMES:
        np.testing.assert_allclose(g1.layers[0][name], g0.layers[0][name], atol=1e-14)


# ---------------------------------------------------------------- every backend vs reference


@pytest.fixture
def drawn(monkeypatch):
    """The masks glasslstm.LSTM draws, in the order it draws them (see lstm._dropout_mask)."""
    seen: list[tuple[str, torch.Tensor]] = []

    def spy(fn, kind):
        def wrapper(like, p):
            m = fn(like, p)
            seen.append((kind, m.clone()))
            return m

        return wrapper

    monkeypatch.setattr(lstm_module, "_dropout_mask", spy(lstm_module._dropout_mask, "drop"))
    monkeypatch.setattr(lstm_module, "_keep_mask", spy(lstm_module._keep_mask, "keep"))
    return seen


def _reference_variants(lstm, seen, training: bool) -> list[ref.Variant]:
    """The module's masks of one forward pass as reference.Variants (unidirectional)."""
    masks = iter(m.double().numpy() for _, m in seen)
    out = []
    for k in range(lstm.num_layers):
        v = ref.Variant(
            layer_norm=lstm.layer_norm, peephole=lstm.peephole, cell_clip=lstm.cell_clip
        )
        if training and lstm.input_dropout[k]:
            v.x_mask = next(masks)
        for name in ("zoneout_c", "zoneout_h"):
            z = getattr(lstm, name)
            if z:
                setattr(v, name, next(masks) if training else np.float64(z))
        if training and lstm.recurrent_dropout:
            v.h_mask = next(masks)
        if training and lstm.weight_dropout:
            v.W_mask = next(masks).T  # (4H, H) -> the reference's (H, 4H)
        if training and lstm.output_dropout[k]:
            v.y_mask = next(masks)
        out.append(v)
    assert next(masks, None) is None  # every mask drawn is accounted for
    return out


def _torch_grads(g: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """A reference layer's gradients under glasslstm.LSTM's parameter names."""
    names = ref.params_to_torch([ref.LayerParams(**g)])
    out = {n.replace("_l0", f"_l{k}"): v for n, v in names.items()}
    out[f"bias_hh_l{k}"] = out[f"bias_ih_l{k}"]  # both biases get the sum's gradient
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_every_backend_matches_the_reference(member, backend, training, drawn):
    """Outputs, final states, the recorded gates and states, and every gradient (the family's
    parameters included) against reference.py with the very masks the module drew."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(
        3, 4, num_layers=2, dtype=torch.float64, backend=backend, **MEMBERS[member]
    )
    with torch.no_grad():  # gains and peepholes away from their init: every entry matters
        for name, p in lstm.named_parameters():
            if name.startswith(("ln_", "weight_ch")):
                p.add_(0.3 * torch.randn_like(p))
    lstm.train(training)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    out, (h_n, c_n), trace = lstm(x, (h0, c0), return_gates=True)
    variants = _reference_variants(lstm, drawn, training)
    params = ref.params_from_torch(lstm.state_dict(), 2)
    want, (want_h, want_c), cache = ref.forward(
        x.detach().numpy(), params, h0.detach().numpy(), c0.detach().numpy(), variants
    )
    tol = 1e-10
    assert rel_err(out.detach(), want) <= tol
    assert rel_err(h_n.detach(), want_h) <= tol and rel_err(c_n.detach(), want_c) <= tol
    for k, lc in enumerate(cache.layers):
        for ours, theirs in zip("ifgoch", ("i", "f", "N", "o", "C", "H")):
            assert rel_err(getattr(trace, ours)[k], getattr(lc, theirs)) <= tol, ours
    rng = np.random.default_rng(0)
    dy, dh, dc = (rng.standard_normal(t.shape) for t in (out, h_n, c_n))
    loss = sum((t * torch.from_numpy(d)).sum() for t, d in ((out, dy), (h_n, dh), (c_n, dc)))
    loss.backward()
    grads = ref.backward(cache, dy, dh, dc)
    assert rel_err(x.grad, grads.dx) <= tol
    assert rel_err(h0.grad, grads.dh0) <= tol and rel_err(c0.grad, grads.dc0) <= tol
    want_grads = {}
    for k in range(2):
        want_grads.update(_torch_grads(grads.layers[k], k))
    named = dict(lstm.named_parameters())
    assert set(named) == set(want_grads)
    for name, p in named.items():
        assert rel_err(p.grad, want_grads[name]) <= tol, name


# ---------------------------------------------------------------- the operator vs the loop

CONFIGS = [
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True, proj_size=3),
]


@needs_operator
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["2layers", "bi-proj"])
@pytest.mark.parametrize("lengths", [None, [6, 2, 4, 6]], ids=["full", "ragged"])
def test_fused_matches_the_autograd_loop(cfg, dtype, lengths):
    """Everything on, in training (the same seed draws the same masks), ragged batches,
    both directions, a projection: the C++ operator's forward and hand-derived backward
    against autograd through the torch loop."""
    torch.manual_seed(0)
    kw = dict(MEMBERS["all"], input_dropout=0.2)
    fused = glasslstm.LSTM(4, 5, dtype=dtype, backend="fused", **kw, **cfg)
    loop = glasslstm.LSTM(4, 5, dtype=dtype, backend="loop", **kw, **cfg)
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(6, 4, 4, dtype=dtype)
    results = []
    for model in (fused, loop):
        torch.manual_seed(7)
        xx = x.clone().requires_grad_()
        out, (h, c), trace = model(xx, lengths=lengths, return_gates=True)
        (out.pow(2).sum() + h.sum() + c.sum()).backward()
        grads = [p.grad for p in model.parameters()]
        results.append([out, h, c, trace.f, trace.o, trace.c, xx.grad, *grads])
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    for a, b in zip(*results):
        assert rel_err(a.detach(), b.detach()) <= tol


@needs_operator
def test_fused_with_large_weights_matches_the_autograd_loop():
    """A recurrent weight past the row-split limit: the loop runs threaded products and shares
    the gate math and the normalisation of each step's rows over the threads (two here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        kw = dict(MEMBERS["all"], input_dropout=0.2)
        fused = glasslstm.LSTM(8, 320, dtype=torch.float64, backend="fused", **kw)
        loop = glasslstm.LSTM(8, 320, dtype=torch.float64, backend="loop", **kw)
        loop.load_state_dict(fused.state_dict())
        x = torch.randn(5, 8, 8, dtype=torch.float64)
        results = []
        for model in (fused, loop):
            torch.manual_seed(7)
            xx = x.clone().requires_grad_()
            out, (h, c) = model(xx, lengths=[5, 5, 3, 2, 5, 1, 4, 5])
            (out.pow(2).sum() + h.sum() + c.sum()).backward()
            results.append([out, h, c, xx.grad, *[p.grad for p in model.parameters()]])
        for a, b in zip(*results):
            assert rel_err(a.detach(), b.detach()) <= 1e-10
    finally:
        torch.set_num_threads(threads)


@needs_operator
@pytest.mark.parametrize(
    "part",
    [
        dict(ln_ih=True),
        dict(ln_hh=True),
        dict(ln_c=True),
        dict(cell_clip=0.2),
        dict(zoneout_c=True, peephole=True),
    ],
    ids=["ln_ih", "ln_hh", "ln_c", "clip", "zoneout_c+peephole"],
)
def test_each_part_of_the_operator_alone(part):
    """The operator takes each member on its own (the module switches layer normalisation
    on as a whole): forward and every gradient against the loop."""
    torch.manual_seed(0)
    dt, T, B, I, H = torch.float64, 5, 3, 4, 6

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dt)).requires_grad_()

    x, h0, c0 = leaf(T, B, I), leaf(B, H), leaf(B, H)
    weights = (leaf(4 * H, I), leaf(4 * H, H), leaf(4 * H), leaf(4 * H), None)
    v = Variant(
        ln_ih=leaf(4 * H, scale=0.3) + 1 if part.get("ln_ih") else None,
        ln_hh=leaf(4 * H, scale=0.3) + 1 if part.get("ln_hh") else None,
        ln_c=leaf(H, scale=0.3) + 1 if part.get("ln_c") else None,
        ln_c_bias=leaf(H) if part.get("ln_c") else None,
        peephole=leaf(3 * H) if part.get("peephole") else None,
        zoneout_c=(torch.rand(T, B, H) < 0.4).to(dt) if part.get("zoneout_c") else None,
        cell_clip=part.get("cell_clip", 0.0),
    )
    wrt = [t for t in (x, h0, c0, *weights[:4], *v.tensors[:5]) if t is not None]
    res = []
    for backend in ("fused", "loop"):
        y, h, c = lstm_layer(backend, x, h0, c0, weights, None, False, False, v)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=dt).view_as(y)).sum() + h.sum() + c.sum()
        res.append([y, h, c, *torch.autograd.grad(loss, wrt)])
    for a, b in zip(*res):
        assert rel_err(a.detach(), b.detach()) <= 1e-12


# ---------------------------------------------------------------- what the options mean


def test_off_by_default_and_torchs_weights_with_the_family_on():
    """Default options: torch's parameter names. With the family on, its parameters come
    after torch's, so the same seed still gives torch's weights, and from_torch keeps the
    family's own at their init."""
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    ours = glasslstm.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True, peephole=True)
    plain = glasslstm.LSTM(3, 4, num_layers=2, bidirectional=True, input_dropout=0.0)
    assert list(plain.state_dict()) == list(theirs.state_dict())
    sd = ours.state_dict()
    for name, t in theirs.state_dict().items():
        assert torch.equal(sd[name], t)
    extra = [n for n in sd if n not in theirs.state_dict()]
    assert extra == [
        f"{p}_l{k}{d}"
        for k in range(2)
        for d in ("", "_reverse")
        for p in ("ln_weight_ih", "ln_weight_hh", "ln_weight_c", "ln_bias_c", "weight_ch")
    ]
    assert sd["ln_weight_ih_l1"].shape == (16,) and torch.all(sd["ln_weight_hh_l0"] == 1)
    assert sd["ln_weight_c_l0"].shape == (4,) and torch.all(sd["ln_bias_c_l0"] == 0)
    assert sd["weight_ch_l0_reverse"].shape == (12,) and sd["weight_ch_l0"].abs().max() <= 0.5
    converted = glasslstm.LSTM.from_torch(theirs, layer_norm=True)
    assert torch.all(converted.ln_weight_ih_l0 == 1)
    assert torch.equal(converted.weight_hh_l1_reverse, theirs.weight_hh_l1_reverse)


def _onnx_lstm(x, W, R, Bias, P, h0, c0):
    """ONNX's LSTM operator (forward direction, default activations), as its specification
    writes it: gates in the order i, o, f, c; P = [P_i, P_o, P_f]."""
    H = R.shape[1]
    Wi, Wo, Wf, Wc = np.split(W, 4)
    Ri, Ro, Rf, Rc = np.split(R, 4)
    Wb, Rb = np.split(Bias, 2)
    bi, bo, bf, bc = np.split(Wb + Rb, 4)
    Pi, Po, Pf = np.split(P, 3)
    sig = ref.sigmoid
    h, c, ys = h0, c0, []
    for x_t in x:
        i = sig(x_t @ Wi.T + h @ Ri.T + Pi * c + bi)
        f = sig(x_t @ Wf.T + h @ Rf.T + Pf * c + bf)
        g = np.tanh(x_t @ Wc.T + h @ Rc.T + bc)
        c = f * c + i * g
        o = sig(x_t @ Wo.T + h @ Ro.T + Po * c + bo)
        h = o * np.tanh(c)
        ys.append(h)
    assert H == h.shape[1]
    return np.stack(ys)


def test_peepholes_are_onnxs_p():
    """ONNX's P input is weight_ch_l0 as it is: the same outputs as ONNX's equations."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(3, 5, peephole=True, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        out = lstm(x, (h0, c0))[0].numpy()

    def iofc(w):  # torch's i, f, g, o rows -> ONNX's i, o, f, c
        i, f, g, o = np.split(w.detach().numpy(), 4)
        return np.concatenate([i, o, f, g])

    onnx = _onnx_lstm(
        x.numpy(),
        iofc(lstm.weight_ih_l0),
        iofc(lstm.weight_hh_l0),
        np.concatenate([iofc(lstm.bias_ih_l0), iofc(lstm.bias_hh_l0)]),
        lstm.weight_ch_l0.detach().numpy(),
        h0[0].numpy(),
        c0[0].numpy(),
    )
    np.testing.assert_allclose(out, onnx, rtol=0, atol=1e-12)


def test_zoneout_keeps_units_with_probability_z_a_fresh_mask_per_step():
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(8, 64, zoneout_c=0.3, zoneout_h=0.5)
    x = torch.randn(40, 16, 8)
    h0, c0 = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
    with torch.no_grad():
        trace = lstm(x, (h0, c0), return_gates=True)[2]
        h = torch.cat([h0, trace.h[0]])  # (T + 1, B, H)
        c = torch.cat([c0, trace.c[0]])
        kept_h = (h[1:] == h[:-1]).float()
        kept_c = (c[1:] == c[:-1]).float()
        assert abs(kept_h.mean().item() - 0.5) < 0.02 and abs(kept_c.mean().item() - 0.3) < 0.02
        # a fresh mask each step: a unit kept at step t is kept at t+1 only as often as any
        same = (kept_h[1:] == kept_h[:-1]).float().mean().item()
        assert abs(same - 0.5) < 0.03
        lstm.eval()  # the expectation: no unit keeps its value exactly, and no randomness
        a = lstm(x, (h0, c0))[0]
        assert torch.equal(a, lstm(x, (h0, c0))[0]) and not (a[1:] == a[:-1]).any()


def test_variational_dropout_is_one_mask_per_sequence_for_all_steps(drawn):
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(6, 8, num_layers=2, input_dropout=0.5, output_dropout=0.5)
    x = torch.randn(10, 4, 6, requires_grad=True)
    out = lstm(x)[0]
    zero = out == 0
    assert zero.any() and torch.equal(zero, zero[:1].expand_as(zero))  # dropped at every step
    out.sum().backward()
    dropped = x.grad == 0
    assert dropped.any() and torch.equal(dropped, dropped[:1].expand_as(dropped))
    kinds = [(k, tuple(m.shape)) for k, m in drawn]
    assert kinds == [("drop", (4, 6)), ("drop", (4, 8)), ("drop", (4, 8)), ("drop", (4, 8))]


def test_recurrent_dropout_masks_the_fed_back_state_not_the_output(drawn):
    """One (B, H) mask per layer, direction and forward pass; the output is not masked, and
    H_{t-1}'s dropped units reach no later step: h0's gradient is zero there."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(3, 6, recurrent_dropout=0.5, bidirectional=True, dtype=torch.float64)
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = lstm(x, (h0, torch.zeros(2, 4, 6, dtype=torch.float64)))[0]
    assert (out != 0).all()
    masks = [m for _, m in drawn]
    assert [tuple(m.shape) for m in masks] == [(4, 6), (4, 6)]
    out.sum().backward()
    for d in range(2):
        assert torch.equal(h0.grad[d] == 0, masks[d] == 0)


def test_weight_dropout_masks_weight_hh_once_per_forward(drawn):
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(3, 6, weight_dropout=0.5)
    x = torch.randn(5, 2, 3)
    lstm(x)[0].pow(2).sum().backward()
    ((kind, mask),) = drawn
    assert mask.shape == lstm.weight_hh_l0.shape
    assert torch.equal(lstm.weight_hh_l0.grad == 0, mask == 0)  # dropped weights learn nothing
    assert 0.35 < (mask == 0).float().mean().item() < 0.65
    lstm.eval()  # evaluation: the weights as they are, torch's results
    with torch.no_grad():
        assert rel_err(lstm(x)[0], lstm.to_torch()(x)[0]) <= 1e-6


def test_dropouts_are_off_in_evaluation_and_seeds_fix_them():
    torch.manual_seed(0)
    kw = dict(input_dropout=0.3, output_dropout=0.3, recurrent_dropout=0.3, weight_dropout=0.3)
    lstm = glasslstm.LSTM(3, 6, num_layers=2, **kw)
    x = torch.randn(5, 2, 3)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(lstm(x)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    lstm.eval()
    with torch.no_grad():
        assert rel_err(lstm(x)[0], lstm.to_torch()(x)[0]) <= 1e-6


def test_cell_clip_bounds_the_cell_state():
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(4, 8, cell_clip=0.25, forget_bias=3.0)
    c = lstm(torch.randn(30, 3, 4) * 3, return_gates=True)[2].c
    assert c.abs().max().item() == pytest.approx(0.25) and (c.abs() == 0.25).any()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(zoneout_c=1.0), ValueError, r"zoneout_c=1.0 must be in \[0, 1\)"),
        (dict(recurrent_dropout=-0.1), ValueError, "recurrent_dropout"),
        (dict(weight_dropout="0.5"), TypeError, "weight_dropout must be a number"),
        (dict(input_dropout=(0.1, 0.2, 0.3)), ValueError, "3 rates for 2 layers"),
        (dict(output_dropout=(0.1, 1.5)), ValueError, r"output_dropout\[1\]"),
        (dict(cell_clip=-1.0), ValueError, "cell_clip"),
        (dict(layer_norm=1), TypeError, "layer_norm must be True or False"),
    ],
)
def test_bad_options_get_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        glasslstm.LSTM(3, 4, num_layers=2, **kwargs)


def test_to_torch_refuses_what_torch_cannot_compute():
    with pytest.raises(ValueError, match="torch.nn.LSTM has no layer_norm"):
        glasslstm.LSTM(3, 4, layer_norm=True).to_torch()
    assert "zoneout_h=0.1" in repr(glasslstm.LSTM(3, 4, zoneout_h=0.1))


def test_one_token_calls_and_streams_compute_the_family():
    """The C++ one-token step has the article's cell only: a module with the family takes
    the general path for lstm(x_t, (h, c)) and Stream steps it through its forward."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(3, 5, num_layers=2, layer_norm=True, peephole=True, zoneout_h=0.2)
    lstm.eval()
    x = torch.randn(6, 1, 3)
    with torch.no_grad():
        whole = lstm(x)[0][:, 0]
        h = c = torch.zeros(2, 1, 5)
        steps = []
        for t in range(6):
            y, (h, c) = lstm(x[t : t + 1], (h, c))
            steps.append(y[0, 0])
    assert rel_err(torch.stack(steps), whole) <= 1e-6
    s = Stream(lstm)
    assert not s.fused
    got = torch.stack([s.step(x[t, 0]).clone() for t in range(6)])
    assert rel_err(got, whole) <= 1e-6


# ---------------------------------------------------------------- torch's machinery


@needs_operator
def test_checkpointing_hands_each_segment_its_zoneout_masks():
    torch.manual_seed(0)
    kw = dict(MEMBERS["all"])
    a = glasslstm.LSTM(3, 5, num_layers=2, dtype=torch.float64, **kw)
    b = glasslstm.LSTM(3, 5, num_layers=2, dtype=torch.float64, checkpoint=3, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    res = []
    for model in (a, b):
        torch.manual_seed(4)
        out = model(x)[0]
        out.pow(2).sum().backward()
        res.append([out.detach(), *(p.grad for p in model.parameters())])
    for u, v in zip(*res):
        assert rel_err(u, v) <= 1e-12


@needs_operator
def test_vmap_and_double_backward_with_the_family():
    """torch.func.vmap folds a batch of inputs into the operator's own batch (the family's
    parameters and evaluation-mode zoneout unbatched); a differentiable backward gives the
    autograd loop's second derivatives."""
    torch.manual_seed(0)
    kw = dict(layer_norm=True, peephole=True, cell_clip=0.5, zoneout_c=0.2, zoneout_h=0.1)
    lstm = glasslstm.LSTM(3, 4, dtype=torch.float64, **kw).eval()
    xs = torch.randn(5, 6, 2, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda x: lstm(x)[0])(xs)
    want = torch.stack([lstm(x)[0] for x in xs])
    assert rel_err(got, want) <= 1e-12
    grads = []
    for backend in ("fused", "loop"):
        lstm.backend = backend
        x = xs[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(lstm(x)[0].pow(2).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(g.pow(2).sum(), [x, lstm.ln_weight_hh_l0]))
    for u, v in zip(*grads):
        assert rel_err(u, v) <= 1e-10


@needs_operator
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_fullgraph_with_the_family_equals_eager():
    """No graph break (masks drawn in training included); evaluation equals eager."""
    torch.manual_seed(0)
    kw = dict(layer_norm=True, peephole=True, zoneout_h=0.2, cell_clip=0.5, output_dropout=0.2)
    lstm = glasslstm.LSTM(3, 4, recurrent_dropout=0.3, **kw)
    x = torch.randn(5, 2, 3, requires_grad=True)
    compiled = torch.compile(lstm, fullgraph=True)  # a graph break raises
    compiled(x)[0].sum().backward()  # training: masks drawn inside the graph
    assert lstm.ln_weight_hh_l0.grad.abs().sum() > 0
    lstm.eval()
    outs = []
    for model in (lstm, compiled):
        out = model(x)[0]
        outs.append([out.detach(), *torch.autograd.grad(out.pow(2).sum(), [x, lstm.weight_ch_l0])])
    for u, v in zip(*outs):
        assert rel_err(u, v) <= 1e-5


@needs_operator
def test_bf16_autocast_with_layer_norm_stays_close_to_float32(monkeypatch):
    from glasslstm.ops import gemm

    monkeypatch.setenv(gemm.ENV_BF16, "1")
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(5, 12, layer_norm=True, peephole=True, backend="fused")
    x = torch.randn(6, 7, 5)
    runs = []
    for autocast in (False, True):
        lstm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = lstm(x)[0]
        y.pow(2).sum().backward()
        runs.append([y.detach(), lstm.ln_weight_hh_l0.grad.clone(), lstm.weight_ch_l0.grad.clone()])
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 3e-2
    assert not torch.equal(runs[0][0], runs[1][0])


# ---------------------------------------------------------------- against torch's own modules


def test_layer_norm_is_torchs_layernorm_around_the_products():
    """The layer-normalised cell written with torch.nn.LayerNorm (haste's LayerNormLSTM: the
    two products normalised apart, gain only; the cell with gain and bias) in a plain torch
    loop: the same outputs and gradients as the fused path."""
    torch.manual_seed(0)
    dt, T, B, I, H = torch.float64, 6, 3, 4, 5
    lstm = glasslstm.LSTM(I, H, layer_norm=True, dtype=dt, backend="fused")
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    ln_ih = torch.nn.LayerNorm(4 * H, bias=False, dtype=dt)
    ln_hh = torch.nn.LayerNorm(4 * H, bias=False, dtype=dt)
    ln_c = torch.nn.LayerNorm(H, dtype=dt)
    with torch.no_grad():
        ln_ih.weight.copy_(lstm.ln_weight_ih_l0)
        ln_hh.weight.copy_(lstm.ln_weight_hh_l0)
        ln_c.weight.copy_(lstm.ln_weight_c_l0)
        ln_c.bias.copy_(lstm.ln_bias_c_l0)
    x = torch.randn(T, B, I, dtype=dt)

    def torch_loop():
        h = c = torch.zeros(B, H, dtype=dt)
        ys = []
        for x_t in x:
            a = ln_ih(x_t @ lstm.weight_ih_l0.T) + ln_hh(h @ lstm.weight_hh_l0.T)
            i, f, g, o = (a + lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(ln_c(c))
            ys.append(h)
        return torch.stack(ys)

    ours, theirs = lstm(x)[0], torch_loop()
    assert rel_err(ours.detach(), theirs.detach()) <= 1e-12
    w = torch.linspace(-1, 1, ours.numel(), dtype=dt).view_as(ours)
    pairs = [
        (lstm.ln_weight_ih_l0, ln_ih.weight),
        (lstm.ln_weight_hh_l0, ln_hh.weight),
        (lstm.ln_weight_c_l0, ln_c.weight),
        (lstm.ln_bias_c_l0, ln_c.bias),
    ]
    g_ours = torch.autograd.grad((ours * w).sum(), [p for p, _ in pairs] + [lstm.weight_hh_l0])
    g_theirs = torch.autograd.grad((theirs * w).sum(), [q for _, q in pairs] + [lstm.weight_hh_l0])
    for a, b in zip(g_ours, g_theirs):
        assert rel_err(a, b) <= 1e-12


def test_weight_and_variational_dropout_are_torch_lstm_with_the_masks(drawn):
    """DropConnect is torch.nn.LSTM run with weight_hh ⊙ mask; variational dropout on a
    layer's input and output is the input and output multiplied by a (B, ·) mask: with the
    module's own masks, torch.nn.LSTM layer by layer gives the same outputs."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(
        3, 5, num_layers=2, dtype=torch.float64, weight_dropout=0.4,
        input_dropout=0.3, output_dropout=0.2,
    )  # fmt: skip
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    out = lstm(x)[0]
    masks = iter(m for _, m in drawn)  # per layer: input, W_hh, output
    y = x
    with torch.no_grad():
        for k in range(2):
            layer = torch.nn.LSTM(3 if k == 0 else 5, 5, dtype=torch.float64)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{k}"))
            y = y * next(masks)
            layer.weight_hh_l0.mul_(next(masks))
            y = layer(y)[0] * next(masks)
    assert next(masks, None) is None
    assert rel_err(out.detach(), y) <= 1e-12
