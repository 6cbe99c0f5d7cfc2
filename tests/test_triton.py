"""The fused CUDA path (glasslstm.ops.triton_cell), CUDA graphs (glasslstm.ops.graphs), autocast.

Without a GPU the Triton kernels run in Triton's CPU interpreter: a second copy of the module is
loaded with ``TRITON_INTERPRET=1`` set while its ``@triton.jit`` decorators run (they decide
there), so the interpreted kernels take CPU tensors while the ordinary import stays compiled for
the GPU tests. The same kernels are also compiled for an sm_90 target (no GPU needed) to check
that the GPU build goes through. Tests marked ``gpu`` run the compiled kernels on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import glasslstm
import glasslstm.ops
from glasslstm.ops import graphs
from glasslstm.ops.bptt import lstm_layer_bptt
from glasslstm.ops.cells import TORCH_CELL

CELL_SOURCE = Path(glasslstm.ops.__file__).with_name("triton_cell.py")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| scaled by the size of b (absolute for |b| <= 1)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _load_cell_module(name: str, interpret: bool):
    """A fresh copy of triton_cell.py as module ``name``, its kernels interpreted or compiled."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(name, CELL_SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


@pytest.fixture(scope="module")
def interp():
    """triton_cell with its kernels in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    module = _load_cell_module("_glasslstm_triton_cell_interpreted", interpret=True)
    assert module.INTERPRETED
    return module


@pytest.fixture(scope="module")
def compiled():
    """triton_cell with compiled (GPU) kernels."""
    pytest.importorskip("triton")
    module = _load_cell_module("_glasslstm_triton_cell_compiled", interpret=False)
    assert not module.INTERPRETED
    return module


# ---------------------------------------------------------------- random cell problems


def strided(n: int, width: int, dtype, device="cpu", pad: int = 3, scale: float = 1.0):
    """(n, width) random values in a wider buffer: row stride width + pad, unit column stride."""
    buf = torch.randn(n, width + pad, dtype=torch.float64) * scale
    return buf.to(device=device, dtype=dtype)[:, pad // 2 : pad // 2 + width]


SMALL = [1e-9, -3e-5, 0.02, -0.05, 0.5]  # tanh's odd series, and just past its threshold


def forward_problem(n, H, dtype, device="cpu"):
    """Pre-activations (saturating, tiny and zero entries in row 0, small candidates a_g in
    row 1) and c_prev, each in a buffer with a row stride != H."""
    a = strided(n, 4 * H, dtype, device, pad=5, scale=3.0)
    a[0, : min(4 * H, 8)] = torch.tensor(
        [40.0, -40.0, 1e-9, -1e-9, 0.0, 0.02, -0.05, 19.0], dtype=dtype
    )[: min(4 * H, 8)]
    k = min(H, len(SMALL))
    a[1, 2 * H : 2 * H + k] = torch.tensor(SMALL[:k], dtype=dtype)
    c_prev = strided(n, H, dtype, device, pad=7, scale=2.0)
    return a, c_prev


def out_buffers(n, H, dtype, device="cpu"):
    cs = torch.full((2, n, H + 4), float("nan"), dtype=dtype, device=device)  # c and tc share
    out = torch.full((n, H + 9), float("nan"), dtype=dtype, device=device)[:, 2 : 2 + H]
    return cs[0, :, :H], cs[1, :, :H], out


def run_forward(cell, a, c_prev):
    n, H = c_prev.shape
    a = a.clone()
    c, tc, out = out_buffers(n, H, a.dtype, a.device)
    cell.forward(a, c_prev, c, tc, out)
    return a, c, tc, out


def backward_problem(n, H, dtype, device="cpu", with_dy=True):
    """Activated gates (from TorchCell), c_prev, tanh(c), and the incoming gradients."""
    a, c_prev = forward_problem(n, H, dtype, device)
    gates, _, tc, _ = run_forward(TORCH_CELL, a, c_prev)
    dh = strided(n, H, dtype, device, pad=2)
    dy = strided(n, H, dtype, device, pad=11) if with_dy else None
    dc = strided(n, H, dtype, device, pad=4)
    return gates, c_prev, tc, dh, dy, dc


def run_backward(cell, gates, c_prev, tc, dh, dy, dc):
    n, H = dc.shape
    dh, dc = dh.clone(), dc.clone()
    d = torch.full((n, 4 * H + 5), float("nan"), dtype=gates.dtype, device=gates.device)
    d = d[:, 1 : 1 + 4 * H]
    prep = cell.backward_prepare(gates, tc, H)
    cell.backward(gates, c_prev, tc, dh, dy, dc, d, prep)
    return d, dc, dh


# ---------------------------------------------------------------- the cell, interpreted


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n,H", [(3, 5), (2, 300)], ids=["one-block", "three-blocks"])
def test_forward_matches_torch_cell(interp, dtype, n, H):
    a, c_prev = forward_problem(n, H, dtype)
    c_prev_before = c_prev.clone()
    ours = run_forward(interp.TritonCell(dtype), a, c_prev)
    ref = run_forward(TORCH_CELL, a, c_prev)
    for name, x, y in zip(("gates", "c", "tc", "out"), ours, ref):
        assert x.dtype == dtype and not x.isnan().any(), name
        assert rel_err(x, y) <= TOL[dtype], f"{name}: {rel_err(x, y):.3g}"
    assert torch.equal(c_prev, c_prev_before)
    # saturated pre-activations reach their limits; near 0 tanh keeps its relative precision
    assert ours[0][0, 0].item() == pytest.approx(1.0, abs=1e-15)
    assert ours[0][0, 1].item() == pytest.approx(0.0, abs=1e-15)
    k = min(H, len(SMALL))
    g, exact = ours[0][1, 2 * H : 2 * H + k].double(), a[1, 2 * H : 2 * H + k].double().tanh()
    assert ((g - exact) / exact).abs().max() <= 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_dy", [True, False], ids=["dy", "no_dy"])
@pytest.mark.parametrize("n,H", [(3, 5), (2, 300)], ids=["one-block", "three-blocks"])
def test_backward_matches_torch_cell(interp, dtype, with_dy, n, H):
    problem = backward_problem(n, H, dtype, with_dy=with_dy)
    ours = run_backward(interp.TritonCell(dtype), *problem)
    ref = run_backward(TORCH_CELL, *problem)
    for name, x, y in zip(("d", "dc", "dh"), ours, ref):
        assert not x.isnan().any(), name
        assert rel_err(x, y) <= TOL[dtype], f"{name}: {rel_err(x, y):.3g}"
    dh_in, dy = problem[3], problem[4]
    if dy is None:
        assert torch.equal(ours[2], dh_in)  # dh untouched without dy
    else:
        assert rel_err(ours[2], dh_in + dy) <= TOL[dtype]  # dy added into dh, in place


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_cell_computes_in_float32(interp, dtype):
    """bf16/fp16 in and out, float32 inside: within one rounding of the exact result."""
    n, H = 3, 20
    a, c_prev = forward_problem(n, H, dtype)
    ours = run_forward(interp.TritonCell(dtype), a, c_prev)
    exact = run_forward(TORCH_CELL, a.double(), c_prev.double())
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for name, x, y in zip(("gates", "c", "tc", "out"), ours, exact):
        assert x.dtype == dtype
        assert rel_err(x, y) <= 2 * ulp, f"{name}: {rel_err(x, y):.3g}"
    problem = backward_problem(n, H, dtype)
    ours = run_backward(interp.TritonCell(dtype), *problem)
    exact = run_backward(TORCH_CELL, *(t.double() for t in problem))
    for name, x, y in zip(("d", "dc", "dh"), ours, exact):
        assert rel_err(x, y) <= 4 * ulp, f"{name}: {rel_err(x, y):.3g}"


def test_nan_propagates_and_empty_is_a_no_op(interp):
    cell = interp.TritonCell(torch.float32)
    a, c_prev = forward_problem(2, 4, torch.float32)
    a[1, 4] = float("nan")  # f of row 1, column 0
    _, c, _, out = run_forward(cell, a, c_prev)
    assert c[1, 0].isnan() and out[1, 0].isnan() and not c[0].isnan().any()
    empty = torch.empty(0, 16)
    cell.forward(empty, empty[:, :4], empty[:, :4], empty[:, :4], empty[:, :4])
    cell.backward(empty, empty[:, :4], empty[:, :4], empty[:, :4], None, empty[:, :4], empty, None)


def test_cell_factory_and_launch_shape(interp):
    cell, why = interp.cell(torch.float64)
    assert isinstance(cell, interp.TritonCell) and why == "on" and cell.name == "triton"
    assert cell.backward_prepare(None, None, 4) is None
    none, why = interp.cell(torch.int32)
    assert none is None and "float32/float64" in why
    with pytest.raises(ValueError, match="dtype"):
        interp.TritonCell(torch.int64)
    for n, H in [(1, 1), (1, 37), (64, 512), (256, 1024), (4, 4096), (1000, 100)]:
        block, warps = interp.launch_shape(n, H)
        assert block & (block - 1) == 0 and 16 <= block <= 512
        assert warps == max(1, block // 128)
    assert interp.launch_shape(256, 1024) == (512, 4)  # plenty of rows: wide blocks
    assert interp.launch_shape(2, 1024) == (128, 1)  # few rows: more, narrower programs


def test_cell_checks_layout_and_dtype(interp):
    cell = interp.TritonCell(torch.float32)
    a, c_prev = forward_problem(2, 4, torch.float32)
    c, tc, out = out_buffers(2, 4, torch.float32)
    with pytest.raises(ValueError, match="unit column stride"):
        cell.forward(a, c_prev, c, tc, torch.empty(4, 2).t())  # out: column stride 2
    with pytest.raises(ValueError, match="float32 got a torch.float64"):
        cell.forward(a, c_prev.double(), c, tc, out)


# ---------------------------------------------------------------- whole layers, interpreted


def _layer_vs_torch(cell, dtype, *, reverse=False, proj=0, lengths=None, device="cpu"):
    """The Python loop (:func:`lstm_layer_bptt`) with ``cell`` against torch.nn.LSTM (the same
    direction's weights): outputs and the gradients of x, h0, c0 and every weight. Returns the
    worst error."""
    T, B, I, H = 7, 4, 3, 5
    P = proj or H
    ref = torch.nn.LSTM(I, H, proj_size=proj, bidirectional=reverse, dtype=dtype).to(device)
    k = 1 if reverse else 0
    sfx = "_l0_reverse" if reverse else "_l0"
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] + (["weight_hr"] if proj else [])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=gen, dtype=dtype).to(device)
    h0 = torch.randn(1 + k, B, P, generator=gen, dtype=dtype).to(device)
    c0 = torch.randn(1 + k, B, H, generator=gen, dtype=dtype).to(device)
    wy = torch.randn(T, B, P, generator=gen, dtype=dtype).to(device)
    wh = torch.randn(B, P, generator=gen, dtype=dtype).to(device)
    wc = torch.randn(B, H, generator=gen, dtype=dtype).to(device)
    batch_sizes = None
    if lengths is not None:  # sorted longest first, as LSTM hands them to the function
        batch_sizes = [sum(1 for n in lengths if n > t) for t in range(T)]
        pad = torch.arange(T)[:, None] >= torch.tensor(lengths)[None, :]
        x = x.masked_fill(pad.to(device).unsqueeze(-1), 0.0)
        wy = wy.masked_fill(pad.to(device).unsqueeze(-1), 0.0)

    # ours
    xs = x.clone().requires_grad_(True)
    h, c = h0[k].clone().requires_grad_(True), c0[k].clone().requires_grad_(True)
    ws = [getattr(ref, n + sfx).detach().clone().requires_grad_(True) for n in names]
    w_hr = ws[4] if proj else None
    y, h_n, c_n = lstm_layer_bptt(xs, h, c, (*ws[:4], w_hr), batch_sizes, reverse, False, cell)
    ((y * wy).sum() + (h_n * wh).sum() + (c_n * wc).sum()).backward()
    ours = [y, h_n, c_n, xs.grad, h.grad, c.grad] + [w.grad for w in ws]

    # torch (cuDNN on CUDA, without TF32)
    xr = x.clone().requires_grad_(True)
    hx = (h0.clone().requires_grad_(True), c0.clone().requires_grad_(True))
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        if lengths is None:
            out, (hr, cr) = ref(xr, hx)
        else:
            packed, (hr, cr) = ref(pack_padded_sequence(xr, lengths), hx)
            out, _ = pad_packed_sequence(packed, total_length=T)
        out = out[..., k * P :]
        ((out * wy).sum() + (hr[k] * wh).sum() + (cr[k] * wc).sum()).backward()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    theirs = [out, hr[k], cr[k], xr.grad, hx[0].grad[k], hx[1].grad[k]]
    theirs += [getattr(ref, n + sfx).grad for n in names]
    labels = ["y", "h_n", "c_n", "dx", "dh0", "dc0"] + ["d" + n for n in names]
    errs = {name: rel_err(a, b) for name, a, b in zip(labels, ours, theirs)}
    return max(errs.values()), errs


VARIANTS = {
    "plain": {},
    "reverse-proj": dict(reverse=True, proj=3),
    "ragged": dict(lengths=[7, 5, 5, 2]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_function_with_triton_cell_matches_torch(interp, dtype, variant):
    worst, errs = _layer_vs_torch(interp.TritonCell(dtype), dtype, **VARIANTS[variant])
    assert worst <= {torch.float64: 1e-10, torch.float32: 1e-5}[dtype], errs


@pytest.mark.slow
def test_whole_lstm_with_triton_cell_matches_torch(interp, monkeypatch):
    """glasslstm.LSTM (2 layers, bidirectional, projection, lengths=) with the dispatcher
    handing every layer the interpreted Triton cell, against torch.nn.LSTM on packed input."""
    cell = interp.TritonCell(torch.float64)
    used = []

    def cell_for(backend, x, bf16=False):
        used.append(x.shape)
        return cell

    monkeypatch.setattr(glasslstm.ops, "cell_for", cell_for)
    monkeypatch.setattr(glasslstm.ops, "uses_operator", lambda backend, x: False)  # as on CUDA
    ref = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    lengths = torch.tensor([3, 6, 1, 6])
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    w = torch.randn(6, 4, 4, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, (h_n, c_n), trace = ours(xa, lengths=lengths, return_gates=True)
    ((out * w).sum() + h_n.sum() + (c_n**2).sum()).backward()
    packed, (rh, rc) = ref(pack_padded_sequence(xb, lengths, enforce_sorted=False))
    rout, _ = pad_packed_sequence(packed, total_length=6)
    ((rout * w).sum() + rh.sum() + (rc**2).sum()).backward()
    assert len(used) == 4  # 2 layers x 2 directions
    for a, b in [(out, rout), (h_n, rh), (c_n, rc), (xa.grad, xb.grad)]:
        assert rel_err(a, b) <= 1e-10
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-10, name
    assert trace.c.dtype == torch.float64 and torch.equal(trace.c[2, 5, 1], c_n[2, 1])


# ---------------------------------------------------------------- the GPU build, without a GPU


@pytest.mark.slow
def test_kernels_compile_for_sm90(compiled):
    """Both kernels, every dtype, through Triton's whole CUDA pipeline (PTX and cubin, with the
    ptxas Triton ships) for an H100 target; float64 math must stay float64."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend")
    target = GPUTarget("cuda", 90, 32)
    for ty in ("fp32", "fp64", "bf16", "fp16"):
        for kernel, extra in [
            (compiled._cell_forward, {}),
            (compiled._cell_backward, {"HAS_DY": True}),
            (compiled._cell_backward, {"HAS_DY": False}),
        ]:
            consts = {"F64": ty == "fp64", "BLOCK": 512, **extra}
            sig = {
                n: "constexpr" if n in consts else ("*" + ty if n.endswith("_ptr") else "i32")
                for n in kernel.arg_names
            }
            k = compile(ASTSource(kernel, sig, consts), target=target, options={"num_warps": 4})
            ptx = k.asm["ptx"]
            assert len(k.asm["cubin"]) > 0
            if kernel is compiled._cell_forward:  # float32's exp is ex2.approx; float64's not
                assert ("ex2.approx.f32" in ptx) == (ty != "fp64"), ty
            assert ("fma.rn.f64" in ptx) == (ty == "fp64"), (ty, kernel)


