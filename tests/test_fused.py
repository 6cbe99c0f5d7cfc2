"""The CPU operators (torch.ops.glasslstm: the C++ time loops, the one-token step) and
streaming inference, against the torch path, the NumPy reference and torch.nn.LSTM."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import glasslstm
from glasslstm import reference
from glasslstm.data import CharTokenizer
from glasslstm.errors import InputError
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.ops import bptt, cells, describe, gemm, native
from glasslstm.ops.step import drop_in_step
from glasslstm.stream import LMStream, Stream

pytestmark = pytest.mark.skipif(not native.available(), reason=f"operators: {native.status()}")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.fixture
def two_threads():
    """Two OpenMP threads whatever the machine has: the row-split time loops need two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_auto_takes_the_operator_on_cpu():
    assert describe().startswith("auto -> torch.ops.glasslstm.lstm_layer (on (")
    assert describe("bptt") == "bptt -> torch cell"
    assert torch.ops.glasslstm.isa() in ("avx512", "avx2", "baseline")
    assert native.status() == f"on ({torch.ops.glasslstm.isa()} kernels, {native._where} build)"


# ---------------------------------------------------------------- the cell contract


def _interpreted_triton_cell(dtype):
    """The Triton cell with its kernels in Triton's CPU interpreter (or a skip)."""
    pytest.importorskip("triton")
    import importlib.util

    from glasslstm.ops import triton_cell

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_cell_contract_triton", triton_cell.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module.TritonCell(dtype)


CELLS = {
    "torch-f64": (lambda: cells.TorchCell(), torch.float64, 1e-12),
    "native-f64": (lambda: cells.NativeCell(), torch.float64, 1e-12),
    "native-f32": (lambda: cells.NativeCell(), torch.float32, 2e-5),
    "native-bf16": (lambda: cells.NativeBf16Cell(), torch.float32, 3e-2),
    "triton-f64": (lambda: _interpreted_triton_cell(torch.float64), torch.float64, 1e-12),
}


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("ragged", [False, True])
def test_every_cell_against_the_numpy_reference(name, ragged):
    """Each :class:`glasslstm.ops.cells.Cell` runs the Python time loop (forward and the
    hand-written backward) and matches reference.py's equations and its BPTT."""
    make, dtype, tol = CELLS[name]
    cell = make()
    assert isinstance(cell, cells.Cell)
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 5
    ref = torch.nn.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    dy = torch.randn(T, B, H, dtype=torch.float64)
    lengths = [6, 4, 2] if ragged else [T] * B
    # the reference, row by row (each sequence its own length)
    params = reference.params_from_torch(ref.state_dict(), 1)
    want_y = torch.zeros(T, B, H, dtype=torch.float64)
    want_dx = torch.zeros(T, B, I, dtype=torch.float64)
    want_dw = torch.zeros(4 * H, H, dtype=torch.float64)
    for b, n in enumerate(lengths):
        out, _, cache = reference.forward(
            x[:n, b : b + 1].numpy(),
            params,
            h0[None, b : b + 1].numpy(),
            c0[None, b : b + 1].numpy(),
        )
        want_y[:n, b] = torch.from_numpy(out[:, 0])
        g = reference.backward(cache, dy[:n, b : b + 1].numpy())
        want_dx[:n, b] = torch.from_numpy(g.dx[:, 0])
        w = reference.params_to_torch([reference.LayerParams(**g.layers[0])])["weight_hh_l0"]
        want_dw += torch.from_numpy(np.asarray(w))
    weights = [p.detach().to(dtype).requires_grad_() for p in ref.parameters()]
    xx = x.to(dtype).requires_grad_()
    y, _, _ = bptt.lstm_layer_bptt(
        xx,
        h0.to(dtype),
        c0.to(dtype),
        (*weights, None),
        None if not ragged else [sum(n > t for n in lengths) for t in range(T)],
        False,
        False,
        cell,
    )
    dx, dw = torch.autograd.grad(y, [xx, weights[1]], dy.to(dtype))
    assert rel_err(y.double(), want_y) <= tol
    assert rel_err(dx.double(), want_dx) <= tol
    assert rel_err(dw.double(), want_dw) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cell_matches_torch_cell_over_a_wide_range(dtype):
    """Every activation regime: saturated (|x| up to 60), near zero, and in between."""
    n, H = 7, 37  # odd sizes: vector remainders
    a = torch.cat([torch.randn(n, 4 * H, dtype=dtype) * s for s in (0.01, 1.0, 8.0, 60.0)])
    n = a.shape[0]
    c_prev = torch.randn(n, H, dtype=dtype) * 3
    outs = {}
    for name, cell in (("torch", cells.TORCH_CELL), ("native", cells.NativeCell())):
        aa = a.clone()
        c, tc, h = (torch.empty(n, H, dtype=dtype) for _ in range(3))
        cell.forward(aa, c_prev, c, tc, h)
        outs[name] = (aa, c, tc, h)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for x, y in zip(outs["native"], outs["torch"]):
        assert rel_err(x, y) <= tol


@pytest.mark.parametrize("with_dy", [False, True])
def test_native_cell_backward_matches_torch_cell(with_dy):
    dtype, n, H = torch.float64, 5, 19
    gates = torch.rand(n, 4 * H, dtype=dtype)
    c_prev, tc = torch.randn(n, H, dtype=dtype), torch.rand(n, H, dtype=dtype) * 2 - 1
    dh0, dc0 = torch.randn(n, H, dtype=dtype), torch.randn(n, H, dtype=dtype)
    dy = torch.randn(n, H, dtype=dtype) if with_dy else None
    res = []
    for cell in (cells.TORCH_CELL, cells.NativeCell()):
        prep = cell.backward_prepare(gates[None], tc[None], H)
        p = None if prep is None else (prep[0][0], prep[1][0])
        dh, dc, d = dh0.clone(), dc0.clone(), torch.empty(n, 4 * H, dtype=dtype)
        cell.backward(gates, c_prev, tc, dh, dy, dc, d, p)
        res.append((dc, d))
    for x, y in zip(*res):
        assert rel_err(x, y) <= 1e-14


