"""glasslstm.LSTM against torch.nn.LSTM (the oracle), the NumPy reference, and itself."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import glasslstm
from glasslstm import reference

BACKENDS = ["fused", "bptt", "loop"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| scaled by the size of b (absolute for |b| <= 1)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def pair(dtype=torch.float64, backend="bptt", **kw):
    """A torch.nn.LSTM and a glasslstm.LSTM with the same weights."""
    ref = torch.nn.LSTM(dtype=dtype, **kw)
    ours = glasslstm.LSTM.from_torch(ref, backend=backend)
    return ref, ours


def run(model, x, hx=None, **kw):
    """Forward + backward of a loss touching output, h_n and c_n; returns values and grads."""
    x = x.detach().clone().requires_grad_(True)
    if hx is not None:
        hx = tuple(t.detach().clone().requires_grad_(True) for t in hx)
    out, (h_n, c_n) = model(x, hx, **kw)[:2]
    gen = torch.Generator().manual_seed(1)
    weights = [
        torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in (out, h_n, c_n)
    ]
    loss = sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["input"] = x.grad
    if hx is not None:
        grads["h_0"], grads["c_0"] = hx[0].grad, hx[1].grad
    return (out, h_n, c_n), grads


def assert_same(res_a, res_b, tol):
    (outs_a, grads_a), (outs_b, grads_b) = res_a, res_b
    for name, a, b in zip(("output", "h_n", "c_n"), outs_a, outs_b):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.3g} > {tol}"
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = rel_err(grads_a[name], grads_b[name])
        assert err <= tol, f"grad of {name}: {err:.3g} > {tol}"


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=3),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=2, bidirectional=True, proj_size=2),
    dict(num_layers=1, bias=False),
    dict(num_layers=2, batch_first=True, bidirectional=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_torch(cfg, with_hx, dtype, backend):
    ref, ours = pair(dtype, backend, input_size=5, hidden_size=6, **cfg)
    T, B = 9, 4  # >= 8 steps: the copied-W^T path (shorter sequences are tested below)
    shape = (B, T, 5) if cfg.get("batch_first") else (T, B, 5)
    x = torch.randn(shape, dtype=dtype)
    hx = None
    if with_hx:
        LD = ref.num_layers * (2 if ref.bidirectional else 1)
        hx = (
            torch.randn(LD, B, ref.proj_size or 6, dtype=dtype),
            torch.randn(LD, B, 6, dtype=dtype),
        )
    assert_same(run(ours, x, hx), run(ref, x, hx), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "T,B,H",
    [(1, 3, 4), (5, 1, 4), (5, 3, 1), (1, 1, 1), (12, 3, 4)],
    ids=["T1", "B1", "H1", "all1", "T12-copies-WT"],
)
def test_matches_torch_degenerate_sizes(T, B, H, backend):
    ref, ours = pair(
        torch.float64, backend, input_size=2, hidden_size=H, num_layers=2, bidirectional=True
    )
    x = torch.randn(T, B, 2, dtype=torch.float64)
    assert_same(run(ours, x), run(ref, x), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "cfg", [dict(), dict(bidirectional=True, proj_size=3)], ids=["plain", "bi-proj"]
)
def test_packed_sequence_matches_torch(cfg, dtype, backend):
    ref, ours = pair(dtype, backend, input_size=3, hidden_size=5, num_layers=2, **cfg)
    T, lengths = 6, torch.tensor([2, 6, 1, 4, 6])  # unsorted, with ties
    x = torch.randn(T, len(lengths), 3, dtype=dtype)
    LD = 4 if cfg else 2
    hx = (torch.randn(LD, 5, ref.proj_size or 5, dtype=dtype), torch.randn(LD, 5, 5, dtype=dtype))

    def packed_run(model):
        xg = x.clone().requires_grad_(True)
        h = tuple(t.clone().requires_grad_(True) for t in hx)
        packed = pack_padded_sequence(xg, lengths, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, h)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
        padded, _ = pad_packed_sequence(out)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=dtype).view_as(padded)).sum()
        loss = loss + (h_n * 0.3).sum() + (c_n**2).sum()
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads.update(input=xg.grad, h_0=h[0].grad, c_0=h[1].grad)
        return (padded, h_n, c_n), grads

    assert_same(packed_run(ours), packed_run(ref), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(), dict(bidirectional=True)], ids=["uni", "bi"])
def test_no_grad_results_match_torch_and_stand_alone(cfg, backend):
    """Under no_grad the output may share memory with the kept states (no backward needs them):
    still torch's values for a packed batch (h_n of the short rows included: taken before the
    output's padding is zeroed), and writing into the output leaves h_n and c_n alone."""
    ref, ours = pair(torch.float64, backend, input_size=3, hidden_size=4, **cfg)
    lengths = torch.tensor([5, 5, 3, 1])
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        results = []
        for model in (ours, ref):
            out, (h_n, c_n) = model(pack_padded_sequence(x, lengths))
            results.append((pad_packed_sequence(out)[0], h_n, c_n))
        for a, b in zip(*results):
            assert rel_err(a, b) <= TOL[torch.float64]
        y, (h_n, c_n) = ours(x)
        kept = h_n.clone(), c_n.clone()
        y.fill_(7.0)
        quiet = ours(x, lengths=lengths, return_gates=True)  # gates: views too, padded
    assert torch.equal(h_n, kept[0]) and torch.equal(c_n, kept[1])
    loud = ours(x, lengths=lengths, return_gates=True)  # with autograd: copies
    assert torch.equal(quiet[0], loud[0].detach())
    for name in ("i", "f", "g", "o", "c", "h"):
        assert torch.equal(getattr(quiet[2], name), getattr(loud[2], name).detach()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_matches_packed_torch(backend, batch_first):
    """lengths= on a padded batch == torch.nn.LSTM on the packed batch, unsorted lengths."""
    ref, ours = pair(
        torch.float64,
        backend,
        input_size=3,
        hidden_size=4,
        num_layers=2,
        bidirectional=True,
        batch_first=batch_first,
    )
    lengths = [3, 7, 1, 7, 5]
    T, B = 7, len(lengths)
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=torch.float64)
    # junk (even NaN) in the padding must not leak into anything
    steps = torch.arange(T).view(-1, 1) if not batch_first else torch.arange(T).view(1, -1)
    lens = (
        torch.tensor(lengths).view(1, -1) if not batch_first else torch.tensor(lengths).view(-1, 1)
    )
    x_junk = x.masked_fill((steps >= lens).unsqueeze(-1), float("nan"))

    xg = x_junk.clone().requires_grad_(True)
    out, (h_n, c_n) = ours(xg, lengths=torch.tensor(lengths))
    xr = x.clone().requires_grad_(True)
    packed = pack_padded_sequence(
        xr, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )
    out_r, (h_r, c_r) = ref(packed)
    out_r, _ = pad_packed_sequence(out_r, batch_first=batch_first, total_length=T)
    for a, b in ((out, out_r), (h_n, h_r), (c_n, c_r)):
        assert rel_err(a, b) <= 1e-10
    # zero output past each length
    pad = steps >= lens
    assert torch.all(out[pad] == 0)

    w = torch.randn(out.shape, dtype=torch.float64)
    ((out * w).sum() + h_n.sum() + (c_n * 2).sum()).backward()
    ((out_r * w).sum() + h_r.sum() + (c_r * 2).sum()).backward()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-10, n
    assert torch.isfinite(xg.grad).all()
    assert torch.all(xg.grad[pad] == 0)
    assert rel_err(xg.grad, xr.grad) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_change_state(backend):
    """Each sequence of a padded batch gives what it gives alone, whatever the padding holds."""
    ours = glasslstm.LSTM(2, 3, num_layers=2, dtype=torch.float64, backend=backend)
    lengths = [4, 2, 6]
    x = torch.randn(6, 3, 2, dtype=torch.float64) * 5
    out, (h_n, c_n) = ours(x, lengths=lengths)
    for b, n in enumerate(lengths):
        alone, (h1, c1) = ours(x[:n, b : b + 1])
        assert rel_err(out[:n, b : b + 1], alone) <= 1e-12
        assert rel_err(h_n[:, b : b + 1], h1) <= 1e-12
        assert rel_err(c_n[:, b : b + 1], c1) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input_matches_torch(backend):
    ref, ours = pair(torch.float64, backend, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    hx = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    a, (h_a, c_a) = ours(x, hx)
    b, (h_b, c_b) = ref(x, hx)
    assert a.shape == b.shape == (5, 4) and h_a.shape == (2, 4)
    for p, q in ((a, b), (h_a, h_b), (c_a, c_b)):
        assert rel_err(p, q) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    torch.manual_seed(3)
    a = glasslstm.LSTM(
        4, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64, backend="bptt"
    )
    b = glasslstm.LSTM(
        4, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64, backend="loop"
    )
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    assert_same(run(a, x, lengths=[6, 2, 4]), run(b, x, lengths=[6, 2, 4]), 1e-12)


def test_engine_matches_numpy_reference():
    """Forward, trace and every gradient against reference.py's hand-written BPTT."""
    lstm = glasslstm.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    params = reference.params_from_torch(lstm.state_dict(), num_layers=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    out, (h_n, c_n), trace = lstm(x, (h0, c0), return_gates=True)
    ref_out, (ref_h, ref_c), cache = reference.forward(
        x.detach().numpy(), params, h0.detach().numpy(), c0.detach().numpy()
    )
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n.detach().numpy(), ref_h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_n.detach().numpy(), ref_c, rtol=0, atol=1e-12)
    for k, layer in enumerate(cache.layers):
        for ours_name, ref_name in zip("ifgoch", ["i", "f", "N", "o", "C", "H"]):
            np.testing.assert_allclose(
                getattr(trace, ours_name)[k].numpy(), getattr(layer, ref_name), rtol=0, atol=1e-12
            )
    dy, dh, dc = (np.random.default_rng(0).standard_normal(t.shape) for t in (out, h_n, c_n))
    (
        (out * torch.from_numpy(dy)).sum()
        + (h_n * torch.from_numpy(dh)).sum()
        + (c_n * torch.from_numpy(dc)).sum()
    ).backward()
    grads = reference.backward(cache, dy, dh, dc)
    np.testing.assert_allclose(x.grad.numpy(), grads.dx, rtol=0, atol=1e-10)
    np.testing.assert_allclose(h0.grad.numpy(), grads.dh0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c0.grad.numpy(), grads.dc0, rtol=0, atol=1e-10)
    H = 4
    rows = {
        "i": slice(0, H),
        "f": slice(H, 2 * H),
        "c": slice(2 * H, 3 * H),
        "o": slice(3 * H, 4 * H),
    }
    for k in range(2):
        g = grads.layers[k]
        for gate, r in rows.items():
            np.testing.assert_allclose(
                getattr(lstm, f"weight_ih_l{k}").grad[r].T.numpy(),
                g[f"U_{gate}"],
                atol=1e-10,
                rtol=0,
            )
            np.testing.assert_allclose(
                getattr(lstm, f"weight_hh_l{k}").grad[r].T.numpy(),
                g[f"W_{gate}"],
                atol=1e-10,
                rtol=0,
            )
            for bias in ("bias_ih", "bias_hh"):
                np.testing.assert_allclose(
                    getattr(lstm, f"{bias}_l{k}").grad[r].numpy(),
                    g[f"b_{gate}"],
                    atol=1e-10,
                    rtol=0,
                )


@pytest.mark.parametrize(
    "cfg,lengths",
    [
        (dict(num_layers=2), None),
        (dict(num_layers=2, bidirectional=True, proj_size=2), [3, 1, 4]),
    ],
    ids=["plain", "bi-proj-lengths"],
)
@pytest.mark.slow
def test_autograd_gradcheck(cfg, lengths):
    lstm = glasslstm.LSTM(2, 3, dtype=torch.float64, **cfg)
    params = list(lstm.parameters())
    names = [n for n, _ in lstm.named_parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    LD = lstm.num_layers * lstm.num_directions
    h0 = torch.randn(LD, 3, lstm.proj_size or 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(LD, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *weights):
        state = dict(zip(names, weights))
        out, (h_n, c_n) = torch.func.functional_call(
            lstm, state, (x, (h0, c0)), {"lengths": lengths}
        )
        return out, h_n, c_n

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cfg", [dict(), dict(proj_size=2, bidirectional=True)], ids=["plain", "bi-proj"]
)
def test_trace_is_consistent(cfg, backend):
    """c and h recomputed from the recorded gates equal the recorded c and h and the output."""
    lstm = glasslstm.LSTM(3, 4, num_layers=2, dtype=torch.float64, backend=backend, **cfg)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    c0 = torch.randn(lstm.num_layers * lstm.num_directions, 2, 4, dtype=torch.float64)
    h0 = torch.randn(c0.shape[0], 2, lstm.proj_size or 4, dtype=torch.float64)
    out, (h_n, c_n), tr = lstm(x, (h0, c0), return_gates=True)
    D, P = lstm.num_directions, lstm.proj_size or 4
    assert tr.i.shape == tr.c.shape == (2 * D, 5, 2, 4) and tr.h.shape == (2 * D, 5, 2, P)
    for layer, d in itertools.product(range(2), range(D)):
        k = layer * D + d
        g = tr.layer(layer, d)
        order = range(4, -1, -1) if d else range(5)
        c_prev = c0[k]
        for t in order:
            c = g["f"][t] * c_prev + g["i"][t] * g["g"][t]
            assert rel_err(g["c"][t], c) <= 1e-14
            r = g["o"][t] * torch.tanh(c)
            h = (
                r
                if not lstm.proj_size
                else r @ getattr(lstm, f"weight_hr_l{layer}" + ("_reverse" if d else "")).detach().T
            )
            assert rel_err(g["h"][t], h) <= 1e-14
            c_prev = c
        for gate in "ifo":
            assert torch.all((g[gate] > 0) & (g[gate] < 1))
        assert torch.all(g["g"].abs() < 1)
        assert rel_err(c_prev, c_n[k]) <= 1e-14
    last = tr.h[-D:]  # top layer, each direction
    assert rel_err(torch.cat(list(last), dim=-1), out) <= 1e-14


def test_trace_layout_batch_first_and_padding():
    lstm = glasslstm.LSTM(3, 4, batch_first=True, bidirectional=True)
    x = torch.randn(3, 5, 3)  # (B, T, I)
    out, _, tr = lstm(x, lengths=[5, 2, 3], return_gates=True)
    assert tr.f.shape == (2, 3, 5, 4)  # (L*D, B, T, H)
    assert not tr.f.requires_grad
    for name in "ifgoch":
        t = getattr(tr, name)
        assert torch.all(t[:, 1, 2:] == 0) and torch.all(t[:, 2, 3:] == 0)
        assert torch.all(t[:, 0].abs().sum(-1) > 0)
    assert torch.equal(torch.cat([tr.h[0], tr.h[1]], -1), out.detach())
    arrays = tr.numpy()
    assert set(arrays) == set("ifgoch") and arrays["c"].shape == (2, 3, 5, 4)
    assert tr.N is tr.g and tr.C is tr.c and tr.H is tr.h


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_gates_does_not_change_results(backend):
    lstm = glasslstm.LSTM(3, 4, num_layers=2, backend=backend)
    x = torch.randn(5, 2, 3)
    a = run(lstm, x)
    b = run(lstm, x, return_gates=True)
    assert_same(a, b, 0.0)


def test_same_seed_same_init_as_torch():
    torch.manual_seed(7)
    theirs = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(7)
    ours = glasslstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_state_dict_round_trip_both_ways():
    ours = glasslstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, forget_bias=1.0)
    theirs = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    theirs.load_state_dict(ours.state_dict())  # ours -> torch
    back = glasslstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    back.load_state_dict(theirs.state_dict())  # torch -> ours
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)
    exported = ours.to_torch()
    assert isinstance(exported, torch.nn.LSTM) and exported.proj_size == 2
    x = torch.randn(4, 2, 3)
    assert rel_err(exported(x)[0], ours(x)[0]) <= 1e-5
    imported = glasslstm.LSTM.from_torch(theirs)
    assert imported.bidirectional and imported.proj_size == 2


