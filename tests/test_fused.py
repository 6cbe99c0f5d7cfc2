"""The fused CPU path (C kernels) and streaming inference, against the torch path and torch."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

import glasslstm
from glasslstm.data import CharTokenizer
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.ops import bptt, cpu, describe, ext
from glasslstm.stream import LMStream, StepKernel, Stream

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"fused CPU path: {cpu.status()}")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def test_auto_picks_the_fused_cell_on_cpu():
    assert describe() == "auto -> cpu-fused cell"
    assert describe("bptt") == "bptt -> torch cell"
    assert cpu.status().startswith("on")
    assert ("bf16 GEMM under autocast" in cpu.status()) == (cpu.bf16_cell() is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_matches_torch_cell_over_a_wide_range(dtype):
    """Every activation regime: saturated (|x| up to 60), near zero, and in between."""
    n, H = 7, 37  # odd sizes: vector remainders
    a = torch.cat([torch.randn(n, 4 * H, dtype=dtype) * s for s in (0.01, 1.0, 8.0, 60.0)])
    n = a.shape[0]
    c_prev = torch.randn(n, H, dtype=dtype) * 3
    outs = {}
    for name, cell in (("torch", bptt.TORCH_CELL), ("fused", cpu.cell(dtype))):
        aa = a.clone()
        c, tc, h = (torch.empty(n, H, dtype=dtype) for _ in range(3))
        cell.forward(aa, c_prev, c, tc, h)
        outs[name] = (aa, c, tc, h)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for x, y in zip(outs["fused"], outs["torch"]):
        assert rel_err(x, y) <= tol


@pytest.mark.parametrize("with_dy", [False, True])
def test_cell_backward_matches_torch_cell(with_dy):
    dtype, n, H = torch.float64, 5, 19
    gates = torch.rand(n, 4 * H, dtype=dtype)
    c_prev, tc = torch.randn(n, H, dtype=dtype), torch.rand(n, H, dtype=dtype) * 2 - 1
    dh0, dc0 = torch.randn(n, H, dtype=dtype), torch.randn(n, H, dtype=dtype)
    dy = torch.randn(n, H, dtype=dtype) if with_dy else None
    res = []
    for cell in (bptt.TORCH_CELL, cpu.cell(dtype)):
        prep = cell.backward_prepare(gates[None], tc[None], H)
        p = None if prep is None else (prep[0][0], prep[1][0])
        dh, dc, d = dh0.clone(), dc0.clone(), torch.empty(n, 4 * H, dtype=dtype)
        cell.backward(gates, c_prev, tc, dh, dy, dc, d, p)
        res.append((dc, d))
    for x, y in zip(*res):
        assert rel_err(x, y) <= 1e-14


def test_nan_and_inf_propagate():
    """A diverging run must see its NaN: the fused kernels may not turn NaN into numbers."""
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
    for cell in (bptt.TORCH_CELL, cpu.cell(torch.float32)):
        aa, c, tc, h = a.clone(), torch.empty(1, 1), torch.empty(1, 1), torch.empty(1, 1)
        cell.forward(aa, torch.ones(1, 1), c, tc, h)
        res.append(torch.cat([aa, c, tc, h], 1))
    assert torch.equal(res[0][:, :4], res[1][:, :4]) and torch.allclose(res[0], res[1], atol=1e-6)


@pytest.mark.skipif(
    cpu.blas_routines().get(torch.float32) is None or not cpu.blas_routines()[torch.float32].pack,
    reason="torch's BLAS has no packed GEMM (MKL's sgemm_pack) here",
)
def test_packed_gemm_time_loops_match_plain_gemm(monkeypatch):
    """float32 time loops multiply by the recurrent weight packed once (MKL's sgemm_pack +
    sgemm_compute); the same loops on plain sgemm, and torch, agree. A ragged batch mixes the
    two (steps with fewer rows take plain sgemm)."""
    packed_cell = cpu.CpuCell(torch.float32)
    plain_cell = cpu.CpuCell(torch.float32)
    full = cpu.blas_routines()[torch.float32]
    plain_cell._blas = cpu.Blas(full.gemm, None, None, None)
    plain_cell._blas_ptr = ctypes.addressof(plain_cell._blas)
    ref = torch.nn.LSTM(6, 12, num_layers=2)
    x = torch.randn(20, 5, 6)
    lengths = torch.tensor([20, 17, 17, 9, 3])
    results = {}
    for name, cell in (("packed", packed_cell), ("plain", plain_cell)):
        monkeypatch.setattr(cpu, "cell", lambda dtype, cell=cell: cell)
        ours = glasslstm.LSTM.from_torch(ref, backend="fused")
        for ragged in (False, True):
            xx = x.clone().requires_grad_()
            y = ours(xx, lengths=lengths if ragged else None)[0]
            y.pow(2).sum().backward()
            results[name, ragged] = (y.detach(), xx.grad, ours.weight_hh_l0.grad.clone())
    want = ref(x)[0]
    assert rel_err(results["packed", False][0], want) <= 1e-5
    for ragged in (False, True):
        for a, b in zip(results["packed", ragged], results["plain", ragged]):
            assert rel_err(a, b) <= 1e-5


def test_python_time_loop_fallback_matches(monkeypatch):
    """Without torch's BLAS symbol the fused cell runs under the Python time loop."""
    ref = torch.nn.LSTM(4, 6, num_layers=2, proj_size=3, dtype=torch.float64)
    cell = cpu.CpuCell(torch.float64)
    cell._blas = None  # as if no sgemm_/dgemm_ were exported
    assert not cell.layer_forward(*[None] * 9)
    monkeypatch.setattr(cpu, "cell", lambda dtype: cell)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    x = torch.randn(10, 3, 4, dtype=torch.float64, requires_grad=True)
    outs = [m(x)[0] for m in (ours, ref)]
    grads = [
        torch.autograd.grad(o.pow(2).sum(), [x, m.weight_hh_l1]) for o, m in zip(outs, (ours, ref))
    ]
    assert rel_err(outs[0], outs[1]) <= 1e-12
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-12