def test_nan_and_inf_propagate():
    """A diverging run must see its NaN: the kernels may not turn NaN into numbers."""
    lstm = glasslstm.LSTM(3, 4, backend="fused")
    x = torch.randn(5, 2, 3)
    x[2, 0, 1] = float("nan")
    out = lstm(x)[0]
    assert out[2:, 0].isnan().all() and not out[:, 1].isnan().any()
    x = torch.full((1, 1, 3), 1e30)  # saturated gates: finite, like torch
    ref = lstm.to_torch()
    assert lstm(x)[0].isfinite().all() and torch.allclose(lstm(x)[0], ref(x)[0], atol=1e-6)
    # +-inf pre-activations: sigma and tanh saturate to exactly 0 / +-1, as torch's do
    a = torch.tensor([[float("inf"), -float("inf"), float("inf"), -float("inf")]])
    res = []
    for cell in (cells.TORCH_CELL, cells.NativeCell()):
        aa, c, tc, h = a.clone(), torch.empty(1, 1), torch.empty(1, 1), torch.empty(1, 1)
        cell.forward(aa, torch.ones(1, 1), c, tc, h)
        res.append(torch.cat([aa, c, tc, h], 1))
    assert torch.equal(res[0][:, :4], res[1][:, :4]) and torch.allclose(res[0], res[1], atol=1e-6)


def test_forced_fused_fails_clearly_where_it_cannot_run():
    lstm = glasslstm.LSTM(2, 3, backend="fused").to(torch.bfloat16)
    with pytest.raises(ValueError, match="backend='fused' cannot run here.*bfloat16.*bptt"):
        lstm(torch.randn(2, 1, 2, dtype=torch.bfloat16))
    lstm.backend = None  # auto falls back to the torch cell
    assert lstm(torch.randn(2, 1, 2, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.slow
def test_without_the_operators_the_torch_path_serves_and_says_why(tmp_path):
    """Switched off, or not buildable (no C++ compiler): the torch path, with the reason."""
    code = (
        "import torch, glasslstm; from glasslstm.ops import describe, native; "
        "{setup}print(native.status()); print(describe()); "
        "print(glasslstm.LSTM(2, 3)(torch.randn(4, 1, 2))[0].shape)"
    )
    env = {**os.environ, "GLASSLSTM_NO_FUSED": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code.format(setup="")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "off: disabled by $GLASSLSTM_NO_FUSED",
        "auto -> torch cell",
        "torch.Size([4, 1, 3])",
    ]
    env = {**os.environ, "CXX": "no-such-c++", "XDG_CACHE_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", code.format(setup="native._installed = lambda: False; ")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    out = run.stdout.splitlines()
    assert out[0].startswith("off: could not build the CPU operators: ")
    assert out[1:] == ["auto -> torch cell", "torch.Size([4, 1, 3])"]
    assert "building the CPU operators" in run.stderr  # the user was told what happened


# ---------------------------------------------------------------- the time loops


@pytest.mark.parametrize("batch", [1, 32])  # 32: the loop is split over the threads
def test_long_backward_flushes_denormal_gradients_and_restores_the_fp_mode(batch, two_threads):
    """A gradient halved at each of 140 steps reaches 2^-140 (7e-43, denormal in float32):
    the fused time loop flushes it to zero (denormal arithmetic is 10-100x slower on x86),
    the torch path keeps it; float64 has the range, and both agree. The calling thread's
    floating-point control is left as it was."""

    def control():
        return torch.ops.glasslstm.fp_mode() & ~0x3F  # without the sticky status flags

    before = control()
    grads = {}
    for dtype in (torch.float32, torch.float64):
        for backend in ("fused", "bptt"):
            lstm = glasslstm.LSTM(1, 1, backend=backend, dtype=dtype)
            with torch.no_grad():
                for p in lstm.parameters():
                    p.zero_()  # every gate 0.5: dc_{t-1} = 0.5 dc_t
            c0 = torch.ones(1, batch, 1, dtype=dtype, requires_grad=True)
            _, (_, c_n) = lstm(
                torch.zeros(140, batch, 1, dtype=dtype), (torch.zeros(1, batch, 1, dtype=dtype), c0)
            )
            c_n.sum().backward()
            grads[dtype, backend] = c0.grad.flatten().tolist()
    assert control() == before
    assert grads[torch.float32, "bptt"] == pytest.approx([2.0**-140] * batch, rel=1e-3)
    assert grads[torch.float32, "fused"] == [0.0] * batch  # every thread flushed
    assert grads[torch.float64, "fused"] == grads[torch.float64, "bptt"] == [2.0**-140] * batch


@pytest.mark.parametrize("batch", [37, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [{}, {"proj_size": 5, "bidirectional": True}])
@pytest.mark.parametrize("step", ["measured", "onednn_linear"])
def test_row_split_time_loops_match_torch(dtype, cfg, batch, step, two_threads, monkeypatch):
    """With small weights the time loops share out the batch rows (37 or 5: uneven splits),
    each thread running every step for its rows; ragged lengths end rows inside one thread's
    share and in the other's. Forward and gradients (the bias's: summed by the loop, a partial
    per thread) match torch and the one-thread loops, whichever provider multiplies (the
    threads sharing one reordered weight with onednn_linear)."""
    if step != "measured":
        monkeypatch.setenv(gemm.ENV, f"step={step}")
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 12, num_layers=2, dtype=dtype, **cfg)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    T, B = 9, batch
    x = torch.randn(T, B, 6, dtype=dtype)
    lengths = torch.tensor(sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True))
    lengths[0] = T
    tol = 1e-5 if dtype == torch.float32 else 1e-12

    def run(model, ragged, threads):
        torch.set_num_threads(threads)
        xx = x.clone().requires_grad_()
        if model is ref and ragged:
            packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths)
            y = torch.nn.utils.rnn.pad_packed_sequence(model(packed)[0])[0]
        else:
            y = model(xx, lengths=lengths)[0] if ragged else model(xx)[0]
        grads = torch.autograd.grad(
            y.pow(2).sum(),
            [xx, model.weight_hh_l0, model.weight_ih_l1, model.bias_ih_l0, model.bias_hh_l1],
        )
        return [y.detach(), *grads]

    for ragged in (False, True):
        want = run(ref, ragged, 2)
        split, serial = run(ours, ragged, 2), run(ours, ragged, 1)
        for a, b, c in zip(split, serial, want):
            assert rel_err(a, c) <= tol
            assert rel_err(a, b) <= tol


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("provider", ["torch", "onednn", "onednn_linear"])
def test_large_weight_loops_match_torch(ragged, provider, two_threads, monkeypatch):
    """Weights beyond a core's cache keep one loop with threaded products (by either GEMM
    provider); a step's gate math with 8192+ values is still shared by the threads (48 rows x
    192 units)."""
    monkeypatch.setenv(gemm.ENV, provider)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(7, 192)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    T, B = 6, 48
    x = torch.randn(T, B, 7)
    lengths = torch.tensor([T] * 20 + [4] * 20 + [1] * 8)
    outs = []
    for model in (ours, ref):
        xx = x.clone().requires_grad_()
        if not ragged:
            y = model(xx)[0]
        elif model is ours:
            y = model(xx, lengths=lengths)[0]
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths)
            y = torch.nn.utils.rnn.pad_packed_sequence(model(packed)[0])[0]
        outs.append(
            [
                y.detach(),
                *torch.autograd.grad(y.pow(2).sum(), [xx, model.weight_hh_l0, model.bias_ih_l0]),
            ]
        )
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 2e-5