def test_forget_bias_shifts_torch_init():
    torch.manual_seed(2)
    plain = glasslstm.LSTM(3, 4, num_layers=2)
    torch.manual_seed(2)
    shifted = glasslstm.LSTM(3, 4, num_layers=2, forget_bias=1.0)
    for k in range(2):
        a, b = getattr(plain, f"bias_ih_l{k}"), getattr(shifted, f"bias_ih_l{k}")
        assert torch.allclose(b[4:8] - a[4:8], torch.ones(4))
        assert torch.equal(b[:4], a[:4]) and torch.equal(b[8:], a[8:])
        assert torch.equal(getattr(plain, f"bias_hh_l{k}"), getattr(shifted, f"bias_hh_l{k}"))
    assert "forget_bias=1.0" in repr(shifted)


def test_chrono_init_spreads_forget_time_scales():
    torch.manual_seed(3)
    plain = glasslstm.LSTM(3, 64, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    chrono = glasslstm.LSTM(3, 64, num_layers=2, bidirectional=True, chrono_init=100)
    H = 64
    for name, p in plain.named_parameters():  # weights: torch's init, untouched
        if name.startswith("weight"):
            assert torch.equal(p, getattr(chrono, name))
    for layer in range(2):
        for direction in range(2):
            b_ih, b_hh = (b.detach() for b in chrono._weights(layer, direction)[2:4])
            b_f = b_ih[H : 2 * H]
            # forget biases log(u), u ~ U[1, 99]: time scales 1 / (1 - σ(b_f)) ≈ 1 + u
            assert float(b_f.min()) >= 0.0 and float(b_f.max()) <= math.log(99) + 1e-6
            assert float(b_f.max()) > math.log(50)  # 128 draws: spread up to the long scales
            assert torch.equal(b_ih[:H], -b_f)  # input bias: the negative
            assert not bool(b_hh[: 2 * H].any())  # one bias carries them
            pb_ih, pb_hh = plain._weights(layer, direction)[2:4]
            assert torch.equal(b_ih[2 * H :], pb_ih[2 * H :])  # g and o: torch's init
            assert torch.equal(b_hh[2 * H :], pb_hh[2 * H :])
    torch.manual_seed(3)
    again = glasslstm.LSTM(3, 64, num_layers=2, bidirectional=True, chrono_init=100)
    assert all(torch.equal(a, b) for a, b in zip(chrono.parameters(), again.parameters()))
    assert "chrono_init=100" in repr(chrono)
    with pytest.raises(ValueError, match="not both"):
        glasslstm.LSTM(3, 4, forget_bias=1.0, chrono_init=10)
    with pytest.raises(ValueError, match="T_max >= 2"):
        glasslstm.LSTM(3, 4, chrono_init=1)
    with pytest.raises(ValueError, match="bias=True"):
        glasslstm.LSTM(3, 4, bias=False, chrono_init=10)


def test_dropout_has_torchs_meaning():
    lstm = glasslstm.LSTM(3, 16, num_layers=3, dropout=0.5)
    x = torch.randn(6, 4, 3)
    lstm.eval()
    evaluated = lstm(x)[0]
    no_dropout = glasslstm.LSTM(3, 16, num_layers=3)
    no_dropout.load_state_dict(lstm.state_dict())
    assert torch.equal(evaluated, no_dropout(x)[0])  # eval mode: no dropout
    lstm.train()
    torch.manual_seed(5)
    trained = lstm(x)[0]
    torch.manual_seed(5)
    assert torch.equal(trained, lstm(x)[0])  # reproducible from the seed
    assert not torch.allclose(trained, evaluated)  # and it does something
    assert torch.count_nonzero(trained == 0) == 0  # but not on the last layer


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        glasslstm.LSTM(3, 4, dropout=0.2)


def test_backend_selection(monkeypatch):
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv("GLASSLSTM_BACKEND", "loop")
    lstm = glasslstm.LSTM(2, 3, dtype=torch.float64)
    out = lstm(x)[0]
    assert "LSTMLayerFunction" not in type(out.grad_fn).__name__
    lstm.backend = "bptt"  # the argument wins
    assert "LSTMLayerFunction" in type(lstm(x)[0].grad_fn).__name__
    monkeypatch.setenv("GLASSLSTM_BACKEND", "nope")
    lstm.backend = None
    with pytest.raises(ValueError, match="GLASSLSTM_BACKEND.*'nope'.*auto"):
        lstm(x)
    with pytest.raises(ValueError, match="backend='fast'"):
        glasslstm.LSTM(2, 3, backend="fast")


def test_loop_backend_supports_double_backward():
    lstm = glasslstm.LSTM(2, 3, dtype=torch.float64, backend="loop")
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lstm(x)[0].pow(2).sum(), x, create_graph=True)
    g.sum().backward()
    assert lstm.weight_hh_l0.grad.abs().sum() > 0