# ---------------------------------------------------------------- import and dispatch


def test_missing_triton_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" raises ImportError
    with pytest.raises(ImportError, match="triton is not usable"):
        _load_cell_module("_glasslstm_triton_cell_without_triton", interpret=False)
    monkeypatch.setitem(sys.modules, "glasslstm.ops.triton_cell", None)
    monkeypatch.delattr(glasslstm.ops, "triton_cell", raising=False)  # imported earlier on GPUs
    x = torch.empty(0)
    assert glasslstm.ops._triton_cell(x, forced=False) is None
    with pytest.raises(ValueError, match="needs triton"):
        glasslstm.ops._triton_cell(x, forced=True)


def test_cell_reports_why_not_without_cuda(compiled):
    if torch.cuda.is_available():
        pytest.skip("there is a CUDA device")
    cell, why = compiled.cell(torch.float32)
    assert cell is None and why == "no CUDA device"


# ---------------------------------------------------------------- autocast (CPU)


def _fwd_bwd(model, x, autocast: str | None = None, backward_inside: bool = False):
    xg = x.clone().requires_grad_(True)
    model.zero_grad()
    if autocast is None:
        out, (h, c), trace = model(xg, return_gates=True)
        (out.sum() + h.sum() + (c * c).sum()).backward()
    else:
        with torch.autocast(autocast, dtype=torch.bfloat16):
            out, (h, c), trace = model(xg, return_gates=True)
            loss = out.sum() + h.sum() + (c * c).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    return [out, h, c, trace.f, trace.c, xg.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "backend,backward_inside",
    [
        ("fused", False),
        ("fused", True),
        ("bptt", False),
        ("bptt", True),
        # The loop's backward is autograd's own ops, which autocast would lower inside the region
        # (torch advises backward outside it); the hand-written backward guards itself.
        ("loop", False),
    ],
    ids=["fused-bwd-outside", "fused-bwd-inside", "bptt-bwd-outside", "bptt-bwd-inside", "loop"],
)
def test_autocast_cpu_keeps_the_lstm_state_in_float32(backend, backward_inside, monkeypatch):
    """Under torch.autocast("cpu", bfloat16) the LSTM's results are float32 (state and gate
    math in float32; before, the fused path read bf16 gates as float32). bptt and loop compute
    exactly their float32 results; the fused path's matrix products take bf16 operands
    (float32 accumulation; forced on here: by default only where they pay): close to float32,
    not equal."""
    monkeypatch.setenv("GLASSLSTM_BF16", "1")
    model = glasslstm.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3, backend=backend)
    x = torch.randn(5, 3, 6)
    plain = _fwd_bwd(model, x)
    cast = _fwd_bwd(model, x, "cpu", backward_inside)
    bf16_gemms = backend == "fused"
    for a, b in zip(cast, plain):
        assert a.dtype == torch.float32
        if bf16_gemms:
            assert ((a - b).abs().max() / b.abs().max()).item() <= 3e-2
        else:
            assert torch.equal(a, b)
    if bf16_gemms:
        assert not torch.equal(cast[0], plain[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast still acts around the LSTM
        assert torch.nn.Linear(3, 2)(model(x)[0][..., :3]).dtype == torch.bfloat16


def test_autocast_keeps_float64_models_in_float64():
    model = glasslstm.LSTM(2, 3, dtype=torch.float64, backend="bptt")
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)[0]
    assert out.dtype == torch.float64 and torch.equal(out, model(x)[0])


# ---------------------------------------------------------------- CUDA graphs (CPU checks)


def test_graphed_rejects_what_it_cannot_capture():
    lstm = glasslstm.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(
        ValueError, match="CUDA graphs need the module and sample_args on one CUDA device"
    ):
        graphs.graphed(lstm, (x,))
    packed = pack_padded_sequence(x, [5, 3])
    with pytest.raises(ValueError, match="ragged input .* is not graphable"):
        graphs.graphed(lstm, (packed,))
    with pytest.raises(TypeError, match="tuple"):
        graphs.graphed(lstm, x)
    with pytest.raises(TypeError, match="tensors only"):
        graphs.graphed(lstm, (x, 3))


# ---------------------------------------------------------------- on a GPU

cuda = pytest.mark.gpu


@cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"]
)
@pytest.mark.parametrize("n,H", [(3, 5), (64, 512), (2, 1000)])
def test_gpu_cell_matches_torch_cell(dtype, n, H):
    pytest.importorskip("triton")
    from glasslstm.ops import triton_cell

    cell, why = triton_cell.cell(dtype)
    assert cell is not None, why
    if dtype == torch.bfloat16:  # against the exact result of the same rounded inputs
        tol_f, tol_b = 2 * 2**-8, 4 * 2**-8
        ref_f = lambda a, cp: run_forward(TORCH_CELL, a.double(), cp.double())  # noqa: E731
        ref_b = lambda *p: run_backward(  # noqa: E731
            TORCH_CELL, *(None if t is None else t.double() for t in p)
        )
    else:
        tol_f = tol_b = {torch.float64: 1e-12, torch.float32: 4e-6}[dtype]
        ref_f = lambda a, cp: run_forward(TORCH_CELL, a, cp)  # noqa: E731
        ref_b = lambda *p: run_backward(TORCH_CELL, *p)  # noqa: E731
    a, c_prev = forward_problem(n, H, dtype, "cuda")
    for x, y in zip(run_forward(cell, a, c_prev), ref_f(a, c_prev)):
        assert x.is_cuda and rel_err(x, y) <= tol_f
    for with_dy in (True, False):
        problem = backward_problem(n, H, dtype, "cuda", with_dy)
        for x, y in zip(run_backward(cell, *problem), ref_b(*problem)):
            assert rel_err(x, y) <= tol_b


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_layer_function_matches_cudnn(dtype, variant):
    pytest.importorskip("triton")
    from glasslstm.ops import triton_cell

    cell, why = triton_cell.cell(dtype)
    assert cell is not None, why
    worst, errs = _layer_vs_torch(cell, dtype, device="cuda", **VARIANTS[variant])
    assert worst <= {torch.float64: 1e-10, torch.float32: 1e-5}[dtype], errs


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "cfg",
    [dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=3, batch_first=True)],
    ids=["bi", "proj"],
)
def test_gpu_fused_lstm_matches_cudnn(dtype, cfg):
    """glasslstm.LSTM(backend="fused") on CUDA (the Triton cell) against cuDNN without TF32."""
    pytest.importorskip("triton")
    assert glasslstm.ops.describe("fused", "cuda", dtype) == "fused -> triton cell"
    ref = torch.nn.LSTM(8, 16, dtype=dtype, device="cuda", **cfg)
    ours = glasslstm.LSTM.from_torch(ref, backend="fused")
    x = torch.randn(9, 4, 8, dtype=dtype, device="cuda")
    results = []
    for model in (ours, ref):
        xg = x.clone().requires_grad_(True)
        tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        try:
            out, (h, c) = model(xg)[:2]
            (out.sum() + (h * h).sum() + (c * 0.5).sum()).backward()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        results.append([out, h, c, xg.grad] + [p.grad for p in model.parameters()])
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    for a, b in zip(*results):
        assert rel_err(a, b) <= tol