def test_forced_fused_fails_clearly_where_it_cannot_run():
    lstm = glasslstm.LSTM(2, 3, backend="fused").to(torch.bfloat16)
    with pytest.raises(ValueError, match="backend='fused' cannot run here.*bfloat16.*bptt"):
        lstm(torch.randn(2, 1, 2, dtype=torch.bfloat16))
    lstm.backend = None  # auto falls back to the torch cell
    assert lstm(torch.randn(2, 1, 2, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.slow
def test_no_compiler_means_torch_path_with_a_reason(tmp_path):
    code = (
        "import torch, glasslstm; from glasslstm.ops import cpu, describe; "
        "print(cpu.status()); print(describe()); "
        "print(glasslstm.LSTM(2, 3)(torch.randn(4, 1, 2))[0].shape)"
    )
    env = {
        **os.environ,
        "GLASSLSTM_CC": "no-such-cc",
        "CC": "no-such-cc",
        "PATH": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "off: no C compiler found (install gcc, or set $GLASSLSTM_CC)"
    assert out[1] == "auto -> torch cell"
    assert out[2] == "torch.Size([4, 1, 3])"


@pytest.mark.slow
def test_drop_in_extension_can_be_switched_off_and_says_why(tmp_path):
    """$GLASSLSTM_NO_EXT=1: no build; the drop-in call keeps its Python path (the C step).
    Without a C++ compiler: likewise, with the reason."""
    code = (
        "import torch, glasslstm; from glasslstm.ops import ext; "
        "m = glasslstm.LSTM(2, 3)\n"
        "with torch.no_grad(): y = m(torch.randn(1, 1, 2))[0]\n"
        "print(ext.build(), ext.status(), tuple(y.shape), m._drop_in is not None)"
    )
    env = {**os.environ, "GLASSLSTM_NO_EXT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "None off: disabled by $GLASSLSTM_NO_EXT / $GLASSLSTM_NO_FUSED (1, 1, 3) True"
    env = {
        **os.environ,
        "GLASSLSTM_CXX": "no-such-c++",
        "CXX": "no-such-c++",
        "PATH": str(tmp_path),
    }
    env["GLASSLSTM_CC"] = str(shutil.which(cpu._compiler()))  # the C kernels still build
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == (
        "None off: no C++ compiler found (install g++, or set $GLASSLSTM_CXX) (1, 1, 3) True"
    )


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


def test_stream_without_kernel_uses_torch_forward():
    lstm = glasslstm.LSTM(3, 4, backend="bptt")  # a forced torch path: no C step
    s = Stream(lstm)
    assert not s.fused
    x = torch.randn(6, 1, 3)
    with torch.no_grad():
        want = lstm(x)[0][:, 0]
    got = torch.stack([s.step(x[t, 0]).clone() for t in range(6)])
    assert rel_err(got, want) <= 1e-6


@pytest.fixture(params=["python", "ext"])
def drop_in_path(request, monkeypatch):
    """Each drop-in test runs twice: on the C++ entry point (glasslstm.ops.ext, built now)
    and on the Python path it replaces once built (the path wherever it cannot be)."""
    if request.param == "ext":
        if ext.build() is None:
            pytest.skip(f"drop-in extension: {ext.status()}")
    else:
        monkeypatch.setattr(ext, "module", lambda: None)
    return request.param


@pytest.mark.parametrize("unbatched", [False, True])
def test_drop_in_one_step_call_matches_torch(unbatched, drop_in_path):
    """``lstm(x_t, (h, c))`` under no_grad takes the C step and gives torch's results."""
    ref = torch.nn.LSTM(5, 7, num_layers=2)
    lstm = glasslstm.LSTM.from_torch(ref)
    shape = (1, 5) if unbatched else (1, 1, 5)
    hx = first = tuple(torch.randn((2, 7) if unbatched else (2, 1, 7)) for _ in range(2))
    keep = tuple(t.clone() for t in hx)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(shape)
            a, (ah, ac) = lstm(x, hx)
            b, (bh, bc) = ref(x, hx)
            assert a.shape == b.shape and ah.shape == bh.shape
            assert rel_err(a, b) <= 1e-6 and rel_err(ah, bh) <= 1e-6 and rel_err(ac, bc) <= 1e-6
            hx = (ah, ac)
        assert lstm(torch.randn(shape))[0].shape == ref(torch.randn(shape))[0].shape  # no hx
    # the caller's hx is read, never written; the returned state is a new tensor
    assert torch.equal(first[0], keep[0]) and torch.equal(first[1], keep[1])
    assert not torch.equal(hx[0], keep[0])


def test_drop_in_extension_takes_the_call_and_hands_back_what_it_cannot(monkeypatch):
    """Once built, the C++ entry point serves the one-token call whole (the Python path's
    StepKernel call never runs); what it does not handle (a changed weight, an odd shape, a
    non-contiguous state) goes back to the Python path, which still gives torch's results."""
    if ext.build() is None:
        pytest.skip(f"drop-in extension: {ext.status()}")
    ref = torch.nn.LSTM(5, 7, num_layers=2, proj_size=3, dtype=torch.float64)
    lstm = glasslstm.LSTM.from_torch(ref)
    hx = (torch.randn(2, 1, 3, dtype=torch.float64), torch.randn(2, 1, 7, dtype=torch.float64))
    x = torch.randn(1, 1, 5, dtype=torch.float64)
    python_steps = []
    real = StepKernel.__call__
    monkeypatch.setattr(
        StepKernel, "__call__", lambda self, *a, **k: python_steps.append(1) or real(self, *a, **k)
    )
    with torch.no_grad():
        lstm(x, hx)  # builds the plan (Python path)
        python_steps.clear()
        for _ in range(3):
            y, (h, c) = lstm(x, hx)
            want = ref(x, hx)
            assert rel_err(y, want[0]) <= 1e-12 and rel_err(c, want[1][1]) <= 1e-12
            hx = (h, c)
        assert python_steps == []
        lstm.weight_hh_l1.add_(0.5)  # changed: the Python path re-reads it
        ref.weight_hh_l1.add_(0.5)
        assert rel_err(lstm(x, hx)[0], ref(x, hx)[0]) <= 1e-12 and python_steps == [1]
        lstm(x, hx)  # and the extension takes over again
        assert python_steps == [1]
        odd = (hx[0].transpose(0, 1).contiguous().transpose(0, 1), hx[1])  # not contiguous
        assert rel_err(lstm(x, odd)[0], ref(x, odd)[0]) <= 1e-12
        with pytest.raises(ValueError, match="h_0 has shape"):  # the module's own error
            lstm(x, (hx[0][:1], hx[1]))


def test_drop_in_step_leaves_dropout_in_training_to_the_forward(drop_in_path):
    """A 2-layer LSTM with dropout in training mode drops between its layers even under
    no_grad (the step has no dropout, so such calls take the module's forward); in eval mode
    the same call is the deterministic step."""
    lstm = glasslstm.LSTM(3, 8, num_layers=2, dropout=0.5)
    x, hx = torch.randn(1, 1, 3), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    with torch.no_grad():
        lstm.eval()
        assert torch.equal(lstm(x, hx)[0], lstm(x, hx)[0])  # builds the plan, steps
        lstm.train()
        outs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            outs.append(lstm(x, hx)[0])
    assert not torch.equal(outs[0], outs[1])


def test_drop_in_calls_from_several_threads_take_turns(drop_in_path):
    """The step's scratch and weight copies belong to the module: four Python threads calling
    the same module at once each get torch's result (before, 600 of 800 came back wrong)."""
    import threading

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


def test_drop_in_step_keeps_the_callers_state_and_grad_mode(drop_in_path):
    lstm = glasslstm.LSTM(2, 3)
    hx = (torch.randn(1, 1, 3), torch.randn(1, 1, 3))
    before = tuple(t.clone() for t in hx)
    with torch.no_grad():
        lstm(torch.randn(1, 1, 2), hx)
    assert torch.equal(hx[0], before[0]) and torch.equal(hx[1], before[1])
    out = lstm(torch.randn(1, 1, 2), hx)[0]  # grad mode: the autograd path
    assert out.grad_fn is not None


@pytest.mark.parametrize("hidden, proj", [(256, 0), (256, 96), (100, 0)])
def test_threaded_step_is_the_same_on_every_step(hidden, proj, two_threads, drop_in_path):
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


def test_drop_in_step_runs_hooks_and_follows_replaced_weights(drop_in_path):
    ref = torch.nn.LSTM(3, 4)
    lstm = glasslstm.LSTM.from_torch(ref)
    x = torch.randn(1, 1, 3)
    seen = []
    handle = lstm.register_forward_hook(lambda mod, args, out: seen.append(out[0].clone()))
    with torch.no_grad():
        y = lstm(x)[0]
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], y)
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


def test_drop_in_plan_is_neither_copied_nor_pickled(drop_in_path):
    import copy
    import io

    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(1, 1, 3)
    with torch.no_grad():
        before = lstm(x)[0]
        twin = copy.deepcopy(lstm)
        twin.weight_ih_l0.add_(1.0)
        assert not torch.equal(twin(x)[0], before)  # the copy steps with its own weights
        assert torch.equal(lstm(x)[0], before)
        buf = io.BytesIO()
        torch.save(lstm, buf)  # no ctypes object in the pickle
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x)[0], before)