@pytest.mark.parametrize("provider", ["torch", "onednn", "onednn_linear"])
def test_weights_packed_from_torch_layout_match_torch(provider, two_threads, monkeypatch):
    """A provider with a packed layout packs W and W_hr straight from the weights as torch
    stores them (no transposed copy first), in column blocks that 4H = 600 and P = 37 do not
    fill: the partial blocks are padded, forward and backward still match torch, in inference
    and in training, a layer at a time and stacked, with an initial state."""
    monkeypatch.setenv(gemm.ENV, provider)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(11, 150, num_layers=2, proj_size=37)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    x = torch.randn(9, 40, 11)
    h0, c0 = torch.randn(2, 40, 37), torch.randn(2, 40, 150)
    with torch.no_grad():
        got, (gh, gc) = ours(x, (h0, c0))
        want, (wh, wc) = ref(x, (h0, c0))
    for a, b in ((got, want), (gh, wh), (gc, wc)):
        assert rel_err(a, b) <= 2e-5
    outs = []
    for model in (ours, ref):
        xx = x.clone().requires_grad_()
        y = model(xx, (h0, c0))[0]
        params = [model.weight_hh_l1, model.weight_hr_l1, model.weight_hh_l0, model.weight_hr_l0]
        outs.append([y.detach(), *torch.autograd.grad(y.pow(2).sum(), [xx, *params])])
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 2e-5


@pytest.mark.parametrize("backend", ["fused", "bptt"])
@pytest.mark.parametrize("bias", [True, False])
def test_many_rows_match_torch(backend, bias):
    """T*B >= 64 rows: the input projection takes the contiguous-U^T product."""
    ref = torch.nn.LSTM(6, 5, num_layers=2, bias=bias, dtype=torch.float64)
    ours = glasslstm.LSTM.from_torch(ref, backend=backend)
    x = torch.randn(20, 8, 6, dtype=torch.float64, requires_grad=True)
    outs = [m(x)[0] for m in (ours, ref)]
    grads = [
        torch.autograd.grad(o.pow(2).sum(), [x, m.weight_ih_l0, m.weight_hh_l1])
        for o, m in zip(outs, (ours, ref))
    ]
    assert rel_err(outs[0], outs[1]) <= 1e-12
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-12


def test_inference_keeps_nothing_for_a_backward():
    """Without gradients the operator keeps no activations for a backward (its cell states
    ride a two-step ring), with the same results."""
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(6, 2, 3)
    args = (x, torch.zeros(2, 4), torch.zeros(2, 4), *lstm._weights(0, 0)[:4], None, None, False)
    opts = ("torch", "torch")
    infer = torch.ops.glasslstm.lstm_layer(*args, False, False, False, *opts)
    train = torch.ops.glasslstm.lstm_layer(*args, True, False, False, *opts)
    assert [t.numel() for t in infer[3:]] == [0, 0, 0, 0, 0]
    assert [tuple(t.shape) for t in train[3:6]] == [(6, 2, 16), (6, 2, 4), (6, 2, 4)]
    for a, b in zip(infer[:3], train[:3]):
        assert torch.equal(a, b)


def test_large_buffers_are_reused():
    """The operator's large buffers (here the recorded gates, 8 MiB) come from a cache of
    freed blocks: once the caller lets go of them, the next call of the same size gets the same
    block back instead of fresh memory (whose every page would fault), with its own results."""
    torch.manual_seed(0)
    lstm = glasslstm.LSTM(16, 256)
    x = torch.randn(64, 32, 16)
    with torch.no_grad():
        y, _, trace = lstm(x, return_gates=True)
        assert trace["i"].shape == (1, 64, 32, 256)
        block, want = trace["i"].untyped_storage().data_ptr(), trace["f"].clone()
        del trace
        y2, _, again = lstm(x * 2, return_gates=True)
        assert again["i"].untyped_storage().data_ptr() == block
        assert not torch.equal(y2, y)
        del again
        assert torch.equal(lstm(x, return_gates=True)[2]["f"], want)


