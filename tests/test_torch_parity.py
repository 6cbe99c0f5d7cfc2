"""What PyTorch's own CPU tests of torch.nn.LSTM / GRU / RNN check, checked on glasslstm's.

Each behaviour that torch's test suite asserts of its recurrent modules (test/test_nn.py, the
module database behind test/test_modules.py, test/nn/test_pruning.py) is asserted here twice,
on torch's module first and then on ours, with the same weights: so a check that torch itself
would fail cannot pass unnoticed, and ours is held to torch's behaviour, not to our idea of it.
The LSTM runs on the default backend (the C++ operator) and on ``bptt``; GRU and RNN have one.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import rnn as rnn_utils

import glasslstm
from glasslstm.errors import InputError

F64 = torch.float64
CLASSES = {
    "LSTM": (nn.LSTM, glasslstm.LSTM),
    "GRU": (nn.GRU, glasslstm.GRU),
    "RNN": (nn.RNN, glasslstm.RNN),
}
# every kind, and the LSTM on both of its CPU paths
RUNS = [("LSTM", "auto"), ("LSTM", "bptt"), ("GRU", None), ("RNN", None)]
RUN_IDS = ["LSTM-auto", "LSTM-bptt", "GRU", "RNN"]


def pair(kind="LSTM", backend=None, dtype=F64, **kw):
    """torch's module (seeded) and glasslstm's copy of it: ``[theirs, ours]``, theirs first."""
    torch.manual_seed(0)
    theirs = CLASSES[kind][0](**kw).to(dtype)
    extra = {"backend": backend} if backend else {}
    return [theirs, CLASSES[kind][1].from_torch(theirs, **extra)]


def states(module, batch: int | None, dtype=F64, fill=None):
    """A random initial state for ``module`` (``(h_0, c_0)`` for an LSTM), ``batch`` None for
    an unbatched call."""
    LD = module.num_layers * (2 if module.bidirectional else 1)
    lead = (LD,) if batch is None else (LD, batch)
    proj = getattr(module, "proj_size", 0)

    def make(size):
        return (
            torch.randn(*lead, size, dtype=dtype)
            if fill is None
            else torch.full((*lead, size), fill, dtype=dtype)
        )

    if isinstance(module, (nn.LSTM, glasslstm.LSTM)):
        return (make(proj or module.hidden_size), make(module.hidden_size))
    return make(module.hidden_size)


def h_of(hidden):
    """h_n of an LSTM's ``(h_n, c_n)`` or of a GRU/RNN's ``h_n``."""
    return hidden[0] if isinstance(hidden, tuple) else hidden


def flat(result):
    """A forward's results as a flat list of tensors (packed output: its data)."""
    out, hidden = result
    out = out.data if isinstance(out, rnn_utils.PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def one_line_runtime_error(exc_info):
    assert isinstance(exc_info.value, InputError) and "\n" not in str(exc_info.value)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a twice-as-long last dimension."""
    return torch.stack([torch.zeros_like(t), t], -1).select(-1, 1)


# ---- constructor arguments -----------------------------------------------------------------

CONSTRUCTOR_ERRORS = [
    ((10, 0, 1), {}, ValueError),  # hidden_size
    ((10, 10, 0), {}, ValueError),  # num_layers
    ((0, 5), {}, ValueError),  # input_size
    ((-1, 5), {}, ValueError),
    ((3.0, 5), {}, TypeError),
    (("10", 5), {}, TypeError),
    ((3, 5.0), {}, TypeError),
    ((3, 5, 2.0), {}, TypeError),
    ((3, 5), {"bias": 0}, TypeError),
    ((3, 5), {"bias": 1}, TypeError),
    ((3, 5), {"bias": "True"}, TypeError),
    ((3, 5), {"batch_first": 0}, TypeError),
    ((3, 5), {"batch_first": 1}, TypeError),
    ((3, 5), {"batch_first": "False"}, TypeError),
    ((3, 5, 2), {"dropout": -0.1}, ValueError),
    ((3, 5, 2), {"dropout": 1.1}, ValueError),
    ((3, 5, 2), {"dropout": True}, ValueError),
    ((3, 5, 2), {"dropout": "0.5"}, ValueError),
]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize(
    "args,kwargs,exc", CONSTRUCTOR_ERRORS, ids=[f"{a}{k or ''}" for a, k, _ in CONSTRUCTOR_ERRORS]
)
def test_bad_constructor_arguments_raise_torchs_error_kinds(kind, args, kwargs, exc):
    for cls in CLASSES[kind]:
        with pytest.raises(exc) as e:
            cls(*args, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("LSTM", {"proj_size": 5}),  # not smaller than hidden_size
        ("LSTM", {"proj_size": -1}),
        ("GRU", {"proj_size": 2}),  # a projection is LSTM's only
        ("RNN", {"proj_size": 2}),
        ("RNN", {"nonlinearity": "garbage"}),
    ],
)
def test_projection_and_nonlinearity_errors(kind, kwargs):
    for cls in CLASSES[kind]:
        with pytest.raises(ValueError):
            cls(3, 5, 2, **kwargs)


def test_rnn_nonlinearity_by_keyword_and_by_position():
    for cls in CLASSES["RNN"]:
        assert cls(1, 10).nonlinearity == "tanh"
        assert cls(1, 10, nonlinearity="relu").nonlinearity == "relu"
        assert cls(2, 3, 1, "relu").nonlinearity == "relu"  # 4th positional argument


def test_lstm_signature_is_torchs_then_keyword_only_extras():
    # nn.LSTM.__init__ takes (*args, **kwargs) and passes them on after its mode
    theirs = dict(inspect.signature(nn.RNNBase.__init__).parameters)
    del theirs["mode"]
    ours = inspect.signature(glasslstm.LSTM.__init__).parameters
    shared = [p for p in ours.values() if p.name in theirs]
    assert [p.name for p in shared] == list(theirs)
    for p in shared:
        assert (p.kind, p.default) == (theirs[p.name].kind, theirs[p.name].default), p.name
    assert all(p.kind is p.KEYWORD_ONLY for p in ours.values() if p.name not in theirs)


@pytest.mark.parametrize("kind", CLASSES)
def test_positional_arguments_mean_what_they_mean_in_torch(kind):
    args = (
        (3, 5, 2, True, True, 0.25, True)
        if kind != "RNN"
        else (3, 5, 2, "relu", False, True, 0.25, True)
    )
    theirs, ours = (cls(*args) for cls in CLASSES[kind])
    for name in (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()
    ]


@pytest.mark.parametrize("kind", CLASSES)
def test_dropout_with_one_layer_warns(kind):
    for cls in CLASSES[kind]:
        with pytest.warns(UserWarning):
            cls(3, 5, 1, dropout=0.5)


@pytest.mark.parametrize("kind", CLASSES)
def test_factory_kwargs_and_dtype_conversions(kind):
    x = torch.randn(4, 2, 3, dtype=F64)
    for cls in CLASSES[kind]:
        m = cls(3, 5, 2, device="cpu", dtype=F64)
        assert all(p.dtype == F64 and p.device.type == "cpu" for p in m.parameters())
        assert m.float() is m and all(p.dtype == torch.float32 for p in m.parameters())
        assert m.double() is m and m(x)[0].dtype == F64
        assert m.to(torch.float32) is m and m(x.float())[0].dtype == torch.float32
        on_meta = cls(3, 5, 2, device="meta")
        assert all(p.is_meta for p in on_meta.parameters())
        assert on_meta.to_empty(device="cpu").weight_hh_l0.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_low_precision_modules_run_in_their_dtype(kind, backend, dtype):
    theirs, ours = pair(kind, backend, torch.float32, input_size=3, hidden_size=8, num_layers=2)
    x = torch.randn(6, 2, 3)
    want = flat(theirs(x))  # float32: the values a low-precision run approximates
    for m in (theirs, ours):
        got = flat(m.to(dtype)(x.to(dtype)))
        assert all(t.dtype == dtype for t in got)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=0)


# ---- parameters ----------------------------------------------------------------------------

CONFIGS = [
    {},
    {"bidirectional": True},
    {"bias": False},
    {"proj_size": 2},
    {"proj_size": 2, "bidirectional": True, "bias": False},
]


def _configs(kind):
    return [c for c in CONFIGS if kind == "LSTM" or "proj_size" not in c]


@pytest.mark.parametrize("kind", CLASSES)
def test_same_seed_same_names_order_shapes_and_values(kind):
    for cfg in _configs(kind):
        made = []
        for cls in CLASSES[kind]:
            torch.manual_seed(7)
            made.append(cls(3, 5, 2, **cfg))
        theirs, ours = made
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        for (_, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", CLASSES)
def test_all_weights_and_flat_weights_as_torch_has_them(kind):
    for cfg in _configs(kind):
        theirs, ours = pair(kind, input_size=3, hidden_size=5, num_layers=2, **cfg)
        assert ours._flat_weights_names == theirs._flat_weights_names
        assert ours._all_weights == theirs._all_weights
        for m in (theirs, ours):
            names = [n for group in m._all_weights for n in group]
            assert names == m._flat_weights_names == [n for n, _ in m.named_parameters()]
            assert [w for group in m.all_weights for w in group] == list(m.parameters())
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))
        for group_a, group_b in zip(ours.all_weights, theirs.all_weights):
            assert [w.shape for w in group_a] == [w.shape for w in group_b]


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_flatten_parameters_is_callable_and_changes_nothing(kind, backend):
    theirs, ours = pair(kind, backend, input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=F64)
    for m in (theirs, ours):
        before = flat(m(x))
        assert m.flatten_parameters() is None
        for a, b in zip(flat(m(x)), before):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", CLASSES)
def test_repr_is_torchs(kind):
    for cfg in [*_configs(kind), {"batch_first": True, "dropout": 0.5, "bidirectional": True}]:
        theirs, ours = (cls(3, 5, 2, **cfg) for cls in CLASSES[kind])
        assert repr(ours) == repr(theirs)
    theirs, ours = nn.RNN(3, 5, nonlinearity="relu"), glasslstm.RNN(3, 5, nonlinearity="relu")
    assert repr(ours) == repr(theirs)[:-1] + ", nonlinearity='relu')"  # torch leaves it out


# ---- forward: every option, against torch --------------------------------------------------


def _run(module, x, hx, grad_out, grad_h):
    """Forward and backward with given output gradients; the values and every gradient."""
    x_leaf = x.data if isinstance(x, rnn_utils.PackedSequence) else x
    x_leaf.requires_grad_(True)
    hx = (
        tuple(t.requires_grad_(True) for t in hx)
        if isinstance(hx, tuple)
        else hx.requires_grad_(True)
    )
    module.zero_grad()
    results = flat(module(x, hx))
    torch.autograd.backward(results, [grad_out, *grad_h])
    hx_grads = [t.grad for t in (hx if isinstance(hx, tuple) else (hx,))]
    return results, [x_leaf.grad, *hx_grads, *(p.grad for p in module.parameters())]


# (bias, batch_first, contiguous): every pair of values of any two of the flags, once
FLAG_SETS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind,backend", [*RUNS, ("LSTMP", "auto")], ids=[*RUN_IDS, "LSTMP"])
def test_every_option_matches_torch_with_noncontiguous_tensors(
    kind, backend, bidirectional, packed
):
    """Outputs, final states and all gradients, float64, for bias on/off, batch_first on/off,
    contiguous or not (input, states and output gradients), padded or packed input (lengths
    as a list or a tensor)."""
    proj = 3 if kind == "LSTMP" else 0
    kind = "LSTM" if proj else kind
    T, B, I, H, L = 7, 6, 5, 4, 2
    lengths = [7, 5, 5, 2, 1, 1]
    for bias, batch_first, contiguous in FLAG_SETS:
        extra = {"proj_size": proj} if proj else {}
        modules = pair(
            kind,
            backend,
            input_size=I,
            hidden_size=H,
            num_layers=L,
            bias=bias,
            batch_first=batch_first,
            bidirectional=bidirectional,
            **extra,
        )
        D, out = (2 if bidirectional else 1), (proj or H)
        layout_of = noncontiguous if not contiguous else torch.clone
        x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=F64)
        grad_out = layout_of(
            torch.randn((B, T, D * out) if batch_first else (T, B, D * out), dtype=F64)
        )
        hx = states(modules[0], B)
        grad_h = [layout_of(torch.randn_like(t)) for t in (hx if isinstance(hx, tuple) else (hx,))]
        results = []
        for m in modules:
            xi, go = layout_of(x), grad_out
            assert xi.is_contiguous() == contiguous
            if packed:
                lens = torch.tensor(lengths) if batch_first else lengths
                xi = rnn_utils.pack_padded_sequence(xi, lens, batch_first=batch_first)
                go = rnn_utils.pack_padded_sequence(grad_out, lens, batch_first=batch_first).data
            hxi = tuple(map(layout_of, hx)) if isinstance(hx, tuple) else layout_of(hx)
            results.append(_run(m, xi, hxi, go, grad_h))
        (values_a, grads_a), (values_b, grads_b) = results
        for a, b in zip(values_b, values_a):
            close(a, b)
        for a, b in zip(grads_b, grads_a):
            close(a, b)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_zero_initial_state_equals_no_initial_state(kind, backend):
    for cfg in _configs(kind):
        for m in pair(kind, backend, input_size=3, hidden_size=5, num_layers=2, **cfg):
            x = torch.randn(6, 4, 3, dtype=F64)
            given = flat(m(x, states(m, 4, fill=0.0)))
            for a, b in zip(given, flat(m(x))):
                assert torch.equal(a, b)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_expanded_and_transposed_states_are_read_correctly(kind, backend):
    theirs, ours = pair(kind, backend, input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(6, 4, 3, dtype=F64)
    h = torch.randn(2, 1, 5, dtype=F64).expand(2, 4, 5)  # stride 0 over the batch
    t = torch.randn(2, 5, 4, dtype=F64).transpose(1, 2)
    hx = (h, t) if kind == "LSTM" else t
    for a, b in zip(flat(ours(x, hx)), flat(theirs(x, hx))):
        close(a, b)


# ---- forward: the shapes it accepts and the errors it raises --------------------------------


def _args_check_cases(kind, proj):
    """(input shape, state shapes) with one size wrong, as torch's argument-check tests build
    them: input batch, state batch, input size, state size, state's first dimension; and for a
    projected LSTM, h_0 sized like c_0 and c_0 sized like h_0."""
    T, B, I, H, L, bad = 6, 4, 3, 5, 2, 7  # bad: a prime, no size divides it
    P = proj or H
    good_x, good_h, good_c = (T, B, I), (L, B, P), (L, B, H)

    def with_dim(shape, dim, size):
        return tuple(size if i == dim else s for i, s in enumerate(shape))

    cases = [
        (with_dim(good_x, 1, bad), good_h, good_c),
        (good_x, with_dim(good_h, 1, bad), with_dim(good_c, 1, bad)),
        (with_dim(good_x, 2, bad), good_h, good_c),
        (good_x, with_dim(good_h, 2, bad), with_dim(good_c, 2, bad)),
        (good_x, with_dim(good_h, 0, bad), with_dim(good_c, 0, bad)),
    ]
    if kind == "LSTM":  # one state wrong, the other right
        cases += [
            (good_x, with_dim(good_h, 1, bad), good_c),
            (good_x, good_h, with_dim(good_c, 1, bad)),
        ]
    if proj:
        cases += [
            (good_x, with_dim(good_h, 2, H), good_c),
            (good_x, good_h, with_dim(good_c, 2, P)),
        ]
    return cases


@pytest.mark.parametrize(
    "kind,proj",
    [("LSTM", 0), ("LSTM", 2), ("GRU", 0), ("RNN", 0)],
    ids=["LSTM", "LSTMP", "GRU", "RNN"],
)
def test_wrong_sizes_raise_runtime_errors(kind, proj):
    extra = {"proj_size": proj} if proj else {}
    modules = pair(kind, dtype=torch.float32, input_size=3, hidden_size=5, num_layers=2, **extra)
    for x_shape, h_shape, c_shape in _args_check_cases(kind, proj):
        x, h, c = torch.randn(x_shape), torch.randn(h_shape), torch.randn(c_shape)
        hx = (h, c) if kind == "LSTM" else h
        for m in modules:
            with pytest.raises(RuntimeError) as e:
                m(x, hx)
        one_line_runtime_error(e)


@pytest.mark.parametrize("kind", CLASSES)
def test_state_rank_must_follow_the_input_rank(kind):
    modules = pair(kind, dtype=torch.float32, input_size=3, hidden_size=5, num_layers=2)
    batched, unbatched = torch.randn(4, 2, 3), torch.randn(4, 3)
    for x, hx in (
        (batched, states(modules[0], None, torch.float32)),
        (unbatched, states(modules[0], 2, torch.float32)),
    ):
        for m in modules:
            with pytest.raises(RuntimeError) as e:
                m(x, hx)
        one_line_runtime_error(e)


@pytest.mark.parametrize("kind", CLASSES)
def test_rank_and_dtype_errors_are_value_errors(kind):
    modules = pair(kind, dtype=torch.float32, input_size=3, hidden_size=5, num_layers=2)
    for x in (
        torch.randn(3),
        torch.randn(4, 2, 3, 1),
        torch.randn(4, 2, 3, dtype=F64),
        torch.ones(4, 2, 3, dtype=torch.long),
    ):
        for m in modules:
            with pytest.raises(ValueError) as e:
                m(x)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", CLASSES)
def test_a_state_of_another_dtype_is_a_runtime_error(kind):
    modules = pair(kind, dtype=torch.float32, input_size=3, hidden_size=5, num_layers=2)
    hx = states(modules[0], 2, F64)
    for m in modules:
        with pytest.raises(RuntimeError) as e:
            m(torch.randn(4, 2, 3), hx)
    one_line_runtime_error(e)


def test_lstm_takes_exactly_two_states():
    h = torch.zeros(2, 2, 5)
    for m in pair("LSTM", dtype=torch.float32, input_size=3, hidden_size=5, num_layers=2):
        with pytest.raises(RuntimeError):
            m(torch.randn(4, 2, 3), (h, h, h))
        out, (h_n, c_n) = m(torch.randn(4, 2, 3), [h, h])  # a list is fine
        assert h_n.shape == c_n.shape == (2, 2, 5)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", CLASSES)
def test_an_empty_sequence_is_a_runtime_error(kind, bidirectional):
    modules = pair(
        kind, dtype=torch.float32, input_size=5, hidden_size=6, bidirectional=bidirectional
    )
    for x in (torch.ones(0, 10, 5), torch.ones(0, 5)):
        for m in modules:
            with pytest.raises(RuntimeError) as e:
                m(x)
        one_line_runtime_error(e)


@pytest.mark.parametrize("batch_first", [False, True], ids=["TB", "BT"])
@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_an_empty_batch_gives_empty_results_with_or_without_a_state(kind, backend, batch_first):
    modules = pair(
        kind,
        backend,
        input_size=3,
        hidden_size=4,
        num_layers=2,
        bidirectional=True,
        batch_first=batch_first,
    )
    shape = (0, 5, 3) if batch_first else (5, 0, 3)
    for m in modules:
        for hx in (None, states(m, 0)):
            x = torch.randn(shape, dtype=F64, requires_grad=True)
            out, hidden = m(x, hx)
            assert out.shape == ((0, 5, 8) if batch_first else (5, 0, 8))
            assert h_of(hidden).shape == (4, 0, 4)
            out.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_an_unbatched_sequence_is_a_batch_of_one(kind, backend):
    """The no-batch-dimension contract of torch's module tests: ``(T, I)`` in, ``(T, D*out)``
    and ``(L*D, ·)`` states out, the same numbers as a batch of one, with or without hx."""
    for cfg in _configs(kind):
        for batch_first in (False, True):
            theirs, ours = pair(
                kind,
                backend,
                input_size=2,
                hidden_size=3,
                num_layers=2,
                batch_first=batch_first,
                **cfg,
            )
            x = torch.randn(3, 2, dtype=F64)
            for hx in (None, states(theirs, None)):
                for m in (theirs, ours):
                    got = flat(m(x, hx))
                    hx1 = (
                        None
                        if hx is None
                        else tuple(t.unsqueeze(1) for t in hx)
                        if isinstance(hx, tuple)
                        else hx.unsqueeze(1)
                    )
                    batched = flat(m(x.unsqueeze(0 if batch_first else 1), hx1))
                    close(got[0], batched[0].squeeze(0 if batch_first else 1))
                    for a, b in zip(got[1:], batched[1:]):
                        close(a, b.squeeze(1))
                for a, b in zip(flat(ours(x, hx)), flat(theirs(x, hx))):
                    close(a, b)


# ---- packed sequences -----------------------------------------------------------------------


@pytest.mark.parametrize("kind,backend", [*RUNS, ("LSTMP", "auto")], ids=[*RUN_IDS, "LSTMP"])
def test_packed_batch_equals_each_sequence_run_alone(kind, backend):
    """Packed (sorted, or any order with enforce_sorted=False), with and without an initial
    state: each sequence's outputs and final state are those of running it alone, and the
    gradients of the input and the weights agree too; the same for torch's module."""
    proj = 2 if kind == "LSTMP" else 0
    kind = "LSTM" if proj else kind
    extra = {"proj_size": proj} if proj else {}
    cases = [  # enforce_sorted, lengths, default initial state
        (True, [8, 8, 6, 2, 1], True),
        (True, [8, 8, 6, 2, 1], False),
        (False, [2, 1, 3, 8, 5], True),
        (False, [2, 1, 3, 8, 5], False),
        (False, [4], False),
    ]
    for enforce_sorted, lengths, default_state in cases:
        modules = pair(
            kind, backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, **extra
        )
        T, B = max(lengths), len(lengths)
        x = torch.randn(T, B, 3, dtype=F64)
        hx = None if default_state else states(modules[0], B)
        results = []
        for m in modules:
            x_alone = x.clone().requires_grad_(True)
            outs, finals = [], []
            for i, n in enumerate(lengths):
                hx_i = (
                    None
                    if hx is None
                    else tuple(t[:, i : i + 1] for t in hx)
                    if isinstance(hx, tuple)
                    else hx[:, i : i + 1]
                )
                out, hidden = m(x_alone[:n, i : i + 1], hx_i)
                outs.append(torch.cat([out, out.new_zeros(T - n, 1, out.shape[2])]))
                finals.append(hidden if isinstance(hidden, tuple) else (hidden,))
            alone = torch.cat(outs, 1)
            alone_states = [torch.cat(parts, 1) for parts in zip(*finals)]
            m.zero_grad()
            alone.sum().backward()
            alone_grads = [x_alone.grad, *(p.grad.clone() for p in m.parameters())]

            x_packed = x.clone().requires_grad_(True)
            packed = rnn_utils.pack_padded_sequence(
                x_packed, lengths, enforce_sorted=enforce_sorted
            )
            out, hidden = m(packed, hx)
            padded, out_lengths = rnn_utils.pad_packed_sequence(out, total_length=T)
            close(padded, alone)
            for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,), alone_states):
                close(a, b)
            assert out_lengths.tolist() == lengths
            m.zero_grad()
            padded.sum().backward()
            for a, b in zip([x_packed.grad, *(p.grad for p in m.parameters())], alone_grads):
                close(a, b)
            results.append(padded)
        close(results[1], results[0])


