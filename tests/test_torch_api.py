"""glasslstm.LSTM under what PyTorch users do with a module, on the default backend (the C++
operator on the CPU): torch.compile with fullgraph=True, torch.export, torch.func.grad and
vmap, a saved torch.jit.trace, second derivatives, and torch.nn.LSTM's behaviour at the edges
(errors catchable as torch's, an empty batch, an empty sequence)."""

from __future__ import annotations

import pytest
import torch

import glasslstm
import glasslstm.ops
from glasslstm.errors import InputError

F64 = torch.float64


def _pair(dtype=torch.float32, **kw):
    """torch.nn.LSTM and glasslstm's copy of it (same weights)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(**kw).to(dtype)
    return glasslstm.LSTM.from_torch(ref), ref


def _grads(module, x, hx=None):
    x = x.detach().clone().requires_grad_(True)
    out, (h, c) = module(x, hx) if hx is not None else module(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h.pow(2).sum() + c.sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return out.detach(), grads


def test_the_default_cpu_path_is_the_operator():
    assert "torch.ops.glasslstm.lstm_layer" in glasslstm.ops.describe()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager_forward_and_backward(backend):
    lstm = glasslstm.LSTM(4, 8, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 4)
    compiled = torch.compile(lstm, fullgraph=True, backend=backend)  # a graph break raises
    out_c, grads_c = _grads(compiled, x)
    out_e, grads_e = _grads(lstm, x)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_sees_one_operator_per_layer_and_direction():
    lstm = glasslstm.LSTM(4, 8, num_layers=2)
    seen = []

    def count(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(lstm, fullgraph=True, backend=count)(torch.randn(5, 2, 4))
    op = torch.ops.glasslstm.lstm_layer
    assert sum(t is op or t is op.default for t in seen) == 2


def test_a_forward_and_backward_import_no_compiler(modules_after):
    """Using a layer pulls in no torch.compile machinery (torch._dynamo brings sympy and about
    130,000 Python objects: a slower start, and every full garbage collection of a training
    run walks them)."""
    code = (
        "import torch, glasslstm\n"
        "lstm = glasslstm.LSTM(4, 8, num_layers=2)\n"
        "assert 'lstm_layer' in glasslstm.ops.describe(), glasslstm.ops.describe()\n"
        "lstm(torch.randn(5, 2, 4, requires_grad=True))[0].sum().backward()\n"
        "with torch.no_grad():\n"
        "    lstm(torch.randn(1, 1, 4), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)))\n"
    )
    assert modules_after(code, ("torch._dynamo", "sympy"))[1] == []


def test_export_runs_and_matches_eager():
    lstm = glasslstm.LSTM(4, 8, num_layers=2, proj_size=3)
    x = torch.randn(5, 2, 4)
    ep = torch.export.export(lstm, (x,))
    assert any(n.target is torch.ops.glasslstm.lstm_layer.default for n in ep.graph.nodes)
    out, (h, c) = ep.module()(x)
    ref, (h_ref, c_ref) = lstm(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


def test_func_grad_equals_autograd():
    lstm, _ = _pair(F64, input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=F64)
    params = dict(lstm.named_parameters())

    def loss(p, x):
        out, (h, c) = torch.func.functional_call(lstm, p, (x,))
        return out.pow(2).sum() + c.sum()

    got = torch.func.grad(loss)(params, x)
    out, (h, c) = lstm(x)
    want = torch.autograd.grad(out.pow(2).sum() + c.sum(), list(params.values()))
    for name, w in zip(params, want):
        torch.testing.assert_close(got[name], w, atol=1e-12, rtol=1e-10)


def test_vmap_over_inputs_equals_a_loop():
    lstm, _ = _pair(F64, input_size=3, hidden_size=5)
    xs = torch.randn(4, 6, 2, 3, dtype=F64)  # 4 independent (T, B, I) inputs
    out = torch.func.vmap(lambda x: lstm(x)[0])(xs)
    loop = torch.stack([lstm(x)[0] for x in xs])
    torch.testing.assert_close(out, loop, atol=1e-12, rtol=1e-12)


def test_per_sample_gradients_with_vmap_of_grad():
    lstm, _ = _pair(F64, input_size=3, hidden_size=4)
    xs = torch.randn(3, 5, 1, 3, dtype=F64)
    params = {k: v.detach() for k, v in lstm.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(lstm, p, (x,))[0].pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        want = torch.autograd.grad(loss(dict(lstm.named_parameters()), x), list(lstm.parameters()))
        for name, w in zip(params, want):
            torch.testing.assert_close(per_sample[name][i], w, atol=1e-12, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated, still used
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_saved_jit_trace_loads_and_matches(tmp_path):
    lstm = glasslstm.LSTM(4, 6, num_layers=2)
    x = torch.randn(5, 2, 4)
    traced = torch.jit.trace(lstm, x)
    traced.save(str(tmp_path / "lstm.pt"))
    loaded = torch.jit.load(str(tmp_path / "lstm.pt"))
    out, (h, c) = loaded(torch.randn(5, 2, 4) * 0 + x)
    ref, (h_ref, c_ref) = lstm(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(c, c_ref)


@pytest.mark.parametrize("backend", ["auto", "bptt", "loop"])
def test_double_backward_equals_torch(backend):
    ours, ref = _pair(F64, input_size=3, hidden_size=4, num_layers=2)
    ours.backend = backend
    x = torch.randn(5, 2, 3, dtype=F64)
    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_(True)
        out = module(xi)[0]
        (g,) = torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)
        gg = torch.autograd.grad(g.pow(2).sum(), [xi, *module.parameters()])
        results.append((g.detach(), gg))
    (g_ours, gg_ours), (g_ref, gg_ref) = results
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(gg_ours, gg_ref):
        assert a.abs().max() > 0  # not the zeros a non-differentiable backward would give
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.slow
def test_gradgradcheck_on_the_default_backend():
    lstm, _ = _pair(F64, input_size=2, hidden_size=3)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    c0 = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)

    def f(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(
            lstm, dict(zip([n for n, _ in lstm.named_parameters()], weights)), (x, (h0, c0))
        )
        return out, h, c

    weights = [p.detach().clone().requires_grad_(True) for p in lstm.parameters()]
    assert torch.autograd.gradgradcheck(f, (x, h0, c0, *weights))


# ---- torch.nn.LSTM's behaviour at the edges --------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m(torch.randn(5, 2, 7)),  # feature size
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))),  # h_0
        lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4))),  # c_0
        lambda m: m(torch.randn(0, 2, 3)),  # no time steps
    ],
)
def test_shape_errors_are_runtime_errors_like_torchs(call):
    ours, ref = _pair(input_size=3, hidden_size=4, num_layers=2)
    with pytest.raises(RuntimeError):
        call(ref)
    with pytest.raises(RuntimeError) as e:  # catchable as torch's are
        call(ours)
    assert isinstance(e.value, InputError) and "\n" not in str(e.value)


def test_rank_and_dtype_errors_are_value_errors_like_torchs():
    ours, ref = _pair(input_size=3, hidden_size=4)
    for call in (
        lambda m: m(torch.randn(5, 2, 3, 1)),
        lambda m: m(torch.randn(5, 2, 3, dtype=F64)),
    ):
        with pytest.raises(ValueError):
            call(ref)
        with pytest.raises(ValueError):
            call(ours)


@pytest.mark.parametrize("backend", ["auto", "bptt", "loop"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_an_empty_batch_gives_empty_outputs_and_backward_runs(backend, batch_first):
    ours, ref = _pair(input_size=3, hidden_size=4, num_layers=2, batch_first=batch_first)
    ours.backend = backend
    shape = (0, 5, 3) if batch_first else (5, 0, 3)
    for module in (ref, ours):
        x = torch.randn(*shape, requires_grad=True)
        out, (h, c) = module(x)
        assert out.shape == ((0, 5, 4) if batch_first else (5, 0, 4))
        assert h.shape == c.shape == (2, 0, 4)
        (out.sum() + h.sum()).backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in module.parameters())