@pytest.mark.parametrize("hidden", [256, 320])
def test_inference_in_chunks_of_steps_matches_torch(hidden, two_threads):
    """Inference projects its input a chunk of steps at a time (8 MiB of gates: 32 steps of
    64 rows at H=256, 25 at H=320), so a 70-step sequence runs in three chunks: with the rows
    split over the threads (H=256) and with threaded products (H=320), both directions, rows
    of different lengths, an initial state. Same outputs as torch, and as training, which
    projects all steps at once."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(9, hidden, bidirectional=True)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    T, B = 70, 64
    x = torch.randn(T, B, 9)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    h0, c0 = torch.randn(2, B, hidden), torch.randn(2, B, hidden)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad():
        want, (hn, cn) = ref(packed, (h0, c0))
        want = torch.nn.utils.rnn.pad_packed_sequence(want)[0]
        got, (gh, gc) = ours(x, (h0, c0), lengths=lengths)
    assert rel_err(got, want) <= 2e-5
    assert rel_err(gh, hn) <= 2e-5 and rel_err(gc, cn) <= 2e-5
    xx = x.clone().requires_grad_()
    trained = ours(xx, (h0, c0), lengths=lengths)[0]
    assert torch.equal(trained.detach(), got)


def test_the_layer_operator_refuses_shapes_its_loop_cannot_index():
    """torch.ops.glasslstm.lstm_layer called by hand with inconsistent shapes: a clear error,
    never a read or write out of bounds."""
    x, h, c = torch.randn(5, 2, 3), torch.zeros(2, 4), torch.zeros(2, 4)
    w_ih, w_hh, b = torch.randn(16, 3), torch.randn(16, 4), torch.zeros(16)
    opts = (None, False, False, False, False, "torch", "torch")
    layer = torch.ops.glasslstm.lstm_layer
    assert layer(x, h, c, w_ih, w_hh, b, b, None, *opts)[0].shape == (5, 2, 4)
    bad = {
        "P != H: give w_hr": (x, torch.zeros(2, 6), c, w_ih, torch.randn(16, 6), b, b, None),
        r"w_ih must be \(4H, I\)": (x, h, c, torch.randn(16, 5), w_hh, b, b, None),
        r"w_hr must be \(P, H\)": (x, h, c, w_ih, w_hh, b, b, torch.randn(3, 4)),
        r"h0 and c0 must be \(B, P\)": (x, torch.zeros(3, 4), c, w_ih, w_hh, b, b, None),
        "bias must have 4H": (x, h, c, w_ih, w_hh, torch.zeros(12), b, None),
        "w_hh must be Float on the CPU like x": (x, h, c, w_ih, w_hh.double(), b, b, None),
    }
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            layer(*args, *opts)


# ---------------------------------------------------------------- GEMM providers


def test_both_gemm_providers_give_torchs_products():
    a, b = torch.randn(70, 300), torch.randn(300, 130)
    for provider in gemm.CANDIDATES:
        assert rel_err(torch.ops.glasslstm.mm(a, b, provider), a @ b) <= 1e-5
    assert gemm.probe("onednn", 16, 64, 32, threads=1) > 0


def test_a_build_is_keyed_by_the_torch_it_is_compiled_against(monkeypatch):
    """Another torch (an upgrade, another environment sharing the cache) never loads a build
    made for this one: the build's hash changes with torch's version."""
    from glasslstm.ops import _build

    here = _build.source_hash()
    assert here == _build.source_hash()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert _build.source_hash() != here


def test_a_gemm_probe_leaves_the_random_stream_alone():
    """Probes run on first use, in the middle of a seeded run: they must not draw numbers."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for candidate in ("torch", "onednn", "onednn_linear", "bf16"):
        gemm.probe(candidate, 8, 32, 16, threads=1)
    for candidate in gemm.step_candidates():
        assert gemm.probe_loop(candidate, 4, 32, 16, reps=1) > 0
    assert torch.equal(torch.rand(3), expected)