@pytest.mark.parametrize("kind", CLASSES)
def test_packed_output_keeps_the_input_order_and_pads_back(kind):
    theirs, ours = pair(kind, input_size=3, hidden_size=4, num_layers=2, batch_first=True)
    seqs = [torch.randn(n, 3, dtype=F64) for n in (2, 5, 1, 4)]
    packed = rnn_utils.pack_sequence(seqs, enforce_sorted=False)
    outs = []
    for m in (theirs, ours):
        out, hidden = m(packed)
        assert isinstance(out, rnn_utils.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
        padded, lengths = rnn_utils.pad_packed_sequence(out, batch_first=True, total_length=6)
        assert lengths.tolist() == [2, 5, 1, 4] and padded.shape == (4, 6, 4)
        assert not padded[2, 1:].any() and not padded[0, 2:].any()  # zeros past each length
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                rnn_utils.unpack_sequence(out),
                rnn_utils.unpad_sequence(padded, lengths, batch_first=True),
            )
        )
        # a sequence's h_n is its output at its last step, in the order the sequences came in
        close(h_of(hidden)[-1], torch.stack([padded[i, n - 1] for i, n in enumerate(lengths)]))
        outs.append(padded)
    close(outs[1], outs[0])


@pytest.mark.parametrize("kind", CLASSES)
def test_a_packed_sequence_built_by_hand_runs(kind):
    """PackedSequence(data, batch_sizes), without sorting indices, as torch's tests build one."""
    theirs, ours = pair(kind, input_size=3, hidden_size=4, num_layers=2)
    sorted_packed = rnn_utils.pack_padded_sequence(torch.randn(5, 3, 3, dtype=F64), [5, 3, 2])
    by_hand = rnn_utils.PackedSequence(sorted_packed.data, sorted_packed.batch_sizes)
    results = [m(by_hand) for m in (theirs, ours)]
    assert results[1][0].sorted_indices is None
    for a, b in zip(flat(results[1]), flat(results[0])):
        close(a, b)


