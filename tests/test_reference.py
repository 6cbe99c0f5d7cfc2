"""The NumPy oracle against finite differences, a hand computation and torch.nn.LSTM."""

import math

import numpy as np
import pytest
import torch

from glasslstm import reference as ref
from glasslstm.reference import LayerParams

T, B, I, H = 4, 2, 3, 3


def _problem(num_layers, seed, with_state=True):
    rng = np.random.default_rng(seed)
    # scale 0.8 keeps gates away from saturation so every gradient entry is exercised.
    params = ref.init_params(I, H, num_layers, rng, scale=0.8)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((num_layers, B, H)) if with_state else None
    c0 = rng.standard_normal((num_layers, B, H)) if with_state else None
    return rng, params, x, h0, c0


def _torch_lstm(params, bias=True):
    lstm = torch.nn.LSTM(I, H, num_layers=len(params), bias=bias, dtype=torch.float64)
    sd = {k: torch.from_numpy(v) for k, v in ref.params_to_torch(params).items()}
    if not bias:
        sd = {k: v for k, v in sd.items() if not k.startswith("bias")}
    lstm.load_state_dict(sd)
    return lstm


# ----------------------------------------------------------------------------- by hand


def test_single_step_by_hand():
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    x, h_prev, c_prev = 0.5, -0.3, 0.8
    U = {"f": 0.7, "i": -0.4, "c": 1.1, "o": 0.2}
    W = {"f": 0.3, "i": 0.9, "c": -0.6, "o": 0.5}
    b = {"f": 1.0, "i": 0.1, "c": -0.2, "o": 0.05}
    p = LayerParams(
        **{f"U_{s}": np.array([[v]]) for s, v in U.items()},
        **{f"W_{s}": np.array([[v]]) for s, v in W.items()},
        **{f"b_{s}": np.array([v]) for s, v in b.items()},
    )
    out, (h_n, c_n), cache = ref.forward(
        np.array([[[x]]]), [p], np.array([[[h_prev]]]), np.array([[[c_prev]]])
    )
    f = sig(0.5 * 0.7 + (-0.3) * 0.3 + 1.0)  # sig(1.26)
    i = sig(0.5 * -0.4 + (-0.3) * 0.9 + 0.1)  # sig(-0.37)
    N = math.tanh(0.5 * 1.1 + (-0.3) * -0.6 - 0.2)  # tanh(0.53)
    o = sig(0.5 * 0.2 + (-0.3) * 0.5 + 0.05)  # sig(0.0) = 0.5
    C = f * 0.8 + i * N
    Hh = o * math.tanh(C)
    assert o == pytest.approx(0.5, abs=1e-15)
    lc = cache.layers[0]
    for name, want in [("f", f), ("i", i), ("N", N), ("o", o), ("C", C), ("H", Hh)]:
        assert getattr(lc, name)[0, 0, 0] == pytest.approx(want, rel=1e-14), name
    assert out[0, 0, 0] == pytest.approx(Hh, rel=1e-14)
    assert h_n[0, 0, 0] == pytest.approx(Hh, rel=1e-14)
    assert c_n[0, 0, 0] == pytest.approx(C, rel=1e-14)


def test_sigmoid_is_stable_and_exact():
    z = np.array([-800.0, -30.0, -1.0, 0.0, 2.0, 800.0])
    s = ref.sigmoid(z)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s[1:5], 1.0 / (1.0 + np.exp(-z[1:5])), rtol=1e-14, atol=0)
    assert s[0] == 0.0 and s[-1] == 1.0


# ----------------------------------------------------------------------------- gradients


def _loss_and_seeds(rng, num_layers):
    R = rng.standard_normal((T, B, H))
    Rh = rng.standard_normal((num_layers, B, H))
    Rc = rng.standard_normal((num_layers, B, H))

    def loss(params, x, h0, c0):
        out, (h_n, c_n), _ = ref.forward(x, params, h0, c0)
        return float(np.sum(out * R) + np.sum(h_n * Rh) + np.sum(c_n * Rc))

    return loss, R, Rh, Rc


def _numeric(loss, arr, eps=1e-6):
    """Central differences of loss() w.r.t. every entry of arr (perturbed in place)."""
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        lp = loss()
        arr[idx] = old - eps
        lm = loss()
        arr[idx] = old
        g[idx] = (lp - lm) / (2 * eps)
    return g