@cuda
def test_gpu_dispatch(monkeypatch):
    pytest.importorskip("triton")
    x = torch.empty(1, device="cuda")
    assert glasslstm.ops.cell_for("fused", x).name == "triton"
    monkeypatch.delenv("GLASSLSTM_TRITON", raising=False)
    assert glasslstm.ops.cell_for("auto", x).name == "triton"
    monkeypatch.setenv("GLASSLSTM_TRITON", "0")
    assert glasslstm.ops.cell_for("auto", x).name == "torch"
    assert glasslstm.ops.cell_for("fused", x).name == "triton"  # forced wins
    with pytest.raises(ValueError, match="cannot run here"):
        glasslstm.ops.cell_for("fused", x.to(torch.int32))


@cuda
@pytest.mark.parametrize("backend", ["fused", "bptt"])
def test_gpu_autocast_runs_the_lstm_in_float32(backend):
    if backend == "fused":
        pytest.importorskip("triton")
    model = glasslstm.LSTM(16, 32, num_layers=2, bidirectional=True, backend=backend).cuda()
    x = torch.randn(7, 4, 16, device="cuda")
    plain = _fwd_bwd(model, x)
    cast = _fwd_bwd(model, x, "cuda")
    for a, b in zip(cast, plain):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-6
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.nn.Linear(64, 2).cuda()(model(x)[0]).dtype == torch.bfloat16