@pytest.fixture
def two_threads():
    """Two OpenMP threads whatever the machine has: the row-split time loops need two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("batch", [1, 32])  # 32: the loop is split over the threads
def test_long_backward_flushes_denormal_gradients_and_restores_the_fp_mode(batch, two_threads):
    """A gradient halved at each of 140 steps reaches 2^-140 (7e-43, denormal in float32):
    the fused time loop flushes it to zero (denormal arithmetic is 10-100x slower on x86),
    the torch path keeps it; float64 has the range, and both agree. The calling thread's
    floating-point control is left as it was."""
    lib = cpu.library()
    lib.glasslstm_fp_mode.restype = ctypes.c_uint

    def control():
        return lib.glasslstm_fp_mode() & ~0x3F  # without the sticky status flags

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
def test_row_split_time_loops_match_torch(dtype, cfg, batch, two_threads):
    """With small weights the time loops share out the batch rows (37 or 5: uneven splits),
    each thread running every step for its rows; ragged lengths end rows inside one thread's
    share and in the other's. Forward and gradients (the bias's: summed by the loop, a partial
    per thread) match torch and the one-thread loops."""
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
def test_large_weight_loops_match_torch(ragged, two_threads):
    """Weights beyond a core's L2 keep one loop with threaded GEMMs; a step's gate math with
    8192+ values is still shared by the threads (48 rows x 192 units, float64)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(7, 192, dtype=torch.float64)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    T, B = 6, 48
    x = torch.randn(T, B, 7, dtype=torch.float64)
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
        assert rel_err(a, b) <= 1e-12