def test_the_faster_measured_provider_is_chosen_and_cached(tmp_path, monkeypatch):
    """Whatever the machine: make one candidate slow and it is not chosen; the decision is
    kept per machine, and $GLASSLSTM_GEMM overrides it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gemm, "busy", lambda: False)
    gemm.forget()
    calls: dict[str, set] = {"big": set(), "step": set()}

    def fake_probe(candidate, m, n, k, threads, reps=7):  # a large product alone
        calls["big"].add(candidate)
        return 5.0 if candidate == slow else 1.0

    def fake_loop(candidate, B, H, P, reps=5):  # a time loop's step, its products inside
        calls["step"].add(candidate)
        return 5.0 if candidate == slow else (0.5 if candidate == fastest_step else 1.0)

    monkeypatch.setattr(gemm, "probe", fake_probe)
    monkeypatch.setattr(gemm, "probe_loop", fake_loop)
    fastest_step = "none"
    for slow in ("torch", "onednn"):
        gemm.remeasure()
        fast = "onednn" if slow == "torch" else "torch"
        assert gemm.providers(torch.float32, 32, 64, 64, 64)[1] == fast
        assert gemm.providers(torch.float32, 32, 64, 64, 64)[0] in set(gemm.step_candidates()) - {
            slow
        }
    assert calls == {"big": set(gemm.BIG_CANDIDATES), "step": set(gemm.step_candidates())}
    for fastest_step in gemm.step_candidates():  # each role takes its own fastest
        slow = "none"
        gemm.remeasure()
        assert gemm.providers(torch.float32, 32, 64, 64, 64) == (fastest_step, "torch")
    fastest_step, slow = "torch", "onednn"
    gemm.remeasure()
    gemm.providers(torch.float32, 32, 64, 64, 64)
    calls = {"big": set(), "step": set()}
    gemm.forget()  # as in a new process: the decision comes from the cache file
    assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("torch", "torch")
    assert calls == {"big": set(), "step": set()}
    monkeypatch.setenv(gemm.ENV, "step=onednn,big=torch")
    assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("onednn", "torch")
    monkeypatch.setenv(gemm.ENV, "onednn_linear")  # a step provider: big stays torch's
    assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("onednn_linear", "torch")
    for bad in ("fastest", "big=onednn_linear"):
        monkeypatch.setenv(gemm.ENV, bad)
        with pytest.raises(ValueError, match="GLASSLSTM_GEMM"):
            gemm.providers(torch.float32, 32, 64, 64, 64)
    monkeypatch.delenv(gemm.ENV)
    # measured while other work held the cores: used in this process, not stored
    monkeypatch.setattr(gemm, "busy", lambda: True)
    gemm.remeasure()
    calls = {"big": set(), "step": set()}
    assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("torch", "torch")
    assert calls["step"] and calls["big"]  # measured
    assert gemm.decisions() == {}
    gemm.forget()  # the measured decisions of this test are not the machine's


def test_bf16_is_used_only_where_it_pays(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(gemm.ENV_BF16, raising=False)
    monkeypatch.setattr(gemm, "native_bf16", lambda: True)
    for bf16_time, pays in ((0.5, True), (2.0, False)):
        gemm.remeasure()
        monkeypatch.setattr(
            gemm, "probe_loop", lambda c, *a, t=bf16_time, **k: t if c == "bf16" else 1.0
        )
        assert gemm.bf16_pays(32, 64, 64) is pays
    monkeypatch.setattr(gemm, "native_bf16", lambda: False)  # emulated bf16: never measured
    monkeypatch.setattr(gemm, "probe_loop", lambda *a, **k: pytest.fail("measured"))
    gemm.forget()
    assert gemm.bf16_pays(32, 64, 64) is False
    monkeypatch.setenv(gemm.ENV_BF16, "1")  # forced on
    assert gemm.bf16_pays(32, 64, 64) is True
    gemm.forget()


@pytest.mark.slow
def test_bf16_autocast_as_the_first_use_of_the_operators(tmp_path):
    """Where bf16 is native, the first layer under autocast asks whether bf16 pays before
    anything else has loaded the operators; that question must load them itself."""
    code = (
        "import torch, glasslstm; from glasslstm.ops import gemm; "
        "gemm.native_bf16 = lambda: True; lstm = glasslstm.LSTM(8, 16); "
        "x = torch.randn(5, 3, 8)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y = lstm(x)[0]\n"
        "print(tuple(y.shape), y.dtype)"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop(gemm.ENV_BF16, None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(5,", "3,", "16)", "torch.float32"]


def test_deterministic_mode_pins_torchs_products(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "onednn")
    assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("onednn", "onednn")
    monkeypatch.delenv(gemm.ENV)
    with glasslstm.deterministic():
        assert gemm.providers(torch.float32, 32, 64, 64, 64) == ("torch", "torch")


# ---------------------------------------------------------------- bf16 products


@pytest.mark.parametrize(
    "m, k, n",
    [(37, 45, 29), (300, 46, 128), (130, 3, 64)],  # odd sizes; the tile unit's packed layout
)
def test_bf16_mm_is_the_float32_product_of_bf16_operands(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    for a_in, b_in in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        got = torch.ops.glasslstm.mm_bf16(a_in, b_in)
        want = a.bfloat16().float() @ b.bfloat16().float()
        assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    "hidden, batch",
    [(12, 37), (260, 5), (64, 9)],  # row-split / threaded / whole column blocks (packed bf16)
)
def test_bf16_time_loop_matches_a_bf16_emulation(hidden, batch, two_threads):
    """The bf16 loop is the float32 loop with x, U, each step's h and W rounded to bf16 before
    the products: each step, written with torch ops on the loop's own state, agrees to float32
    round-off. (Whole runs cannot be held that close: a last-bit difference flips a later
    rounding to bf16.)"""
    torch.manual_seed(0)
    T, B, H, I = 7, batch, hidden, 5
    w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H) * 0.3
    b = torch.randn(4 * H)
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    y, h_n, c_n, gates, cs, _, _, _ = torch.ops.glasslstm.lstm_layer(
        x, h0, c0, w_ih, w_hh, b, None, None, None, False, False, True, True, "torch", "torch"
    )

    def r(t):
        return t.bfloat16().float()

    xw = r(x) @ r(w_ih).t()
    for t in range(T):
        h_prev, c_prev = (h0, c0) if t == 0 else (y[t - 1], cs[t - 1])
        a = xw[t] + b + r(h_prev) @ r(w_hh).t()
        c, tanh_c, h = torch.empty(B, H), torch.empty(B, H), torch.empty(B, H)
        cells.TORCH_CELL.forward(a, c_prev, c, tanh_c, h)
        for got, want in ((gates[t], a), (cs[t], c), (y[t], h)):
            assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("hidden, batch", [(12, 37), (260, 6)])  # row-split / threaded
def test_autocast_bf16_stays_close_to_float32(hidden, batch, two_threads, monkeypatch):
    """Under CPU bf16 autocast (bf16 forced on: it pays on few CPUs), products in bf16,
    float32 sums and state: outputs and gradients within bf16 rounding of the float32 run,
    ragged and both directions."""
    monkeypatch.setenv(gemm.ENV_BF16, "1")
    torch.manual_seed(0)
    model = glasslstm.LSTM(7, hidden, num_layers=2, bidirectional=True, backend="fused")
    x = torch.randn(6, batch, 7)
    lengths = torch.tensor(sorted(torch.randint(1, 7, (batch,)).tolist(), reverse=True))
    lengths[0] = 6
    runs = []
    for autocast in (False, True):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, (h, c) = model(xx, lengths=lengths)
        (y.pow(2).sum() + c.sum()).backward()
        runs.append(
            [y.detach(), h.detach(), xx.grad] + [p.grad.clone() for p in model.parameters()]
        )
    for a, b in zip(*runs):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 2e-2
    assert not torch.equal(runs[0][0], runs[1][0])  # the bf16 products did run


def test_autocast_without_bf16_gains_runs_in_float32(monkeypatch):
    monkeypatch.setenv(gemm.ENV_BF16, "0")
    model = glasslstm.LSTM(4, 8)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)[0]
    assert y.dtype == torch.float32 and torch.equal(y, model(x)[0])


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "cfg",
    [
        dict(num_layers=1),
        dict(num_layers=3),
        dict(num_layers=2, proj_size=3),
        dict(num_layers=2, bias=False),
    ],
    ids=["1layer", "3layers", "proj", "nobias"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stream_matches_the_whole_sequence(cfg, dtype):
    ref = torch.nn.LSTM(5, 8, dtype=dtype, **cfg)
    lstm = glasslstm.LSTM.from_torch(ref)
    x = torch.randn(12, 1, 5, dtype=dtype)
    h0 = torch.randn(cfg["num_layers"], 1, cfg.get("proj_size") or 8, dtype=dtype)
    c0 = torch.randn(cfg["num_layers"], 1, 8, dtype=dtype)
    with torch.no_grad():
        want, (h_n, c_n) = ref(x, (h0, c0))
    s = Stream(lstm, (h0, c0))
    assert s.fused
    got = torch.stack([s.step(x[t, 0]).clone() for t in range(12)])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(got, want[:, 0]) <= tol
    assert rel_err(s.state[0], h_n) <= tol and rel_err(s.state[1], c_n) <= tol
    s.reset()
    assert s.h.abs().sum() == 0 and s.c.abs().sum() == 0


def test_stream_follows_in_place_weight_updates():
    lstm = glasslstm.LSTM(3, 4, num_layers=2)
    s = Stream(lstm)
    x = torch.randn(3)
    s.step(x)
    with torch.no_grad():
        lstm.bias_hh_l1.add_(0.5)  # like an optimizer step
        lstm.weight_ih_l0.mul_(2.0)
        want = lstm(x.view(1, 1, 3), s.state)[0].view(-1).clone()
    h, c = (t.clone() for t in s.state)
    got = s.step(x)
    assert rel_err(got, want) <= 1e-6
    s.reset((h, c))
    assert torch.equal(s.step(x), got)


def test_stream_rebuilds_its_weights_when_and_only_when_one_changes():
    """Steps with the weights unchanged reuse the step's copies of them; a new Parameter, a
    swapped ``.data`` and an in-place update each make new ones, and the steps follow."""
    ref = torch.nn.LSTM(3, 4, num_layers=2)
    lstm = glasslstm.LSTM.from_torch(ref)
    s = Stream(lstm)
    x = torch.randn(3)
    for _ in range(3):
        s.step(x)
    k = s._kernel
    assert k is not None and k.builds == 1

    def replace(name):
        new = torch.nn.Parameter(torch.randn_like(getattr(lstm, name)))
        setattr(lstm, name, new)
        setattr(ref, name, torch.nn.Parameter(new.detach().clone()))

    def swap(name):
        getattr(lstm, name).data = torch.randn_like(getattr(lstm, name))
        getattr(ref, name).data = getattr(lstm, name).data.clone()

    def update(name):
        with torch.no_grad():
            getattr(lstm, name).mul_(1.5)
            getattr(ref, name).mul_(1.5)

    for builds, (change, name) in enumerate(
        ((replace, "weight_hh_l1"), (swap, "weight_ih_l0"), (update, "bias_hh_l0")), start=2
    ):
        h, c = (t.clone() for t in s.state)
        change(name)
        with torch.no_grad():
            want = ref(x.view(1, 1, 3), (h, c))[0].view(-1)
        assert rel_err(s.step(x), want) <= 1e-6, name
        s.step(x)
        assert k.builds == builds, name


def test_lm_stream_follows_its_models_weights():
    """The language model's stream rebuilds its token table and output weights when the LSTM,
    the embedding or the output layer changes, and not otherwise."""
    model = _tiny_lm().eval()
    s = LMStream(model)
    ids = [0, 3, 1]
    for i in ids:
        s.step(i)
    k = s._s._kernel
    assert k is not None and k.builds == 1
    for t in (model.lstm.weight_ih_l0, model.embedding.weight, model.head.weight):
        with torch.no_grad():
            t.mul_(1.25)
        s.reset()
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0][0, -1]
        for i in ids:
            got = s.step(i)
        assert rel_err(got, want) <= 1e-5
    assert k.builds == 2  # the LSTM's weight changed once


def test_stream_uses_no_allocation_per_step():
    s = Stream(glasslstm.LSTM(4, 6, num_layers=2))
    x = torch.randn(4)
    ptrs = (s.h.data_ptr(), s.c.data_ptr(), s.step(x).data_ptr())
    for _ in range(3):
        assert s.step(x).data_ptr() == ptrs[2]
    assert (s.h.data_ptr(), s.c.data_ptr()) == ptrs[:2]


def test_stream_rejects_what_cannot_stream():
    with pytest.raises(ValueError, match="bidirectional"):
        Stream(glasslstm.LSTM(2, 3, bidirectional=True))
    with pytest.raises(TypeError, match="from_torch"):
        Stream(torch.nn.LSTM(2, 3))
    s = Stream(glasslstm.LSTM(2, 3))
    with pytest.raises(ValueError, match="input_size=2"):
        s.step(torch.randn(3))
    with pytest.raises(ValueError, match=r"state h must be \(1, 3\)"):
        s.reset((torch.zeros(2, 1, 3), torch.zeros(1, 1, 3)))


def test_stream_without_the_step_uses_torch_forward():
    lstm = glasslstm.LSTM(3, 4, backend="bptt")  # a forced torch path: no C++ step
    s = Stream(lstm)
    assert not s.fused
    x = torch.randn(6, 1, 3)
    with torch.no_grad():
        want = lstm(x)[0][:, 0]
    got = torch.stack([s.step(x[t, 0]).clone() for t in range(6)])
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("unbatched", [False, True])
def test_drop_in_one_step_call_matches_torch(unbatched):
    """``lstm(x_t, (h, c))`` under no_grad takes the C++ step and gives torch's results."""
    ref = torch.nn.LSTM(5, 7, num_layers=2)
    lstm = glasslstm.LSTM.from_torch(ref)
    shape = (1, 5) if unbatched else (1, 1, 5)
    hx = first = tuple(torch.randn((2, 7) if unbatched else (2, 1, 7)) for _ in range(2))
    keep = tuple(t.clone() for t in hx)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(shape)
            assert drop_in_step(lstm, x, hx) is not None  # the step takes this call
            a, (ah, ac) = lstm(x, hx)
            b, (bh, bc) = ref(x, hx)
            assert a.shape == b.shape and ah.shape == bh.shape
            assert rel_err(a, b) <= 1e-6 and rel_err(ah, bh) <= 1e-6 and rel_err(ac, bc) <= 1e-6
            hx = (ah, ac)
        assert lstm(torch.randn(shape))[0].shape == ref(torch.randn(shape))[0].shape  # no hx
    # the caller's hx is read, never written; the returned state is a new tensor
    assert torch.equal(first[0], keep[0]) and torch.equal(first[1], keep[1])
    assert not torch.equal(hx[0], keep[0])


