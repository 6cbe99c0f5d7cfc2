"""The comparison models, glasslstm.GRU and glasslstm.RNN, against torch.nn.GRU / torch.nn.RNN."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import glasslstm

CLASSES = {"GRU": (glasslstm.GRU, torch.nn.GRU), "RNN": (glasslstm.RNN, torch.nn.RNN)}


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def outputs_and_grads(model, x, h0=None, **kw):
    x = x.clone().requires_grad_(True)
    h0 = None if h0 is None else h0.clone().requires_grad_(True)
    out, h_n = model(x, h0, **kw)[:2]
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        out = pad_packed_sequence(out)[0]
    gen = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + (h_n**2).sum()
    model.zero_grad()
    loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters()] + ([h0.grad] if h0 is not None else [])
    return [out, h_n] + grads


SHARED = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, batch_first=True),
    dict(bias=False),
]
CASES = [(k, c) for k in CLASSES for c in SHARED] + [("RNN", dict(nonlinearity="relu"))]


@pytest.mark.parametrize(
    "kind,cfg",
    CASES,
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()) or "plain",
)
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_torch(kind, cfg, with_h0):
    ours_cls, torch_cls = CLASSES[kind]
    theirs = torch_cls(3, 5, dtype=torch.float64, **cfg)
    ours = ours_cls.from_torch(theirs)
    T, B = 6, 4
    x = torch.randn((B, T, 3) if cfg.get("batch_first") else (T, B, 3), dtype=torch.float64)
    LD = theirs.num_layers * (2 if theirs.bidirectional else 1)
    h0 = torch.randn(LD, B, 5, dtype=torch.float64) if with_h0 else None
    for a, b in zip(outputs_and_grads(ours, x, h0), outputs_and_grads(theirs, x, h0)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_lengths_and_packing_match_torch(kind):
    ours_cls, torch_cls = CLASSES[kind]
    theirs = torch_cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = ours_cls.from_torch(theirs)
    lengths = torch.tensor([2, 5, 1, 5, 3])
    x = torch.randn(5, 5, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_t, h_t = theirs(packed)
    out_t = pad_packed_sequence(out_t, total_length=5)[0]
    out_o, h_o = ours(x, lengths=lengths)
    assert rel_err(out_o, out_t) <= 1e-12 and rel_err(h_o, h_t) <= 1e-12
    out_p, h_p = ours(packed)
    assert rel_err(pad_packed_sequence(out_p, total_length=5)[0], out_t) <= 1e-12


def test_gru_trace_is_consistent():
    gru = glasslstm.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, h_n, tr = gru(x, return_gates=True)
    assert set(tr.fields) == {"r", "z", "n", "h"} and tr.r.shape == (1, 5, 2, 4)
    h = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        h = (1 - tr.z[0, t]) * tr.n[0, t] + tr.z[0, t] * h
        assert rel_err(tr.h[0, t], h) <= 1e-14
    assert rel_err(h, h_n[0]) <= 1e-14


def test_rnn_trace_and_bad_input():
    rnn = glasslstm.RNN(3, 4, num_layers=2)
    out, h_n, tr = rnn(torch.randn(5, 2, 3), return_gates=True)
    assert tr.fields == ("h",) and torch.equal(tr.h[1], out.detach())
    with pytest.raises(AttributeError, match="records h"):
        _ = tr.f
    with pytest.raises(ValueError, match=r"h_0 has shape \(1, 2, 4\); expected \(2, 2, 4\)"):
        rnn(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="hx must be a tensor h_0"):
        rnn(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4),))
    with pytest.raises(ValueError, match="nonlinearity='sigmoid'"):
        glasslstm.RNN(3, 4, nonlinearity="sigmoid")


def test_same_seed_same_init_as_torch():
    for ours_cls, torch_cls in CLASSES.values():
        torch.manual_seed(4)
        a = torch_cls(3, 5, num_layers=2).state_dict()
        torch.manual_seed(4)
        b = ours_cls(3, 5, num_layers=2).state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [glasslstm.RNN, glasslstm.GRU])
def test_autograd_loop_reads_the_input_projection_with_one_unbind(cls):
    """Not T indexings of the (T, B, .) projection: autograd's backward of each x[t] writes a
    zero-filled gradient of the whole tensor, O(T^2) (a T = 1000 RNN ran 18x slower)."""
    y, _ = cls(3, 4)(torch.randn(50, 2, 3, requires_grad=True))
    seen, stack, names = set(), [y.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert names.count("UnbindBackward0") == 1
    assert not any(n.startswith(("SelectBackward", "SliceBackward")) for n in names)