needs_bf16 = pytest.mark.skipif(
    cpu.bf16_cell() is None, reason="torch's BLAS has no bf16 GEMM (MKL gemm_bf16bf16f32) here"
)


def test_bf16_rounding_is_torchs():
    """The C loops round h and da to bf16 as torch's .to(torch.bfloat16) does: to nearest,
    ties to even, NaN stays NaN, overflow to inf, denormals kept."""
    bits = torch.tensor(
        [
            0x3F808000,
            0x3F818000,
            0x3F80FFFF,
            0x7F7FFFFF,
            0x00012345,
            0x80008000,
            0x7F800000,
            0xFF800000,
            0x7FC00001,
            0x7F800001,
        ]
    ).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(1000) * 1e3, torch.randn(1000) * 1e-39])
    out = torch.empty(x.numel(), dtype=torch.int16)
    cpu.library().glasslstm_to_bf16(x.numel(), x.data_ptr(), out.data_ptr())
    want = x.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(out[~nan], want[~nan])
    assert torch.isnan(out.view(torch.bfloat16)[nan]).all()


@needs_bf16
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
def test_bf16_mm_is_the_float32_product_of_bf16_operands(ta, tb):
    a, b = torch.randn(37, 45), torch.randn(45, 29)
    a_in = a.t().contiguous().t() if ta else a  # transposed storage, same values
    b_in = b.t().contiguous().t() if tb else b
    got = cpu.bf16_cell().mm(a_in, b_in)
    want = a.bfloat16().float() @ b.bfloat16().float()
    assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-5