def test_drop_in_step_takes_odd_states_and_leaves_errors_to_the_module():
    ref = torch.nn.LSTM(5, 7, num_layers=2, proj_size=3, dtype=torch.float64)
    lstm = glasslstm.LSTM.from_torch(ref)
    hx = (torch.randn(2, 1, 3, dtype=torch.float64), torch.randn(2, 1, 7, dtype=torch.float64))
    x = torch.randn(1, 1, 5, dtype=torch.float64)
    with torch.no_grad():
        odd = (hx[0].transpose(0, 1).contiguous().transpose(0, 1), hx[1])  # not contiguous
        assert rel_err(lstm(x, odd)[0], ref(x, odd)[0]) <= 1e-12
        lstm.weight_hh_l1.add_(0.5)  # changed: the step re-reads it
        ref.weight_hh_l1.add_(0.5)
        assert rel_err(lstm(x, hx)[0], ref(x, hx)[0]) <= 1e-12
        assert drop_in_step(lstm, x, (hx[0][:1], hx[1])) is None  # not for the step
        with pytest.raises(InputError, match="h_0 has shape"):  # the module's own error
            lstm(x, (hx[0][:1], hx[1]))


def test_drop_in_step_leaves_dropout_in_training_to_the_forward():
    """A 2-layer LSTM with dropout in training mode drops between its layers even under
    no_grad (the step has no dropout, so such calls take the module's forward); in eval mode
    the same call is the deterministic step."""
    lstm = glasslstm.LSTM(3, 8, num_layers=2, dropout=0.5)
    x, hx = torch.randn(1, 1, 3), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    with torch.no_grad():
        lstm.eval()
        assert torch.equal(lstm(x, hx)[0], lstm(x, hx)[0])
        lstm.train()
        assert drop_in_step(lstm, x, hx) is None
        outs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            outs.append(lstm(x, hx)[0])
    assert not torch.equal(outs[0], outs[1])