# ---- dropout between layers ------------------------------------------------------------------


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_dropout_draws_torchs_masks_from_the_same_seed(kind, backend):
    for bidirectional in (False, True):
        modules = pair(
            kind,
            backend,
            input_size=3,
            hidden_size=5,
            num_layers=3,
            dropout=0.4,
            bidirectional=bidirectional,
        )
        x = torch.randn(6, 4, 3, dtype=F64)
        results = []
        for m in modules:
            torch.manual_seed(5)
            xi = x.clone().requires_grad_(True)
            values = flat(m(xi))
            values[0].pow(2).sum().backward()
            results.append((values, [xi.grad, *(p.grad for p in m.parameters())]))
        for a, b in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
            close(a, b)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.276, 0.731, 1.0])
def test_dropout_sits_between_layers(p, train):
    """An RNN with every weight 1 and no bias: each first-layer unit outputs 10, so a
    second-layer unit outputs 10 times the number of first-layer outputs it sees, rescaled by
    1/(1-p) in training. Eval mode, or p = 0, drops nothing; p = 1 drops everything."""
    H = 100
    theirs, ours = (
        cls(10, H, 2, bias=False, dropout=p, nonlinearity="relu").double() for cls in CLASSES["RNN"]
    )
    outputs = []
    for m in (theirs, ours):
        m.train(train)
        with torch.no_grad():
            for w in m.parameters():
                w.fill_(1)
        torch.manual_seed(3)
        output, h_n = m(torch.ones(1, 1, 10, dtype=F64), torch.zeros(2, 1, H, dtype=F64))
        value = output[0, 0, 0].item()
        assert output.min() == output.max() and h_n[0].min() == h_n[0].max() == 10
        assert h_n[1, 0, 0].item() == value
        if p == 0 or not train:
            assert value == 10 * H
        elif p == 1:
            assert value == 0
        else:
            kept = value * (1 - p) / 10  # how many first-layer units got through
            assert abs(kept - round(kept)) < 1e-6 and 0.5 * H * (1 - p) < kept < 1.5 * H * (1 - p)
        outputs.append(value)
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_dropout_is_random_in_training_and_survives_a_save(kind, backend):
    for p, train in itertools.product((0.0, 0.1234), (True, False)):
        for m in pair(
            kind, backend, input_size=10, hidden_size=10, num_layers=2, bias=False, dropout=p
        ):
            m.train(train)
            x, hx = torch.rand(1, 1, 10, dtype=F64), states(m, 1)
            first, second = flat(m(x, hx)), flat(m(x, hx))
            buf = io.BytesIO()
            torch.save(m, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)  # a module of our own, saved whole
            loaded.flatten_parameters()
            third = flat(loaded(x, hx))
            same = p == 0 or not train
            assert all(torch.equal(a, b) == same for a, b in zip(first, second))
            assert all(torch.equal(a, b) == same for a, b in zip(first, third))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_dropout_changed_after_construction_takes_effect(kind, backend, train):
    modules = pair(kind, backend, input_size=10, hidden_size=10, num_layers=2, dropout=0.0)
    x = torch.rand(3, 2, 10, dtype=F64)
    seen = []
    for m in modules:
        m.train(train)
        previous, values = None, []
        for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
            m.dropout = p
            torch.manual_seed(int(p * 10))
            a = flat(m(x))
            b = flat(m(x))
            random = train and 0 < p < 1
            assert all(torch.equal(s, t) != random for s, t in zip(a, b))
            if previous is not None:
                assert torch.equal(a[0], previous) != train
            previous = a[0]
            values.append(a[0])
        seen.append(values)
    for a, b in zip(seen[1], seen[0]):
        close(a, b)  # the same seed, the same masks as torch