def _eager_step(model, x, hx, return_gates):
    xg = x.clone().requires_grad_(True)
    model.zero_grad()
    res = model(xg, hx, return_gates=return_gates)
    out, (h, c) = res[:2]
    (out * out).sum().backward()
    return res, xg.grad, [p.grad.clone() for p in model.parameters()]


@cuda
@pytest.mark.parametrize("backend", ["fused", "bptt"])
@pytest.mark.parametrize("return_gates", [False, True], ids=["plain", "gates"])
def test_gpu_graphed_matches_eager(backend, return_gates):
    if backend == "fused":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = glasslstm.LSTM(8, 16, num_layers=2, bidirectional=True, backend=backend).cuda()
    T, B = 12, 5
    sample = torch.randn(T, B, 8, device="cuda", requires_grad=True)
    hx = (torch.randn(4, B, 16, device="cuda"), torch.randn(4, B, 16, device="cuda"))
    step = graphs.graphed(model, (sample, hx), return_gates=return_gates)
    ours, theirs = list(step.parameters()), list(model.parameters())
    assert len(ours) == len(theirs) and all(p is q for p, q in zip(ours, theirs))
    for _ in range(2):  # new values each call
        x = torch.randn(T, B, 8, device="cuda")
        ref, ref_dx, ref_grads = _eager_step(model, x, hx, return_gates)
        xg = x.clone().requires_grad_(True)
        model.zero_grad()
        res = step(xg, hx)
        (res[0] * res[0]).sum().backward()
        assert rel_err(res[0], ref[0]) <= 1e-6
        assert rel_err(res[1][0], ref[1][0]) <= 1e-6 and rel_err(res[1][1], ref[1][1]) <= 1e-6
        assert rel_err(xg.grad, ref_dx) <= 1e-6
        for p, g in zip(model.parameters(), ref_grads):
            assert rel_err(p.grad, g) <= 1e-6
        if return_gates:
            assert res[2].fields == ref[2].fields
            for name in ref[2].fields:
                assert not res[2][name].requires_grad
                assert rel_err(res[2][name], ref[2][name]) <= 1e-6
    with pytest.raises(ValueError, match="graphed for"):
        step(torch.randn(T + 1, B, 8, device="cuda", requires_grad=True), hx)
    with pytest.raises(TypeError, match="not graphable"):
        step(xg, hx, lengths=[T] * B)


@cuda
def test_gpu_graph_capture_failure_names_the_cause():
    class Syncs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, device="cuda"))

        def forward(self, x):
            return x * self.w * float((x * self.w).sum().item() > 0)

    with pytest.raises(RuntimeError, match="no .item"):
        graphs.graphed(Syncs(), (torch.randn(3, device="cuda", requires_grad=True),))