BAD_INPUTS = [
    (lambda m: m(torch.randn(5, 3)), ValueError, r"feature size 3 .*input_size=4"),
    (lambda m: m(torch.randn(2, 3, 5, 4)), ValueError, r"rank 3 .*got shape \(2, 3, 5, 4\)"),
    (
        lambda m: m(torch.randn(5, 2, 3)),
        ValueError,
        r"feature size 3 \(shape \(5, 2, 3\)\).*input_size=4",
    ),
    (
        lambda m: m(torch.ones(5, 2, 4, dtype=torch.long)),
        TypeError,
        r"floating-point.*torch.int64.*Embedding",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4, dtype=torch.float64)),
        TypeError,
        r"torch.float64.*torch.float32",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6), torch.zeros(2, 2, 6))),
        ValueError,
        r"h_0 has shape \(1, 2, 6\); expected \(2, 2, 6\)",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4), (torch.zeros(2, 2, 6), torch.zeros(2, 3, 6))),
        ValueError,
        r"c_0 has shape \(2, 3, 6\); expected \(2, 2, 6\)",
    ),
    (lambda m: m(torch.randn(5, 2, 4), torch.zeros(2, 2, 6)), TypeError, r"hx must be a tuple"),
    (
        lambda m: m(torch.randn(5, 2, 4), lengths=[5, 6]),
        ValueError,
        r"lengths must lie in 1\.\.5.*max 6",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4), lengths=[0, 3]),
        ValueError,
        r"lengths must lie in 1\.\.5.*min 0",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4), lengths=[5, 3, 2]),
        ValueError,
        r"one entry per sequence: shape \(2,\); got shape \(3,\)",
    ),
    (
        lambda m: m(torch.randn(5, 2, 4), lengths=torch.tensor([2.0, 3.0])),
        TypeError,
        r"lengths must hold integers",
    ),
    (lambda m: m(torch.randn(5, 4), lengths=[5]), ValueError, r"lengths= needs a batched input"),
    (lambda m: m([[1.0]]), TypeError, r"torch.Tensor or PackedSequence; got list"),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(call, exc, match):
    lstm = glasslstm.LSTM(4, 6, num_layers=2)
    with pytest.raises(exc, match=match):
        call(lstm)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(input_size=4, hidden_size=6, proj_size=6),
            ValueError,
            r"proj_size=6 must be smaller than hidden_size=6",
        ),
        (dict(input_size=4, hidden_size=6, proj_size=-1), ValueError, r"proj_size must be >= 0"),
        (dict(input_size=0, hidden_size=6), ValueError, r"input_size must be >= 1"),
        (dict(input_size=4, hidden_size=6.0), TypeError, r"hidden_size must be an int; got float"),
        (dict(input_size=4, hidden_size=6, num_layers=2, dropout=1.5), ValueError, r"dropout=1.5"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        glasslstm.LSTM(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_matches_torch(dtype):
    ref, ours = pair(dtype, "bptt", input_size=8, hidden_size=16, num_layers=2, bidirectional=True)
    ref, ours = ref.cuda(), ours.cuda()
    x = torch.randn(9, 4, 8, dtype=dtype, device="cuda")
    a = run(ours, x)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:  # cuDNN's RNNs use TF32 by default: 1e-4 off; the oracle must not round
        b = run(ref, x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_same(a, b, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_configs_match_torch(cfg, backend):
    """Every configuration, with hx, float64 on the GPU: outputs and all gradients vs cuDNN."""
    ref, ours = pair(torch.float64, backend, input_size=5, hidden_size=6, **cfg)
    ref, ours = ref.cuda(), ours.cuda()
    T, B = 9, 4
    shape = (B, T, 5) if cfg.get("batch_first") else (T, B, 5)
    x = torch.randn(shape, dtype=torch.float64, device="cuda")
    L = ref.num_layers * (2 if ref.bidirectional else 1)
    hx = (
        torch.randn(L, B, ref.proj_size or 6, dtype=torch.float64, device="cuda"),
        torch.randn(L, B, 6, dtype=torch.float64, device="cuda"),
    )
    assert_same(run(ours, x, hx), run(ref, x, hx), 1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_lengths_match_packed_torch(backend):
    ref, ours = pair(
        torch.float64, backend, input_size=3, hidden_size=5, num_layers=2, bidirectional=True
    )
    ref, ours = ref.cuda(), ours.cuda()
    lengths = torch.tensor([4, 9, 1, 9, 6])
    x = torch.randn(9, 5, 3, dtype=torch.float64, device="cuda")
    out, (h_n, c_n) = ours(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    ref_out, (ref_h, ref_c) = ref(packed)
    ref_out, _ = pad_packed_sequence(ref_out, total_length=9)
    assert rel_err(out, ref_out) <= 1e-10
    assert rel_err(h_n, ref_h) <= 1e-10 and rel_err(c_n, ref_c) <= 1e-10
    _, _, gates = ours(x, lengths=lengths, return_gates=True)
    assert gates.c.device.type == "cuda" and torch.equal(gates.c[0, -1, 1], c_n[0, 1])


@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
def test_gradients_when_only_one_result_is_used(used):
    """Unused results reach backward as None (no zero-filled gradients); grads stay right."""
    ref, ours = pair(torch.float64, "bptt", input_size=3, hidden_size=4, num_layers=2, proj_size=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for model in (ours, ref):
        xi = x.clone().requires_grad_(True)
        out, (h_n, c_n) = model(xi)
        {"output": out, "h_n": h_n, "c_n": c_n}[used].pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-10