# ---- module machinery --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dict_moves_both_ways_and_through_a_file(kind):
    for cfg in _configs(kind):
        theirs, ours = pair(kind, input_size=3, hidden_size=5, num_layers=2, **cfg)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        fresh_ours, fresh_theirs = (
            cls(3, 5, 2, dtype=F64, **cfg) for cls in reversed(CLASSES[kind])
        )
        buf = io.BytesIO()
        torch.save(theirs.state_dict(), buf)
        buf.seek(0)
        fresh_ours.load_state_dict(torch.load(buf, weights_only=True))
        fresh_theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, 2, 3, dtype=F64)
        for a, b in zip(flat(fresh_ours(x)), flat(fresh_theirs(x))):
            close(a, b)
    for m in (theirs, ours):
        missing = dict(list(m.state_dict().items())[1:])
        with pytest.raises(RuntimeError, match="Missing key"):
            m.load_state_dict(missing)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_deepcopy_and_pickle_give_independent_equal_modules(kind, backend):
    x = torch.randn(1, 3, dtype=F64)  # one token of one sequence: the LSTM's drop-in step
    for m in pair(kind, backend, input_size=3, hidden_size=5, num_layers=2):
        hx = states(m, None)
        with torch.no_grad():
            before = flat(m(x, hx))
        copies = [copy.deepcopy(m), pickle.loads(pickle.dumps(m))]
        for c in copies:
            with torch.no_grad():
                assert all(torch.equal(a, b) for a, b in zip(flat(c(x, hx)), before))
                c.weight_ih_l0.mul_(2)  # a copy's weights are its own
                assert not torch.equal(flat(c(x, hx))[0], before[0])
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(flat(m(x, hx)), before))


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_backward_twice_through_a_retained_graph(kind, backend):
    for m in pair(kind, backend, input_size=6, hidden_size=8, num_layers=2):
        x = torch.randn(5, 4, 6, dtype=F64, requires_grad=True)
        output = m(x)[0]
        output.sum().backward(retain_graph=True)
        first = [x.grad.clone(), *(p.grad.clone() for p in m.parameters())]
        for _ in range(2):
            m.zero_grad()
            x.grad = None
            output.sum().backward(retain_graph=True)
            for a, b in zip([x.grad, *(p.grad for p in m.parameters())], first):
                assert torch.equal(a, b)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_tied_weights_stay_tied_through_training(kind, backend):
    """One Parameter in two places (a bias shared by both directions), a step of SGD."""
    outputs, x = [], torch.randn(5, 4, 10, dtype=F64)
    for m in pair(
        kind, backend, input_size=10, hidden_size=20, batch_first=True, bidirectional=True
    ):
        m.bias_ih_l0_reverse = m.bias_ih_l0
        assert len(list(m.parameters())) == 7
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x)[0].sum().backward()
        opt.step()
        assert m.bias_ih_l0_reverse is m.bias_ih_l0
        outputs.append(flat(m(x)))
    for a, b in zip(outputs[1], outputs[0]):
        close(a, b)