def _rel_err(num, ana):
    return np.max(np.abs(num - ana)) / max(np.max(np.abs(num) + np.abs(ana)), 1e-300)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_backward_matches_finite_differences(num_layers):
    rng, params, x, h0, c0 = _problem(num_layers, seed=10 + num_layers)
    loss, R, Rh, Rc = _loss_and_seeds(rng, num_layers)
    _, _, cache = ref.forward(x, params, h0, c0)
    grads = ref.backward(cache, R, Rh, Rc)

    def f():
        return loss(params, x, h0, c0)

    checked = 0
    for k, p in enumerate(params):
        assert set(grads.layers[k]) == set(LayerParams.NAMES)
        for name in LayerParams.NAMES:
            ana = grads.layers[k][name]
            assert ana.shape == getattr(p, name).shape
            num = _numeric(f, getattr(p, name))
            assert np.max(np.abs(num)) > 1e-3, f"layer {k} {name}: gradient too small to test"
            assert _rel_err(num, ana) < 1e-6, f"layer {k} {name}"
            checked += 1
    for name, arr, ana in [("dx", x, grads.dx), ("dh0", h0, grads.dh0), ("dc0", c0, grads.dc0)]:
        assert ana.shape == arr.shape
        num = _numeric(f, arr)
        assert _rel_err(num, ana) < 1e-6, name
        checked += 1
    assert checked == 12 * num_layers + 3


def test_backward_none_seeds_are_zeros():
    rng, params, x, h0, c0 = _problem(2, seed=3)
    _, _, cache = ref.forward(x, params, h0, c0)
    dH = rng.standard_normal((T, B, H))
    g_none = ref.backward(cache, dH)
    g_zero = ref.backward(cache, dH, np.zeros((2, B, H)), np.zeros((2, B, H)))
    np.testing.assert_array_equal(g_none.dx, g_zero.dx)
    np.testing.assert_array_equal(g_none.dc0, g_zero.dc0)
    assert np.any(g_none.dc0 != 0)


# ----------------------------------------------------------------------------- torch oracle


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_matches_torch_via_params_to_torch(num_layers, with_state):
    _, params, x, h0, c0 = _problem(num_layers, seed=20 + num_layers, with_state=with_state)
    lstm = _torch_lstm(params)
    out, (h_n, c_n), cache = ref.forward(x, params, h0, c0)
    with torch.no_grad():
        state = (torch.from_numpy(h0), torch.from_numpy(c0)) if with_state else None
        t_out, (t_h, t_c) = lstm(torch.from_numpy(x), state)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, t_out.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n, t_h.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_n, t_c.numpy(), rtol=0, atol=1e-12)
    assert len(cache.layers) == num_layers
    for lc in cache.layers:
        for name in ("f", "i", "N", "C", "o", "H"):
            assert getattr(lc, name).shape == (T, B, H)
    np.testing.assert_array_equal(cache.layers[-1].H, out)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_matches_torch_via_params_from_torch(num_layers):
    torch.manual_seed(num_layers)
    lstm = torch.nn.LSTM(I, H, num_layers=num_layers, dtype=torch.float64)
    params = ref.params_from_torch(lstm.state_dict(), num_layers)
    assert all(getattr(p, n).dtype == np.float64 for p in params for n in LayerParams.NAMES)
    # the article's bias is the sum of torch's two biases, in gate order i, f, g, o
    b_ih, b_hh = lstm.bias_ih_l0.detach().numpy(), lstm.bias_hh_l0.detach().numpy()
    np.testing.assert_array_equal(params[0].b_f, b_ih[H : 2 * H] + b_hh[H : 2 * H])
    np.testing.assert_array_equal(
        params[0].U_c, lstm.weight_ih_l0.detach().numpy()[2 * H : 3 * H].T
    )
    x = np.random.default_rng(5).standard_normal((T, B, I))
    out, (h_n, c_n), _ = ref.forward(x, params)
    with torch.no_grad():
        t_out, (t_h, t_c) = lstm(torch.from_numpy(x))
    np.testing.assert_allclose(out, t_out.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n, t_h.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_n, t_c.numpy(), rtol=0, atol=1e-12)