@needs_bf16
@pytest.mark.parametrize("hidden, batch", [(12, 37), (260, 5)])  # row-split / threaded GEMMs
def test_bf16_time_loops_match_a_bf16_emulation(hidden, batch, two_threads):
    """The bf16 loops are the float32 loops with each step's h (forward) or da (backward)
    and the recurrent weight rounded to bf16 before the product: each step, written with torch
    ops on the loop's own rounded inputs, agrees to float32 round-off. (Whole runs cannot be
    held that close: a last-bit difference flips some later rounding to bf16.)"""
    torch.manual_seed(0)
    T, B, H = 7, batch, hidden
    cell, ref = cpu.bf16_cell(), bptt.TORCH_CELL
    w_hh = torch.randn(4 * H, H) * 0.3
    w16 = w_hh.bfloat16().float()
    x_proj = torch.randn(T, B, 4 * H)
    gates = x_proj.clone()
    hs, cs, tc = torch.empty(T + 1, B, H), torch.empty(T + 1, B, H), torch.empty(T, B, H)
    hs[0], cs[0] = torch.randn(B, H), torch.randn(B, H)
    assert cell.layer_forward(gates, hs, cs, tc, None, w_hh, None, None, False)
    for t in range(T):  # step t from the loop's own state
        a = x_proj[t] + hs[t].bfloat16().float() @ w16.t()
        c, tanh_c, h = torch.empty(B, H), torch.empty(B, H), torch.empty(B, H)
        ref.forward(a, cs[t], c, tanh_c, h)
        for got, want in ((gates[t], a), (cs[t + 1], c), (tc[t], tanh_c), (hs[t + 1], h)):
            assert rel_err(got, want) <= 1e-5

    dy = torch.randn(T, B, H)
    dh, dc, da = torch.zeros(B, H), torch.zeros(B, H), torch.empty(T, B, 4 * H)
    assert cell.layer_backward(gates, cs, tc, dy, dh, dc, da, None, w_hh, None, None, False)
    prep = ref.backward_prepare(gates, tc, H)
    dc_e = torch.zeros(B, H)
    for t in reversed(range(T)):
        dh_e = torch.zeros(B, H) if t == T - 1 else da[t + 1].bfloat16().float() @ w16
        d = torch.empty(B, 4 * H)
        ref.backward(gates[t], cs[t], tc[t], dh_e, dy[t], dc_e, d, (prep[0][t], prep[1][t]))
        assert rel_err(da[t], d) <= 1e-5
    assert rel_err(dh, da[0].bfloat16().float() @ w16) <= 1e-5
    assert rel_err(dc, dc_e) <= 1e-5