# ---- reparametrized weights -----------------------------------------------------------------


class _Scaled(nn.Module):
    """A parametrization: the weight times a factor kept in a buffer."""

    def __init__(self, factor: float):
        super().__init__()
        self.register_buffer("s", torch.tensor(factor, dtype=F64))

    def forward(self, w):
        return w * self.s


@pytest.mark.filterwarnings("ignore:.torch.nn.utils.weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "name,params", [("weight_ih_l0", 4), ("weight_hh_l0", 4), ("weight_hr_l0", 5)]
)
@pytest.mark.parametrize("backend", ["auto", "bptt"])
def test_weight_norm_keeps_results_and_flat_weights(backend, name, params):
    proj = {"proj_size": 3} if name == "weight_hr_l0" else {}
    x = torch.randn(7, 6, 10, dtype=F64)
    for m in pair("LSTM", backend, input_size=10, hidden_size=6, **proj):
        expected = flat(m(x))
        m = torch.nn.utils.weight_norm(m, name=name)
        assert sum(isinstance(w, nn.Parameter) for w in m._flat_weights) == params - 1
        for a, b in zip(flat(m(x)), expected):
            close(a, b)
        m = torch.nn.utils.remove_weight_norm(m, name=name)
        assert sum(isinstance(w, nn.Parameter) for w in m._flat_weights) == params
        assert name in m._parameters and name in dict(m.named_parameters())
        assert not {name + "_g", name + "_v"} & set(dict(m.named_parameters()))
        for a, b in zip(flat(m(x)), expected):
            close(a, b)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_parametrized_weights_give_torchs_results_and_gradients(kind, backend):
    x = torch.randn(5, 2, 3, dtype=F64)
    results = []
    for m in pair(kind, backend, input_size=3, hidden_size=4, num_layers=2):
        parametrizations.weight_norm(m, "weight_hh_l0")
        parametrize.register_parametrization(m, "weight_ih_l1", _Scaled(0.5))
        values = flat(m(x))
        with parametrize.cached():  # each parametrized weight computed once for the call
            assert all(torch.equal(a, b) for a, b in zip(flat(m(x)), values))
        values[0].pow(2).sum().backward()
        originals = [p.grad for n, p in m.named_parameters() if n.startswith("parametrizations.")]
        assert len(originals) == 3 and all(g is not None and g.abs().sum() > 0 for g in originals)
        results.append(values + originals)
    for a, b in zip(results[1], results[0]):
        close(a, b)