def test_params_round_trip_and_no_bias():
    _, params, x, _, _ = _problem(2, seed=7)
    back = ref.params_from_torch(ref.params_to_torch(params), 2)
    for p, q in zip(params, back):
        for n in LayerParams.NAMES:
            np.testing.assert_array_equal(getattr(p, n), getattr(q, n))
    # bias=False: missing biases are zeros
    for p in params:
        for s in "fico":
            setattr(p, f"b_{s}", np.zeros(H))
    lstm = _torch_lstm(params, bias=False)
    nb = ref.params_from_torch(lstm.state_dict(), 2)
    assert all(np.all(getattr(p, f"b_{s}") == 0) for p in nb for s in "fico")
    out, _, _ = ref.forward(x, nb)
    with torch.no_grad():
        t_out, _ = lstm(torch.from_numpy(x))
    np.testing.assert_allclose(out, t_out.numpy(), rtol=0, atol=1e-12)


def test_init_params_shapes_and_range():
    params = ref.init_params(5, 4, 3, np.random.default_rng(0))
    assert len(params) == 3
    assert params[0].U_f.shape == (5, 4) and params[1].U_f.shape == (4, 4)
    assert params[2].W_o.shape == (4, 4) and params[2].b_c.shape == (4,)
    vals = np.concatenate([getattr(p, n).ravel() for p in params for n in LayerParams.NAMES])
    assert np.max(np.abs(vals)) <= 0.5 and np.max(np.abs(vals)) > 0.4  # k = 1/sqrt(4)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_backward_matches_torch_autograd(num_layers):
    rng, params, x, h0, c0 = _problem(num_layers, seed=30 + num_layers)
    R = rng.standard_normal((T, B, H))
    Rh = rng.standard_normal((num_layers, B, H))
    Rc = rng.standard_normal((num_layers, B, H))
    lstm = _torch_lstm(params)
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_out, (t_h, t_c) = lstm(tx, (th0, tc0))
    loss = (
        (t_out * torch.from_numpy(R)).sum()
        + (t_h * torch.from_numpy(Rh)).sum()
        + (t_c * torch.from_numpy(Rc)).sum()
    )
    loss.backward()

    _, _, cache = ref.forward(x, params, h0, c0)
    grads = ref.backward(cache, R, Rh, Rc)
    tol = dict(rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads.dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(grads.dh0, th0.grad.numpy(), **tol)
    np.testing.assert_allclose(grads.dc0, tc0.grad.numpy(), **tol)
    for k in range(num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{k}").grad.numpy()
        w_hh = getattr(lstm, f"weight_hh_l{k}").grad.numpy()
        b_ih = getattr(lstm, f"bias_ih_l{k}").grad.numpy()
        b_hh = getattr(lstm, f"bias_hh_l{k}").grad.numpy()
        np.testing.assert_allclose(b_ih, b_hh, rtol=1e-14, atol=1e-15)  # both get dLoss/db
        for j, s in enumerate(("i", "f", "c", "o")):  # torch's row order i, f, g, o
            rows = slice(j * H, (j + 1) * H)
            g = grads.layers[k]
            np.testing.assert_allclose(g[f"U_{s}"], w_ih[rows].T, **tol, err_msg=f"U_{s} l{k}")
            np.testing.assert_allclose(g[f"W_{s}"], w_hh[rows].T, **tol, err_msg=f"W_{s} l{k}")
            np.testing.assert_allclose(g[f"b_{s}"], b_ih[rows], **tol, err_msg=f"b_{s} l{k}")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(x=np.zeros((T, I))), "x"),  # wrong rank
        (dict(x=np.zeros((T, B, I + 1))), "x"),  # feature size mismatch
        (dict(h0=np.zeros((1, B, H))), "h0"),
        (dict(c0=np.zeros((2, B + 1, H))), "c0"),
    ],
)
def test_forward_rejects_bad_shapes(kwargs, name):
    _, params, x, _, _ = _problem(2, seed=0, with_state=False)
    args = dict(x=x, h0=None, c0=None) | kwargs
    with pytest.raises(ValueError, match=rf"^{name}: got shape") as exc:
        ref.forward(args["x"], params, args["h0"], args["c0"])
    assert "expected" in str(exc.value)


def test_backward_rejects_bad_shapes():
    _, params, x, _, _ = _problem(1, seed=0)
    _, _, cache = ref.forward(x, params)
    with pytest.raises(ValueError, match=r"^dH_out: got shape"):
        ref.backward(cache, np.zeros((T, B, H + 1)))
    with pytest.raises(ValueError, match=r"^dh_n: got shape"):
        ref.backward(cache, np.zeros((T, B, H)), dh_n=np.zeros((2, B, H)))