def test_drop_in_calls_from_several_threads():
    """Four Python threads calling the same module at once each get torch's result (each call
    has its own scratch)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(300, 300)
    lstm = glasslstm.LSTM.from_torch(ref)
    xs = [torch.randn(1, 1, 300) for _ in range(8)]
    with torch.no_grad():
        lstm(xs[0])
        want = [ref(x)[0] for x in xs]
    wrong = []

    def worker(k):
        with torch.no_grad():
            for r in range(50):
                i = (k + r) % 8
                if rel_err(lstm(xs[i])[0], want[i]) > 1e-5:
                    wrong.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_drop_in_step_keeps_the_callers_state_and_grad_mode():
    lstm = glasslstm.LSTM(2, 3)
    hx = (torch.randn(1, 1, 3), torch.randn(1, 1, 3))
    before = tuple(t.clone() for t in hx)
    with torch.no_grad():
        lstm(torch.randn(1, 1, 2), hx)
    assert torch.equal(hx[0], before[0]) and torch.equal(hx[1], before[1])
    out = lstm(torch.randn(1, 1, 2), hx)[0]  # grad mode: the autograd path
    assert out.grad_fn is not None


@pytest.mark.parametrize("hidden, proj", [(256, 0), (256, 96), (100, 0)])
def test_threaded_step_is_the_same_on_every_step(hidden, proj, two_threads):
    """Weights of 2^16+ multiply-adds take the threaded panel product (each thread reads its
    panels front to back on one step, back to front on the next; H = 100: 400 rows, the last
    panel part padding): torch's results, and the same call twice gives the same bits."""
    ref = torch.nn.LSTM(hidden, hidden, num_layers=2, proj_size=proj)
    lstm = glasslstm.LSTM.from_torch(ref)
    x = torch.randn(1, 1, hidden)
    hx = (torch.randn(2, 1, proj or hidden), torch.randn(2, 1, hidden))
    with torch.no_grad():
        first = lstm(x, hx)
        second = lstm(x, hx)  # the other direction through the weights
        want = ref(x, hx)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][1], second[1][1])
    assert rel_err(first[0], want[0]) <= 1e-5 and rel_err(first[1][1], want[1][1]) <= 1e-5