@needs_bf16
def test_autocast_bf16_without_the_c_loops_still_close_to_float32(monkeypatch):
    """Where the C time loops cannot run (here: made to refuse), the bf16 cell's steps go
    through the Python loop in float32 while its whole-sequence GEMMs stay bf16."""
    monkeypatch.setattr(cpu.CpuBf16Cell, "_loops_in_c", lambda self, w_hh, w_hr: False)
    torch.manual_seed(0)
    model = glasslstm.LSTM(5, 16, num_layers=2, backend="fused")
    x = torch.randn(7, 4, 5)
    runs = []
    for autocast in (False, True):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(xx)[0]
        y.pow(2).sum().backward()
        runs.append([y.detach(), xx.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 2e-2
    assert not torch.equal(runs[0][0], runs[1][0])


@needs_bf16
@pytest.mark.parametrize("hidden, batch", [(12, 37), (260, 6)])  # row-split / threaded GEMMs
def test_autocast_bf16_time_loops_stay_close_to_float32(hidden, batch, two_threads):
    """Under CPU bf16 autocast the fused loops multiply in bf16 (float32 sums, float32 state):
    outputs and gradients within bf16 rounding of the float32 run, ragged and both directions."""
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
    assert not torch.equal(runs[0][0], runs[1][0])  # the bf16 GEMMs did run


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


@pytest.mark.parametrize("backend", ["fused", "bptt"])
@pytest.mark.parametrize("bias", [True, False])
def test_many_rows_match_torch(backend, bias):
    """T*B >= 64 rows: the input projection takes the contiguous-U^T GEMM."""
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jit.trace, still in use
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_drop_in_step_stays_out_of_jit_traces(drop_in_path):
    """Under torch.jit.trace the one-token call runs the torch ops, so the trace has them."""
    lstm = glasslstm.LSTM(3, 4).eval()
    x, hx = torch.randn(1, 1, 3), (torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    with torch.no_grad():
        want = lstm(x, hx)
        traced = torch.jit.trace(lstm, (x, hx), check_trace=False)
        x2 = torch.randn(1, 1, 3)
        got, want2 = traced(x2, hx), lstm(x2, hx)
    assert rel_err(got[0], want2[0]) <= 1e-6 and not torch.equal(got[0], want[0])


def test_drop_in_step_follows_a_later_backend_change(monkeypatch, drop_in_path):
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(1, 1, 3)
    with torch.no_grad():
        want = lstm(x)[0]  # builds the module's C-step plan

        def no_c_step(*args):
            raise AssertionError("the C step ran although backend='bptt'")

        monkeypatch.setattr(lstm._drop_in.kernel, "_step", no_c_step)
        lstm.backend = "bptt"
        assert rel_err(lstm(x)[0], want) <= 1e-6  # the torch path, same numbers


def test_drop_in_step_runs_global_module_hooks(drop_in_path):
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(1, 1, 3)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(type(mod).__name__)
    )
    try:
        with torch.no_grad():
            lstm(x)
            lstm(x)
    finally:
        handle.remove()
    assert calls == ["LSTM", "LSTM"]
