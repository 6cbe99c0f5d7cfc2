"""glasslstm demo: build an LSTM and check it against the NumPy reference and torch.nn.LSTM."""

from __future__ import annotations

import numpy as np
import torch

from glasslstm import options, reference
from glasslstm.lstm import LSTM

TOLERANCE = 1e-10  # float64: agreement to round-off


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="check glasslstm.LSTM against the reference and torch.nn.LSTM",
        description="Build a 2-layer LSTM, run it forward and backward, and "
        "compare outputs, gates and gradients with the NumPy reference "
        "(hand-written BPTT) and with torch.nn.LSTM given the same weights.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    options.check_args(args, {"seed": options.SEED})
    torch.manual_seed(args.seed)
    T, B, I, H, L = 12, 3, 8, 16, 2
    ours = LSTM(I, H, num_layers=L, dtype=torch.float64)
    theirs = ours.to_torch()
    x = torch.randn(T, B, I, dtype=torch.float64)
    dy = torch.randn(T, B, H, dtype=torch.float64)
    print(
        f"glasslstm demo: LSTM(input_size={I}, hidden_size={H}, num_layers={L}), float64, "
        f"T={T}, B={B}"
    )

    results = {}
    for name, model in (("glasslstm", ours), ("torch.nn.LSTM", theirs)):
        xi = x.clone().requires_grad_(True)
        out = model(xi, return_gates=True) if model is ours else model(xi)
        (out[0] * dy).sum().backward()
        grads = {n: _grad(p).numpy().copy() for n, p in model.named_parameters()}
        results[name] = (out, _grad(xi).numpy(), grads)
    (y, _, trace), dx, grads = results["glasslstm"]
    (y_t, _), dx_t, grads_t = results["torch.nn.LSTM"]

    params = reference.params_from_torch(ours.state_dict(), num_layers=L)
    y_r, _, cache = reference.forward(x.numpy(), params)
    g_r = reference.backward(cache, dy.numpy())

    rows = [
        ("output   vs torch.nn.LSTM", _diff(y.detach().numpy(), y_t.detach().numpy())),
        ("grad x   vs torch.nn.LSTM", _diff(dx, dx_t)),
        ("weight grads vs torch.nn.LSTM", max(_diff(grads[n], grads_t[n]) for n in grads)),
        ("output   vs NumPy reference", _diff(y.detach().numpy(), y_r)),
        ("grad x   vs NumPy reference", _diff(dx, g_r.dx)),
        (
            "gates f,i,N,o,C vs reference",
            max(
                _diff(getattr(trace, ours_name)[k].numpy(), getattr(cache.layers[k], ref_name))
                for k in range(L)
                for ours_name, ref_name in zip("figoc", ("f", "i", "N", "o", "C"))
            ),
        ),
    ]
    ok = True
    for label, err in rows:
        good = err <= TOLERANCE
        ok &= good
        print(f"  {label:<32} max |diff| = {err:.1e}  {'ok' if good else 'MISMATCH'}")
    f = trace.f[L - 1]
    print(
        f"  top layer's forget gate over time: mean {float(f.mean()):.3f}, "
        f"saturated (<0.1 or >0.9) {float(((f < 0.1) | (f > 0.9)).double().mean()):.1%}"
    )
    print("demo: all checks passed" if ok else "demo: MISMATCH (see above)")
    return 0 if ok else 1


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None  # backward() just ran through t
    return t.grad