@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_pruning_masks_weights_and_removal_restores_parameters(kind, backend):
    x = torch.randn(5, 2, 3, dtype=F64)
    results = []
    for m in pair(kind, backend, input_size=3, hidden_size=4, num_layers=1):
        prune.l1_unstructured(m, "weight_ih_l0", 0.5)
        assert sum(isinstance(w, nn.Parameter) for w in m._flat_weights) == 3
        values = flat(m(x))
        prune.remove(m, "weight_ih_l0")
        assert sum(isinstance(w, nn.Parameter) for w in m._flat_weights) == 4
        assert (
            m._parameters["weight_ih_l0"] is not None and "weight_ih_l0_orig" not in m._parameters
        )
        assert "weight_ih_l0" in dict(m.named_parameters())
        assert (m.weight_ih_l0 == 0).sum() == m.weight_ih_l0.numel() // 2
        results.append(values + flat(m(x)))
    for a, b in zip(results[1], results[0]):
        close(a, b)


@pytest.mark.filterwarnings("ignore:.torch.nn.utils.weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "change",
    [
        "prune_again",
        "prune_mask_in_place",
        "parametrization_buffer",
        "weight_norm_g",
        "plain_tensor_in_place",
    ],
)
def test_a_generation_loop_sees_reparametrized_weights_change(change):
    """A one-token call under no_grad (the drop-in step, which keeps copies of the weights)
    follows a weight that is recomputed at every call: pruned again, its mask edited, a
    parametrization's buffer changed, weight_norm's g trained, a plain tensor edited."""

    x, results = torch.randn(1, 3, dtype=F64), []
    modules = pair("LSTM", "auto", input_size=3, hidden_size=5, num_layers=2)
    hx = states(modules[0], None)
    for m in modules:
        if change.startswith("prune"):
            prune.l1_unstructured(m, "weight_hh_l0", 0.3)
        elif change == "parametrization_buffer":
            parametrize.register_parametrization(m, "weight_hh_l0", _Scaled(1.0))
        elif change == "weight_norm_g":
            torch.nn.utils.weight_norm(m, "weight_hh_l0")
        else:
            w = m.weight_hh_l0.detach().clone()
            del m.weight_hh_l0
            m.weight_hh_l0 = w
        with torch.no_grad():
            before = flat(m(x, hx))
            if change == "prune_again":
                prune.l1_unstructured(m, "weight_hh_l0", 0.5)
            elif change == "prune_mask_in_place":
                m.weight_hh_l0_mask.zero_()
            elif change == "parametrization_buffer":
                m.parametrizations.weight_hh_l0[0].s.fill_(3.0)
            elif change == "weight_norm_g":
                m.weight_hh_l0_g.mul_(2)
            else:
                m.weight_hh_l0.mul_(2)
            after = flat(m(x, hx))
        assert not torch.equal(after[0], before[0])
        results.append(after)
    for a, b in zip(results[1], results[0]):
        close(a, b)


def test_a_stream_follows_a_weight_pruned_again():
    """Stream's weight copies are keyed by the tensors forward reads (``_flat_weights``), so a
    weight that pruning replaces is followed."""
    lstm = glasslstm.LSTM(3, 5, dtype=F64)
    prune.l1_unstructured(lstm, "weight_hh_l0", 0.3)
    stream = glasslstm.Stream(lstm)
    x = torch.randn(3, dtype=F64)
    stream.step(x)
    h, c = (t.clone() for t in stream.state)
    prune.l1_unstructured(lstm, "weight_hh_l0", 0.6)
    with torch.no_grad():
        want = lstm(x.view(1, 3), (h.view(1, 5), c.view(1, 5)))[0].view(-1)
    close(stream.step(x), want)