def test_drop_in_step_runs_hooks_and_follows_replaced_weights():
    ref = torch.nn.LSTM(3, 4)
    lstm = glasslstm.LSTM.from_torch(ref)
    x = torch.randn(1, 1, 3)
    seen, calls = [], []
    handle = lstm.register_forward_hook(lambda mod, args, out: seen.append(out[0].clone()))
    global_handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(type(mod).__name__)
    )
    try:
        with torch.no_grad():
            y = lstm(x)[0]
    finally:
        handle.remove()
        global_handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], y) and calls == ["LSTM"]
    with torch.no_grad():
        lstm(x)  # builds the cached plan
        new = torch.nn.Parameter(torch.randn(16, 4))
        lstm.weight_hh_l0 = new  # a new Parameter object
        ref.weight_hh_l0 = torch.nn.Parameter(new.detach().clone())
        hx = (torch.randn(1, 1, 4), torch.randn(1, 1, 4))
        assert rel_err(lstm(x, hx)[0], ref(x, hx)[0]) <= 1e-6
        lstm.weight_ih_l0.data = torch.randn(16, 3)  # storage swapped, version unchanged
        ref.weight_ih_l0.data = lstm.weight_ih_l0.data.clone()
        assert rel_err(lstm(x, hx)[0], ref(x, hx)[0]) <= 1e-6
        lstm.double()
        ref.double()
        hx64 = tuple(t.double() for t in hx)
        y64 = lstm(x.double(), hx64)[0]
        assert y64.dtype == torch.float64 and rel_err(y64, ref(x.double(), hx64)[0]) <= 1e-12


def test_drop_in_step_follows_in_place_updates_and_leaves_wrapped_tensors_alone():
    ref = torch.nn.LSTM(3, 4, 2)
    lstm = glasslstm.LSTM.from_torch(ref)
    x, hx = torch.randn(1, 1, 3), (torch.randn(2, 1, 4), torch.randn(2, 1, 4))
    with torch.no_grad():
        lstm(x, hx)  # builds the cached plan
        for a, b in ((lstm.weight_hh_l1, ref.weight_hh_l1), (lstm.bias_ih_l0, ref.bias_ih_l0)):
            a.mul_(1.5)  # an optimizer's in-place step: the version counter moves
            b.mul_(1.5)
            assert rel_err(lstm(x, hx)[0], ref(x, hx)[0]) <= 1e-6
        assert drop_in_step(lstm, x, hx) is not None

        class Tagged(torch.Tensor):  # a subclass may mean something else: the general path
            pass

        assert drop_in_step(lstm, x.as_subclass(Tagged), hx) is None
        assert drop_in_step(lstm, x, [hx[0], hx[1].as_subclass(Tagged)]) is None
        assert drop_in_step(lstm, x.transpose(1, 2), hx) is None  # (1, 3, 1): not a step
        assert drop_in_step(lstm, x, (hx[0],)) is None
    # under vmap the tensors are wrappers: the general path (batched) runs them
    xs = torch.randn(5, 1, 1, 3)
    with torch.no_grad():
        ys = torch.func.vmap(lambda xi: lstm(xi, hx)[0])(xs)
        want = torch.stack([ref(xi, hx)[0] for xi in xs])
    assert rel_err(ys, want) <= 1e-6


def test_drop_in_plan_is_neither_shared_by_copies_nor_pickled():
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(1, 1, 3)
    with torch.no_grad():
        before = lstm(x)[0]
        twin = copy.deepcopy(lstm)
        twin.weight_ih_l0.add_(1.0)
        assert not torch.equal(twin(x)[0], before)  # the copy steps with its own weights
        assert torch.equal(lstm(x)[0], before)
        buf = io.BytesIO()
        torch.save(lstm, buf)
        assert b"DropInStep" not in buf.getvalue()
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x)[0], before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jit.trace, still in use
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_drop_in_step_stays_out_of_jit_traces():
    """Under torch.jit.trace the one-token call runs the layer operator, so the trace has it."""
    lstm = glasslstm.LSTM(3, 4).eval()
    x, hx = torch.randn(1, 1, 3), (torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    with torch.no_grad():
        want = lstm(x, hx)
        traced = torch.jit.trace(lstm, (x, hx), check_trace=False)
        x2 = torch.randn(1, 1, 3)
        got, want2 = traced(x2, hx), lstm(x2, hx)
    assert "glasslstm::lstm_layer" in str(traced.graph)
    assert rel_err(got[0], want2[0]) <= 1e-6 and not torch.equal(got[0], want[0])


def test_drop_in_step_follows_a_later_backend_change():
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(1, 1, 3)
    with torch.no_grad():
        want = lstm(x)[0]  # builds the module's step plan
        lstm.backend = "bptt"
        assert drop_in_step(lstm, x, None) is None
        assert rel_err(lstm(x)[0], want) <= 1e-6  # the torch path, same numbers


def _tiny_lm(vocab="abc ."):
    tok = CharTokenizer(sorted(set(vocab)))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=2, dropout=0.0)
    return LanguageModel(cfg, tok)


@pytest.mark.parametrize("table", [True, False])
def test_lm_stream_matches_the_model(table):
    model = _tiny_lm().eval()
    ids = [0, 3, 1, 1, 4, 2]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    s = LMStream(model, table_limit=10**9 if table else 0)
    assert s._fused
    got = torch.stack([s.step(i).clone() for i in ids])
    assert rel_err(got, want) <= 1e-5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.step(99)


def test_generate_is_unchanged_by_the_stream():
    """Sampling through the stream gives what stepping the whole model gives."""
    model = _tiny_lm()
    text = "".join(model.generate("ab", length=40, temperature=0.9, seed=3))
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(3)
    from glasslstm.model import _sample

    ids = []
    with torch.no_grad():
        logits, _, state = model(torch.tensor([tok.encode("ab")]))
        logits = logits[0, -1]
        for _ in range(40):
            nxt = _sample(logits, 0.9, 0, 1.0, gen)
            ids.append(nxt)
            logits, _, state = model(torch.tensor([[nxt]]), state)
            logits = logits[0, -1]
    assert text == tok.decode(ids)


def test_a_killed_builds_lock_is_cleared_and_a_fresh_one_kept(tmp_path, capsys):
    """A lock file left by a killed build would make every later build wait forever."""
    import os
    import time

    from glasslstm.ops import native

    lock = tmp_path / "lock"
    lock.write_text("")
    native._clear_stale_lock(lock)
    assert lock.exists()  # a build may be running right now: leave it
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    native._clear_stale_lock(lock)
    assert not lock.exists()
    assert "did not finish" in capsys.readouterr().err
    native._clear_stale_lock(lock)  # no lock: nothing to do
